"""API fuzzing: schemathesis generates requests from the server's own OpenAPI spec
(valid and invalid, authenticated with a real token); plus hand-written hostile
input. Every answer must be < 500 with no traceback, and every error a JSON
``{detail, code}``.

Bounded: ZKFS_FUZZ_EXAMPLES examples per operation and mode (default 20) and an
overall budget of ZKFS_FUZZ_SECONDS (default 45 s) for the generated part.
"""
from __future__ import annotations

import http.client
import json
import os
import time
import uuid

import httpx
import pytest

from apiuser import ApiUser, assert_error_shape, b64, client, nh

pytestmark = pytest.mark.timeout(240)

EXAMPLES = int(os.environ.get("ZKFS_FUZZ_EXAMPLES", "20"))
BUDGET = float(os.environ.get("ZKFS_FUZZ_SECONDS", "45"))
# Operations that end the session they run in: they get a throwaway user per example.
SESSION_ENDING = {("DELETE", "/api/v1/account"), ("POST", "/api/v1/auth/logout"),
                  ("PUT", "/api/v1/account/password")}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from conftest import ServerProcess
    srv = ServerProcess(tmp_path_factory.mktemp("zkfs-fuzz"))
    try:
        yield srv.start()
    finally:
        srv.stop()


def _problems(resp_status: int, text: str, content_type: str) -> list[str]:
    out = []
    if resp_status >= 500:
        out.append(f"HTTP {resp_status}")
    if "Traceback" in text or 'File "/' in text:
        out.append("traceback in body")
    if 400 <= resp_status < 500:
        if "json" not in content_type:
            out.append(f"error body is not JSON ({content_type})")
        else:
            try:
                body = json.loads(text)
                if not (isinstance(body, dict) and set(body) - {"op_index"} == {"detail", "code"}):
                    out.append(f"error body is not {{detail, code}}: {text[:120]}")
            except ValueError:
                out.append("error body is not valid JSON")
    return out


@pytest.mark.slow
def test_schemathesis_fuzz_no_5xx(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    srv = fuzz_server
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    main_user = ApiUser(srv)
    # some real objects so that generated ids sometimes hit something
    d = main_user.create(main_user.root, "d", is_dir=True)
    f = main_user.create(d, "f", key=True)
    assert main_user.commit(f, [main_user.put_blob(f, os.urandom(3000))], base=1).status_code == 200

    failures: list[str] = []
    counts: dict[str, int] = {}
    deadline = time.monotonic() + BUDGET

    def token_for(method: str, path: str) -> str:
        if (method, path) in SESSION_ENDING:
            return ApiUser(srv).token
        return main_user.token

    ops = []
    for result in schema.get_all_operations():
        ops.append(result.ok())
    assert len(ops) >= 15, [o.path for o in ops]

    for op in ops:
        label = f"{op.method.upper()} {op.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                if time.monotonic() > deadline:
                    return
                headers = dict(case.headers or {})
                if "authorization" not in {k.lower() for k in headers}:
                    headers["Authorization"] = f"Bearer {token_for(op.method.upper(), op.path)}"
                case.headers = headers
                try:
                    resp = case.call(base_url=srv.url, timeout=30)
                except Exception as exc:      # a transport failure is a failure too
                    failures.append(f"{label} [{mode.value}]: request failed: {exc!r}")
                    return
                counts[label] = counts.get(label, 0) + 1
                ctype = resp.headers.get("content-type") or resp.headers.get("Content-Type") or ""
                if isinstance(ctype, list):
                    ctype = ctype[0] if ctype else ""
                for problem in _problems(resp.status_code, resp.content.decode("utf-8", "replace"), ctype):
                    failures.append(f"{label} [{mode.value}] -> {resp.status_code}: {problem}; "
                                    f"request {case.method} {case.formatted_path} body={str(case.body)[:200]}")

            try:
                run()
            except Unsatisfiable:
                pass            # e.g. no invalid request exists for an operation without inputs
    total = sum(counts.values())
    print(f"\nschemathesis: {total} requests over {len(counts)} operations")
    assert not failures, "\n".join(failures[:30])
    assert total >= len(ops) * 5, counts
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------------------------ hand-written
JUNK_IDS = ["../", "..", "../../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2f%2e%2e",
            "%00", "%ff%fe", "not-a-uuid", "' OR 1=1 --", "{inode}", "00000000-0000-0000-0000-00000000000g",
            "x" * 5000, "%C0%AE%C0%AE", "\u00e9t\u00e9".encode().decode("latin-1"), "12345678123456781234567812345678" * 4,
            "-1", "99999999999999999999999999"]


def _raw(srv, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request with the path sent byte for byte (httpx would normalise ../)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.getheader("content-type", ""), r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_junk_in_every_id_of_every_route(fuzz_server):
    srv = fuzz_server
    a = ApiUser(srv)
    spec = httpx.get(srv.url + "/openapi.json").json()
    real = {"inode": str(a.root), "blob_id": str(uuid.uuid4()), "name_hash": nh("x"), "gen": "1",
            "link_id": "A" * 22, "share": str(uuid.uuid4()), "username": a.username}
    failures, n = [], 0
    for path, methods in spec["paths"].items():
        if "{" not in path:
            continue
        for method in methods:
            if method not in ("get", "put", "post", "delete"):
                continue
            params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
            for target in params:
                for junk in JUNK_IDS:
                    url = path
                    for name in params:
                        url = url.replace("{" + name + "}", junk if name == target else real[name])
                    url = "".join(ch if 32 < ord(ch) < 127 else f"%{ord(ch):02X}" for ch in url)
                    body = b"x" if method == "put" else None
                    status, ctype, text = _raw(srv, method.upper(), url, {"Authorization": f"Bearer {a.token}"}, body)
                    n += 1
                    if not 400 <= status < 500:
                        failures.append(f"{method.upper()} {url[:120]} -> {status}")
                    for problem in _problems(status, text, ctype):
                        failures.append(f"{method.upper()} {url[:120]} -> {status}: {problem}")
    assert not failures, "\n".join(failures[:30])
    assert n > 150
    # nothing was created outside the user's own directory
    storage = srv.data_dir / "storage"
    assert not [p for p in storage.rglob("*") if p.name in ("passwd", "etc", "..")]
    assert "Traceback" not in srv.log()


def test_junk_headers(fuzz_server):
    srv = fuzz_server
    a = ApiUser(srv)
    f = a.create(a.root, "f", key=True)
    blob = a.put_blob(f, os.urandom(5000))
    assert a.commit(f, [blob], base=1).status_code == 200
    auth = {"Authorization": f"Bearer {a.token}"}
    c = client(srv)
    ranges = ["bytes=", "bytes=-", "bytes=abc", "bytes=5-2", "bytes=-0", "bytes=99999999999999999999-",
              "bytes=0-99999999999999999999999", "bytes=1-2,3-4", "items=0-5", "bytes=" + "9" * 5000,
              "bytes=\t0-\t1", "bytes=5000-", "bytes=-99999999999999999999"]
    for rng in ranges:
        r = c.get(f"/blobs/{f}/{blob}", headers={**auth, "Range": rng})
        assert r.status_code in (200, 206, 416), (rng, r.status_code, r.text[:200])
        if r.status_code == 416:
            assert_error_shape(r, 416)
    # content types / lengths the JSON routes must refuse cleanly
    ops = json.dumps({"ops": [{"op": "setmeta", "inode": str(f), "base_version": 99, "meta": b64(8)}]}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/json; charset=utf-7", "application/octet-stream"):
        status, got, text = _raw(srv, "POST", "/api/v1/fs/ops", {**auth, "Content-Type": ctype}, ops)
        assert 400 <= status < 500, (ctype, status, text[:200])
        assert not _problems(status, text, got), (ctype, text[:200])
    for value in ("-1", "abc", "1e3", "99999999999999999999999999"):
        status, got, text = _raw(srv, "PUT", f"/api/v1/blobs/{f}/{uuid.uuid4()}",
                                 {**auth, "X-Zkfs-Junk": value, "Content-Type": "application/octet-stream"},
                                 b"data")
        assert status in (201, 400, 409, 422), (value, status, text[:200])
    # a spoofed Host must never be reflected into a redirect (open redirect / cache poisoning)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("GET", f"/api/v1/fs/inodes/{f}/", skip_host=True)
        conn.putheader("Host", "evil.example")
        conn.putheader("Authorization", auth["Authorization"])
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        assert "evil.example" not in (r.getheader("location") or ""), (r.status, r.getheader("location"))
        assert 400 <= r.status < 500, r.status
    finally:
        conn.close()
    # an absurd declared length is refused before any body is read
    for path, method in (("/api/v1/fs/ops", "POST"), (f"/api/v1/blobs/{f}/{uuid.uuid4()}", "PUT")):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            conn.putrequest(method, path)
            conn.putheader("Authorization", auth["Authorization"])
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(10 ** 12))
            conn.endheaders()
            r = conn.getresponse()
            text = r.read().decode()
            assert r.status in (413, 507), (path, r.status, text)
            assert set(json.loads(text)) - {"op_index"} == {"detail", "code"}
        finally:
            conn.close()
    assert "Traceback" not in srv.log()


def test_hostile_json_bodies(fuzz_server):
    srv = fuzz_server
    a = ApiUser(srv)
    c = a.c
    f = a.create(a.root, "f", key=True)
    post = lambda raw, path="/fs/ops": c.post(path, content=raw, headers={"Content-Type": "application/json"})  # noqa: E731
    create = lambda **kw: {"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),  # noqa: E731
                           "parent": str(a.root), "name_hash": nh(uuid.uuid4().hex), "name": b64(8), **kw}
    cases = {
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep object nesting": b'{"ops":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
        "invalid utf-8": b'{"ops": [{"op": "\xff\xfe"}]}',
        "NaN": b'{"ops": [{"op": "setmeta", "inode": "%s", "base_version": NaN, "meta": ""}]}' % str(f).encode(),
        "Infinity": b'{"ops": [{"op": "setmeta", "inode": "%s", "base_version": Infinity, "meta": ""}]}' % str(f).encode(),
        "float version": json.dumps({"ops": [{"op": "setmeta", "inode": str(f), "base_version": 1.5, "meta": ""}]}).encode(),
        "huge exponent": b'{"ops": [{"op": "setmeta", "inode": "%s", "base_version": 1e999999, "meta": ""}]}' % str(f).encode(),
        "huge int": b'{"ops": [{"op": "setmeta", "inode": "%s", "base_version": ' % str(f).encode() + b"9" * 5000 + b', "meta": ""}]}',
        "negative version": json.dumps({"ops": [{"op": "setmeta", "inode": str(f), "base_version": -(2 ** 63) - 5, "meta": ""}]}).encode(),
        "duplicate keys": b'{"ops": [], "ops": [{"op": "rmdir", "parent": "%s", "name_hash": "%s"}]}' % (str(a.root).encode(), nh("zz").encode()),
        "not an object": b'"just a string"',
        "null": b"null",
        "empty": b"",
        "truncated": b'{"ops": [{"op": "create"',
        "1001 ops": json.dumps({"ops": [create() for _ in range(1001)]}).encode(),
        "name too long": json.dumps({"ops": [create(name=b64(5000))]}).encode(),
        "meta too long": json.dumps({"ops": [create(meta=b64(300 * 1024))]}).encode(),
        "too many inline": json.dumps({"ops": [{"op": "commit", "inode": str(f), "base_version": 1, "meta": b64(8),
                                               "manifest": b64(8), "blobs": [],
                                               "inline": [{"blob_id": str(uuid.uuid4()), "data": b64(8)}] * 65}]}).encode(),
        "nul in strings": json.dumps({"ops": [create(name="\u0000" * 8, meta="AAAA\u0000")]}).encode(),
        "unknown op field": json.dumps({"ops": [create(evil="../../x")]}).encode(),
        "unicode hash": json.dumps({"ops": [create(name_hash="\u0660" * 64)]}).encode(),
        "key_gen huge": json.dumps({"ops": [create(key_gen=2 ** 80, wrapped_key=b64(40))]}).encode(),
    }
    failures = []
    for what, raw in cases.items():
        r = post(raw)
        if not 400 <= r.status_code < 500:
            failures.append(f"{what}: {r.status_code} {r.text[:150]}")
            continue
        for problem in _problems(r.status_code, r.text, r.headers.get("content-type", "")):
            failures.append(f"{what}: {r.status_code} {problem}")
    # oversized or junk account fields
    for body in ({"username": "u" * 10_000, "auth_key": b64(32)},
                 {"username": "../../etc", "auth_key": b64(32)},
                 {"username": "a\u0000b", "auth_key": b64(32)},
                 {"username": "ok", "auth_key": "=" * 100},
                 {"username": "ok", "auth_key": b64(10_000)}):
        for path in ("/auth/login", "/users"):
            r = c.post(path, json=body)
            if not 400 <= r.status_code < 500 or _problems(r.status_code, r.text, r.headers.get("content-type", "")):
                failures.append(f"{path} {str(body)[:60]}: {r.status_code} {r.text[:150]}")
    r = c.get("/auth/kdf", params={"username": "x" * 10_000})
    if not 400 <= r.status_code < 500:
        failures.append(f"kdf long username: {r.status_code}")
    for since in ("-1", "abc", "1e309", "9" * 400, ""):
        r = c.get("/fs/changes", params={"since": since})
        if not (r.status_code in (200, 422)) or _problems(r.status_code, r.text, r.headers.get("content-type", "")):
            failures.append(f"changes since={since[:20]}: {r.status_code} {r.text[:150]}")
    assert not failures, "\n".join(failures)
    # the user's tree is intact after all that
    entries = c.get(f"/fs/dirs/{a.root}/entries").json()["entries"]
    assert [e["inode"]["id"] for e in entries] == [str(f)]
    assert "Traceback" not in srv.log()


def test_oversized_json_body_streamed_is_413(fuzz_server):
    """A chunked body (no Content-Length) past the ops JSON cap (16 MiB) is cut off with 413."""
    srv = fuzz_server
    a = ApiUser(srv)

    def gen():
        yield b'{"ops": [{"op": "setmeta", "inode": "%s", "base_version": 1, "meta": "' % str(a.root).encode()
        block = b"A" * (1 << 20)
        for _ in range(20):           # 20 MiB
            yield block
        yield b'"}]}'

    t = time.monotonic()
    r = a.c.post("/fs/ops", content=gen(), headers={"Content-Type": "application/json"}, timeout=120)
    assert_error_shape(r, 413, "too_large")
    assert time.monotonic() - t < 60
    # and the server is fine afterwards
    assert a.c.get("/account").status_code == 200
    assert "Traceback" not in srv.log()


def test_json_bodies_are_capped_at_what_a_real_request_needs(fuzz_server):
    """JSON bodies are refused before anything reads or parses them: past 16 MiB for
    an ops batch (one 150 GiB file's manifest is 8 MiB), past 1 MiB anywhere else.
    (A 192 MiB body used to be parsed in the event loop: 1.44 GB RSS, /health stalled.)"""
    srv = fuzz_server
    a = ApiUser(srv)
    stuffing = {"op": "setmeta", "inode": str(a.root), "base_version": 1, "meta": "A" * (17 << 20)}
    for path, body in (("/fs/ops", {"ops": [stuffing]}),
                       ("/users", {"username": "x", "auth_key": "A" * (2 << 20)}),
                       ("/fs/listings", {"dirs": [str(a.root)] * 60_000}),
                       ("/keys", {"keys": [{"inode": str(a.root), "gen": 1, "wrapped_key": "A" * (2 << 20)}]})):
        raw = json.dumps(body).encode()
        method = "PUT" if path == "/keys" else "POST"
        r = a.c.request(method, path, content=raw, headers={"Content-Type": "application/json"})
        assert_error_shape(r, 413, "too_large")
    # a legitimately large batch still goes through: the largest manifest (8 MiB of base64)
    f = a.create(a.root, "big-manifest")
    r = a.c.post("/fs/ops", json={"ops": [{"op": "commit", "inode": str(f), "base_version": 1, "meta": b64(64),
                                           "manifest": b64(6 << 20), "blobs": []}]})
    assert r.status_code == 200, r.text[:300]
    assert "Traceback" not in srv.log()
