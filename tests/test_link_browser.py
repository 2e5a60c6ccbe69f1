"""The page that opens links for anyone (server/web/), in a real headless Chromium
(Debian's, driven by Playwright; never a browser Playwright downloads): it decrypts with
WebCrypto and Argon2id (hash-wasm) and saves through a service worker's stream; the
saved file's SHA-256 is checked. Every request the browser made is checked for the key
(in any encoding), and so is the server's log."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from clitools import assert_ok, new_machine, sha256_file, write_random
from harness import Machine
from zkfs.linkformat import LinkUrl, b64url

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
# As this machine's notes prescribe (Playwright adds --headless, --no-sandbox and a new
# empty --user-data-dir itself): nothing may try to reach the network behind our back.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARGON2 = Path(__file__).resolve().parent.parent / "server" / "web" / "node_modules" / "hash-wasm"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `./zkfs.sh test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def owner(shared_server, tmp_path_factory) -> Machine:
    return new_machine(tmp_path_factory, shared_server).register()


def key_forms(*secrets: bytes) -> set[str]:
    out = set()
    for s in secrets:
        out |= {b64url(s), base64.b64encode(s).decode(), base64.b64encode(s).decode().rstrip("="), s.hex()}
    return out


class Visit:
    """One visit of a link's page in a fresh browser context (its own profile)."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(accept_downloads=True)
        self.requests = []
        self.context.on("request", lambda request: self.requests.append(request))
        self.page = self.context.new_page()
        self.page.goto(url)

    def download(self, dest: Path, timeout_s: float = 300):
        """Click Download; returns the failure (None: saved to ``dest``)."""
        self.page.wait_for_selector("#save", state="visible", timeout=60_000)
        with self.page.expect_download(timeout=timeout_s * 1000) as started:
            self.page.click("#save")
        download = started.value
        self.download_url = download.url
        failure = download.failure()            # waits until it finished or failed
        if failure is None:
            download.save_as(dest)
        return failure

    def sent(self) -> str:
        """Everything the browser sent: URLs, headers (Referer included), bodies."""
        return "\n".join(f"{r.url} {r.all_headers()} {r.post_data or ''}" for r in self.requests)

    def close(self) -> None:
        self.context.close()


def assert_key_never_sent(visit: Visit, server, url: LinkUrl, *more: str) -> None:
    assert url.secret and b64url(url.secret) in visit.page.url        # the browser had it...
    sent = visit.sent()
    assert "/record" in sent and "/manifest" in sent                  # ...and this is what it sent:
    log = server.log_path.read_text(errors="replace")
    assert f"/s/{b64url(url.link_id)}/manifest" in log                 # (the log has the visit's requests)
    for form in key_forms(url.secret) | set(more):
        assert form not in sent, form
        assert form not in log, form


def test_the_page_saves_a_300_mb_file_it_decrypted(browser, owner, shared_server, tmp_path):
    src = write_random(tmp_path / "holiday video.mp4", 300 * 1000 * 1000)
    assert_ok(owner.run("upload", str(src)))
    url = LinkUrl.parse(owner.run("link", "/holiday video.mp4").stdout.strip())
    src_sha = sha256_file(src)
    src.unlink()                         # room for the download
    visit = Visit(browser, str(url))
    try:
        assert visit.page.inner_text("#name") == "holiday video.mp4"
        saved = tmp_path / "saved.mp4"
        assert visit.download(saved) is None
        assert sha256_file(saved) == src_sha
        # streamed to disk by the service worker (not the in-memory fallback's blob: URL)
        assert re.fullmatch(rf"{shared_server.url}/s/static/dl/[0-9a-f]{{32}}", visit.download_url), \
            visit.download_url
        assert "verified" in visit.page.inner_text("#done")
        assert visit.page.eval_on_selector("#progress", "bar => [bar.value, bar.max]") == [300_000_000] * 2
        assert sum("/blobs/" in r.url for r in visit.requests) == 287     # every chunk, once
        assert_key_never_sent(visit, shared_server, url)
    finally:
        visit.close()


def test_a_password_link_opens_with_its_password_only(browser, owner, shared_server, tmp_path):
    if not (ARGON2 / "dist" / "argon2.umd.min.js").exists():
        pytest.fail("hash-wasm is missing: `./zkfs.sh setup` installs the page's npm packages")
    src = write_random(tmp_path / "contract.pdf", 2 * 1024 * 1024 + 5)
    assert_ok(owner.run("upload", str(src)))
    password = "blue-heron-1987"
    url = LinkUrl.parse(owner.run("link", "/contract.pdf", "--password", "--password-stdin",
                                  input=password + "\n").stdout.strip())
    visit = Visit(browser, str(url))
    try:
        page = visit.page
        page.wait_for_selector("#password", state="visible")
        assert page.is_hidden("#file")
        page.fill("#password", "blue-heron-1988")
        page.click("#unlock-button")
        page.wait_for_selector("#error", state="visible")
        assert page.inner_text("#error") == "Wrong password." and page.is_hidden("#file")
        page.fill("#password", password)
        page.click("#unlock-button")
        saved = tmp_path / "saved.pdf"
        assert visit.download(saved) is None
        assert sha256_file(saved) == sha256_file(src)
        assert any(r.url.endswith("/static/argon2.js") for r in visit.requests)
        assert_key_never_sent(visit, shared_server, url, password)
    finally:
        visit.close()


def test_the_page_saves_nothing_from_a_lying_server(browser, owner, shared_server, lying_proxy, tmp_path):
    src = write_random(tmp_path / "ledger.csv", 3 * 1024 * 1024)
    assert_ok(owner.run("upload", str(src)))
    real = LinkUrl.parse(owner.run("link", "/ledger.csv").stdout.strip())
    proxy = lying_proxy(shared_server)
    url = LinkUrl(proxy.url, real.link_id, real.secret)
    lid = b64url(real.link_id)
    proxy.lie("GET", rf"/s/{lid}/blobs/.*", lambda data, req: data[:70_000] + bytes([data[70_000] ^ 1])
              + data[70_001:], json=False, times=1)
    visit = Visit(browser, str(url))
    try:
        failure = visit.download(tmp_path / "saved.csv")
        assert failure is not None                       # the browser's download failed: no file
        assert not (tmp_path / "saved.csv").exists()
        assert "failed verification" in visit.page.inner_text("#error")
    finally:
        visit.close()
    # the record rewritten: the page says the link does not open
    proxy.honest()
    proxy.lie("GET", rf"/s/{lid}/record", lambda body, req: {"record": body["record"][:-8] + "AAAAAAA="})
    visit = Visit(browser, str(url))
    try:
        visit.page.wait_for_selector("#error", state="visible")
        assert "does not open" in visit.page.inner_text("#error") and visit.page.is_hidden("#file")
    finally:
        visit.close()
    # revoked: the page is gone
    assert_ok(owner.run("link", "--revoke", str(real)))
    visit = Visit(browser, str(real))
    try:
        assert "expired or was revoked" in visit.page.inner_text("body")
    finally:
        visit.close()
