"""Links for anyone (issue 16 part 4), through the real `client.py` and a real server:
`link` makes one of a file's current version, `fetch` opens it with no account,
`link --list` / `--revoke`; the anonymous /s/<id> endpoints serve that version and
nothing else of the account, answer 410 once it is revoked or expired, and are
rate-limited; a server that lies in any answer about a link gets an error, never
wrong bytes; and the link's key never reaches the server."""
from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from clitools import (
    assert_cli_error,
    assert_ok,
    config,
    new_machine,
    sha256_file,
    user_id,
    write_random,
)
from harness import Machine

from zkfs.linkformat import LinkUrl, b64url

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def owner(shared_server, tmp_path_factory) -> Machine:
    return new_machine(tmp_path_factory, shared_server).register()


def make_link(machine: Machine, path: str, *args: str, password: str | None = None) -> LinkUrl:
    proc = machine.run("link", path, *args, *(("--password", "--password-stdin") if password else ()),
                       input=f"{password}\n" if password else None)
    assert_ok(proc)
    return LinkUrl.parse(proc.stdout.strip())


def fetch(machine: Machine, url, *args: str, password: str | None = None, check: bool = True):
    proc = machine.run("fetch", str(url), *args, *(("--password-stdin",) if password is not None else ()),
                       input=f"{password}\n" if password is not None else None, check=False)
    if check:
        assert_ok(proc)
    return proc


def anonymous(url: LinkUrl, part: str = "", **kw) -> httpx.Response:
    """What anyone asks the server (no token; never the fragment)."""
    lid = b64url(url.link_id)
    return httpx.get(f"{url.server}/s/{lid}{'/' + part if part else ''}", timeout=30, **kw)


def used_bytes(machine: Machine) -> int:
    token = config(machine)["token"]
    return httpx.get(f"{machine.server_url}/api/v1/fs/statfs", headers={"Authorization": f"Bearer {token}"},
                     timeout=30).json()["used_bytes"]


def secret_forms(url: LinkUrl) -> set[bytes]:
    s = url.secret
    return {s, b64url(s).encode(), base64.b64encode(s), base64.b64encode(s).rstrip(b"="), s.hex().encode(),
            s.hex().upper().encode()}


def no_partial_left(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if "zkfs-partial" in p.name]


def test_a_link_serves_the_version_it_was_made_of_until_revoked(owner, shared_server, tmp_path):
    src = write_random(tmp_path / "report v1.pdf", 3 * 1024 * 1024 + 4321)
    assert_ok(owner.run("upload", str(src)))
    before = used_bytes(owner)
    url = make_link(owner, "/report v1.pdf", "--expires", "7d")
    assert url.server == shared_server.url
    charged = used_bytes(owner) - before
    assert 3 * 1024 * 1024 < charged < 3 * 1024 * 1024 + 16_384      # its own copy of the chunks, counted

    # anyone: no account, no $ZKFS_HOME of theirs
    stranger = Machine(tmp_path / "stranger", "http://unused")
    out = tmp_path / "got"
    out.mkdir()
    proc = fetch(stranger, url, "-o", str(out))
    got = out / "report v1.pdf"
    assert sha256_file(got) == sha256_file(src) and f"sha256 {sha256_file(src)}" in proc.stdout

    # the file changes, then goes: the link still serves the version it was made of
    new = write_random(tmp_path / "v2" / "report v1.pdf", 2 * 1024 * 1024)
    assert_ok(owner.run("upload", str(new)))
    assert_ok(owner.run("rm", "/report v1.pdf"))
    again = tmp_path / "again.pdf"
    fetch(stranger, url, "-o", str(again))
    assert sha256_file(again) == sha256_file(src)

    listed = owner.run("link", "--list").stdout
    assert b64url(url.link_id) in listed and "/report v1.pdf" in listed and str(url) in listed

    # revoked: every endpoint answers 410, the copies are gone and uncharged
    uid = user_id(owner)
    store_id = shared_server.query("SELECT store_id FROM links WHERE id = ?", str(UUID(bytes=url.link_id)))[0][0]
    blob = shared_server.query("SELECT blob_id FROM link_blobs WHERE link_id = ?",
                               str(UUID(bytes=url.link_id)))[0][0]
    assert sum(f"{uid}/{store_id}/" in o for o in shared_server.stored_objects(uid)) == 4
    using = used_bytes(owner)
    assert_ok(owner.run("link", "--revoke", str(url)))
    for part in ("", "record", "manifest", f"blobs/{blob}"):
        assert anonymous(url, part).status_code == 410, part
    assert_cli_error(fetch(stranger, url, check=False), "expired or was revoked")
    assert not any(f"{uid}/{store_id}/" in o for o in shared_server.stored_objects(uid))
    assert used_bytes(owner) == using - charged
    listed = owner.run("link", "--list").stdout
    assert "revoked" in listed and str(url) not in listed


def test_a_password_protects_the_link_and_records_hide_which_links_have_one(owner, shared_server, tmp_path):
    src = write_random(tmp_path / "salary.xlsx", 200_000)
    assert_ok(owner.run("upload", str(src)))
    url = make_link(owner, "/salary.xlsx", password="open sesame 42")
    plain = make_link(owner, "/salary.xlsx")
    sizes = {len(anonymous(u, "record").json()["record"]) for u in (url, plain)}
    assert len(sizes) == 1, sizes                  # padded alike: the length tells nothing

    stranger = Machine(tmp_path / "stranger", "http://unused")
    out = tmp_path / "out.xlsx"
    assert_cli_error(fetch(stranger, url, "-o", str(out), password="open sesame 43", check=False),
                     "wrong password")
    assert_cli_error(fetch(stranger, url, "-o", str(out), check=False), "no password given")
    assert not out.exists()
    fetch(stranger, url, "-o", str(out), password="open sesame 42")
    assert sha256_file(out) == sha256_file(src)


def test_an_expired_link_is_gone_and_its_copies_are_swept(owner, shared_server, tmp_path):
    from server.maintenance import expire
    src = write_random(tmp_path / "brief.txt", 1_500_000)
    assert_ok(owner.run("upload", str(src)))
    before = used_bytes(owner)
    url = make_link(owner, "/brief.txt", "--expires", "2s")
    store_id = shared_server.query("SELECT store_id FROM links WHERE id = ?", str(UUID(bytes=url.link_id)))[0][0]
    uid = user_id(owner)
    assert any(f"{uid}/{store_id}/" in o for o in shared_server.stored_objects(uid))
    time.sleep(2.2)
    for part in ("", "record", "manifest"):
        assert anonymous(url, part).status_code == 410, part
    assert "expired" in owner.run("link", "--list").stdout
    # the hourly sweep (run here out of band): copies deleted, the owner uncharged
    expire(shared_server.metadata(), shared_server.blob_store())
    assert not any(f"{uid}/{store_id}/" in o for o in shared_server.stored_objects(uid))
    assert used_bytes(owner) == before
    assert anonymous(url, "record").status_code == 410


def test_the_anonymous_endpoints_reach_nothing_else(owner, shared_server, tmp_path):
    a = write_random(tmp_path / "a.bin", 2 * 1024 * 1024 + 10)
    b = write_random(tmp_path / "b.bin", 1024 * 1024 + 10)
    assert_ok(owner.run("upload", str(a)))
    assert_ok(owner.run("upload", str(b)))
    url = make_link(owner, "/a.bin")
    uid = user_id(owner)
    sizes = dict(shared_server.query("SELECT blob_id, size FROM link_blobs WHERE link_id = ?",
                                     str(UUID(bytes=url.link_id))))
    linked = set(sizes)
    assert len(linked) == 3
    blob = max(linked, key=sizes.get)           # a whole chunk (the last one holds 10 bytes)
    assert anonymous(url, f"blobs/{blob}").status_code == 200
    # a Range of one 64 KiB segment, as a reader of single segments asks
    part = anonymous(url, f"blobs/{blob}", headers={"Range": "bytes=65625-131249"})
    assert part.status_code == 206 and len(part.content) == 65625
    assert part.content == anonymous(url, f"blobs/{blob}").content[65625:131250]
    # the account's other blobs (another file's, and the linked file's after a change) are not there
    others = {r[0] for r in shared_server.query("SELECT blob_id FROM blobs WHERE user_id = ?", uid)} - linked
    assert others
    for other in others:
        assert anonymous(url, f"blobs/{other}").status_code == 404
    inode = shared_server.query("SELECT inode FROM links WHERE id = ?", str(UUID(bytes=url.link_id)))[0][0]
    for path in (f"inodes/{inode}", f"../api/v1/fs/inodes/{inode}", "static/..%2F..%2Fapp.db",
                 f"blobs/{blob}/..%2F..%2Fmanifest"):
        assert anonymous(url, path).status_code == 404, path
    for probe in ("AAAAAAAAAAAAAAAAAAAAAA", "not-a-link", b64url(url.link_id)[:-1]):
        assert httpx.get(f"{url.server}/s/{probe}/record", timeout=30).status_code == 404
        assert httpx.get(f"{url.server}/s/{probe}", timeout=30).status_code == 404
    page = anonymous(url)
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"


def test_link_and_fetch_say_what_is_wrong_in_one_line(owner, shared_server, tmp_path):
    assert_ok(owner.run("mkdir", "/Folder"))
    assert_cli_error(owner.run("link", "/Folder", check=False), "only a file can be linked")
    assert_cli_error(owner.run("link", "/nothing-here.txt", check=False), "no such file")
    assert_cli_error(owner.run("link", "--list", "/Folder", check=False), "take no path")
    assert_cli_error(owner.run("link", check=False), "give the file to link")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert_ok(owner.run("upload", str(empty)))
    assert_cli_error(owner.run("link", "/empty.txt", "--expires", "forever", check=False), "--expires")
    assert_cli_error(owner.run("link", "--revoke", "AAAAAAAAAAAAAAAAAAAAAA", check=False), "no such link")
    assert_cli_error(owner.run("link", "--revoke", "nonsense", check=False), "not a link id")

    url = make_link(owner, "/empty.txt")
    stranger = Machine(tmp_path / "stranger", "http://unused")
    folder = tmp_path / "into"
    folder.mkdir()
    fetch(stranger, url, "-o", str(folder))
    assert (folder / "empty.txt").read_bytes() == b""
    # the name comes from the link's maker: it replaces no file of the fetcher's unless told to
    (folder / "empty.txt").write_bytes(b"mine")
    assert_cli_error(fetch(stranger, url, "-o", str(folder), check=False), "exists: not replacing it")
    assert (folder / "empty.txt").read_bytes() == b"mine"
    fetch(stranger, url, "-o", str(folder / "empty.txt"))
    assert (folder / "empty.txt").read_bytes() == b""
    text = str(url)
    assert_cli_error(fetch(stranger, text.split("#")[0], check=False), "no key after '#'")
    assert_cli_error(fetch(stranger, text[:-4], check=False), "cut off or mistyped")
    assert_cli_error(fetch(stranger, "https://example.org/x", check=False), "not a zkfs link")
    assert_cli_error(fetch(stranger, str(LinkUrl(url.server, url.link_id, bytes(16))), check=False),
                     "does not open")
    assert_cli_error(fetch(stranger, str(LinkUrl(url.server, bytes(16), url.secret)), check=False),
                     "no such link")
    assert_cli_error(fetch(stranger, text.replace("http://127.0.0.1", "http://10.1.2.3"), check=False),
                     "refusing plain http")


def test_the_server_decides_links_only_on_the_current_version_and_within_the_quota(server, make_machine,
                                                                                     tmp_path):
    m = make_machine(server).register()
    src = write_random(tmp_path / "f.bin", 2 * 1024 * 1024)
    assert_ok(m.run("upload", str(src)))
    token = config(m)["token"]
    api = httpx.Client(base_url=server.api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    uid = user_id(m)
    inode, version = server.query("SELECT id, version FROM inodes WHERE user_id = ? AND is_dir = 0", uid)[0]
    root = server.query("SELECT root_inode FROM users WHERE id = ?", uid)[0][0]
    body = {"id": b64url(bytes(range(16))), "inode": inode, "version": version, "record": "AAAA", "note": ""}
    assert api.post("/links", json=body | {"version": version + 1}).json()["code"] == "conflict"
    assert api.post("/links", json=body | {"inode": root, "version": 1}).json()["code"] == "is_dir"
    assert api.post("/links", json=body | {"id": "not/an/id-of-22-chars!"}).status_code == 422
    other = make_machine(server).register()
    other_api = httpx.Client(base_url=server.api, timeout=30,
                             headers={"Authorization": f"Bearer {config(other)['token']}"})
    assert other_api.post("/links", json=body).json()["code"] == "not_found"
    before = set(server.stored_objects(uid))
    server.query("UPDATE users SET quota_bytes = used_bytes + 1000 WHERE id = ?", uid)
    refused = api.post("/links", json=body)
    assert refused.status_code == 507 and set(server.stored_objects(uid)) == before    # no copy left behind
    server.query("UPDATE users SET quota_bytes = NULL WHERE id = ?", uid)
    assert api.post("/links", json=body).status_code == 201
    assert api.post("/links", json=body).json()["code"] == "exists"
    assert other_api.delete(f"/links/{body['id']}").status_code == 404         # not theirs to revoke
    assert httpx.get(f"{server.url}/s/{body['id']}/record", timeout=30).json() == {"record": "AAAA"}


@pytest.mark.parametrize("server", [{"env": {"ZKFS_LINK_OPENS_PER_MINUTE": "5",
                                              "ZKFS_LINK_FETCHES_PER_MINUTE": "3"}}], indirect=True)
def test_link_requests_are_rate_limited_per_address(server, make_machine, tmp_path):
    m = make_machine(server).register()
    assert_ok(m.run("upload", str(write_random(tmp_path / "f.bin", 5 * 1024 * 1024))))
    url = make_link(m, "/f.bin")
    blobs = [r[0] for r in server.query("SELECT blob_id FROM link_blobs")]
    assert [anonymous(url, f"blobs/{b}").status_code for b in blobs[:4]] == [200, 200, 200, 429]
    # probing: unknown ids, then anything, past the budget of openings
    codes = [httpx.get(f"{server.url}/s/{b64url(bytes([i]) * 16)}/record", timeout=30).status_code
             for i in range(5)]
    assert codes == [404] * 5
    limited = anonymous(url, "record")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["code"] == "throttled"


@pytest.mark.slow
def test_a_lying_server_gets_an_error_never_other_bytes(owner, shared_server, lying_proxy, tmp_path):
    src = write_random(tmp_path / "plan.bin", 3 * 1024 * 1024 + 77)
    assert_ok(owner.run("upload", str(src)))
    real = make_link(owner, "/plan.bin")
    other = make_link(owner, "/plan.bin")
    proxy = lying_proxy(shared_server)
    url = LinkUrl(proxy.url, real.link_id, real.secret)
    lid = b64url(real.link_id)
    stranger = Machine(tmp_path / "stranger", "http://unused")
    out = tmp_path / "out"
    out.mkdir()

    # the current version's manifest (the file changed since the link was made)
    assert_ok(owner.run("upload", str(write_random(tmp_path / "v2" / "plan.bin", 1024 * 1024))))
    inode = shared_server.query("SELECT inode FROM links WHERE id = ?", str(UUID(bytes=real.link_id)))[0][0]
    current = base64.b64decode(shared_server.query("SELECT manifest FROM inodes WHERE id = ?", inode)[0][0])
    segment = 65625

    def flip(data: bytes, at: int) -> bytes:
        return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]

    def full_chunks(rewrite):
        # The chunks are fetched in parallel: a lie told only to the first request would
        # sometimes land on the 77-byte last chunk, where these edits change nothing.
        return lambda data, req: rewrite(data, req) if len(data) > 3 * segment else data

    other_record = anonymous(other, "record").json()
    lies = [
        ("GET", rf"/s/{lid}/record", lambda body, req: {"record": base64.b64encode(
            flip(base64.b64decode(body["record"]), 40)).decode()}, True, "does not open"),
        ("GET", rf"/s/{lid}/record", lambda body, req: other_record, True, "does not open"),
        ("GET", rf"/s/{lid}/manifest", lambda data, req: current, False, "another manifest"),
        ("GET", rf"/s/{lid}/manifest", lambda data, req: flip(data, 30), False, "another manifest"),
        ("GET", rf"/s/{lid}/blobs/.*", full_chunks(lambda data, req: flip(data, 2 * segment + 100)), False,
         "failed verification: authentication failed"),
        ("GET", rf"/s/{lid}/blobs/.*", full_chunks(lambda data, req: data[segment:2 * segment] + data[:segment]
         + data[2 * segment:]), False, "failed verification: chunk segment does not belong here"),
        ("GET", rf"/s/{lid}/blobs/.*", full_chunks(lambda data, req: data[:-segment]), False, "wrong length"),
    ]
    for method, path, rewrite, is_json, message in lies:
        proxy.honest()
        proxy.lie(method, path, rewrite, json=is_json)
        assert_cli_error(fetch(stranger, url, "-o", str(out), check=False), message)
        assert list(out.iterdir()) == [], message            # nothing written, not even a partial file
    proxy.honest()
    proxy.lie("GET", rf"/s/{lid}/blobs/.*", truncate=True)
    assert_cli_error(fetch(stranger, url, "-o", str(out), check=False), "cannot reach the server")
    no_partial_left(out)
    assert list(out.iterdir()) == []

    proxy.honest()
    fetch(stranger, url, "-o", str(out))
    assert sha256_file(out / "plan.bin") == sha256_file(src)

    # what the server (or anyone on the path) received never holds the key, in any form
    forms = secret_forms(real) | secret_forms(other)
    for req in proxy.requests():
        seen = req.path.encode() + repr(req.query).encode() + repr(req.headers).encode() + req.body
        assert not any(f in seen for f in forms), req.path
    assert proxy.requests("GET", rf"/s/{lid}/record")


def test_making_a_link_sends_the_server_no_key(owner, shared_server, lying_proxy, tmp_path):
    """The owner's requests carry the record and note sealed, never the secret."""
    proxy = lying_proxy(shared_server)
    src = write_random(tmp_path / "memo.txt", 100_000)
    assert_ok(owner.run("upload", str(src)))
    cfg_path = owner.home / "config.json"
    saved = cfg_path.read_text()
    cfg_path.write_text(re.sub(r'"server": "[^"]*"', f'"server": "{proxy.url}"', saved))
    try:
        url = make_link(owner, "/memo.txt", password="hunter2 hunter2")
        listed = owner.run("link", "--list").stdout
    finally:
        cfg_path.write_text(saved)
    assert str(url) in listed                    # the owner's note gave it back, here
    forms = secret_forms(url) | {b"hunter2 hunter2", base64.b64encode(b"hunter2 hunter2")}
    posts = proxy.requests("POST", "/links")
    assert len(posts) == 1
    for req in proxy.requests():
        seen = req.path.encode() + repr(req.query).encode() + repr(req.headers).encode() + req.body
        assert not any(f in seen for f in forms), req.path
    digest = hashlib.sha256(url.secret).hexdigest().encode()
    assert digest not in shared_server.log_path.read_bytes()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_revocation_and_the_sweep_on_postgresql_and_s3(server, make_machine, tmp_path):
    """What sqlite and a folder do above, on PostgreSQL + S3 (the copies made with
    CopyObject): a revoked link and a swept expired one leave no object and no charge."""
    from server.maintenance import expire
    m = make_machine(server).register()
    src = write_random(tmp_path / "deck.pdf", 2 * 1024 * 1024 + 3)
    assert_ok(m.run("upload", str(src)))
    uid = UUID(user_id(m))
    before, objects = used_bytes(m), set(server.stored_objects(uid))
    kept = make_link(m, "/deck.pdf")
    expiring = make_link(m, "/deck.pdf", "--expires", "1s")
    assert len(set(server.stored_objects(uid)) - objects) == 6          # each link's own 3 chunks
    stranger = Machine(tmp_path / "stranger", "http://unused")
    fetch(stranger, kept, "-o", str(tmp_path / "got.pdf"))
    assert sha256_file(tmp_path / "got.pdf") == sha256_file(src)
    assert_ok(m.run("link", "--revoke", str(kept)))
    assert anonymous(kept, "record").status_code == 410
    time.sleep(1.2)
    assert anonymous(expiring, "record").status_code == 410
    expire(server.metadata(), server.blob_store())
    assert set(server.stored_objects(uid)) == objects and used_bytes(m) == before
