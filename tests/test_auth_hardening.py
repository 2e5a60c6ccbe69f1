"""Authentication hardening, beyond the basics in test_server_api.py (which covers
garbage / alg none / other secret / stale tv / expiry by sleeping, the plain login
throttle and account deletion):

* more forged and malformed tokens and Authorization headers, all a clean 401;
* every GET route with an id, called with another user's token: 404 (generated
  from the OpenAPI spec, so new routes are covered automatically);
* a deleted account's other sessions die, also after the username is re-registered;
* brute force spread over many source addresses is throttled per user (never for
  a device the account already uses), and one address trying many users is
  throttled per address, without revealing whether a user exists; guesses are
  counted before they are checked (concurrent ones too); X-Forwarded-For counts
  only from a configured proxy; password-change guessing is throttled too;
* no secret (password, auth key, KEK, tokens, the server's signing secret) in any
  server, mount or CLI log line after a session that exercises everything;
  secrets at rest keep their modes.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import statistics
import stat
import time
import uuid

import httpx
import pytest
from jose import jwt

from apiuser import ApiUser, assert_error_shape, b64, client, fresh_addr, nh, register_body
from faultkit import make_pattern_file
from server.config import LOGIN_MAX_PER_USER

pytestmark = pytest.mark.timeout(180)


def _secret(srv) -> str:
    m = re.search(r"ZKFS_SECRET_KEY=([0-9a-fA-F]{64})", (srv.data_dir / ".env").read_text())
    assert m, ".env has no signing secret"
    return m.group(1)


def _seg(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


# ------------------------------------------------------------------ tokens
def test_forged_and_malformed_tokens_are_a_clean_401(server):
    a = ApiUser(server)
    secret = _secret(server)
    now = int(time.time())
    good = {"sub": str(a.user_id), "iat": now, "exp": now + 600, "tv": 1,
            "did": jwt.get_unverified_claims(a.token)["did"]}
    assert server.client().get("/account", headers={"Authorization": "Bearer " + jwt.encode(good, secret)}).status_code == 200

    hmac_sig = jwt.encode(good, secret).split(".")[2]
    forged: dict[str, str | bytes] = {
        # alg confusion: "none" in any spelling, with or without a signature
        **{f"alg {alg}": f"{_seg({'alg': alg, 'typ': 'JWT'})}.{_seg(good)}." for alg in ("none", "None", "NONE", "nOnE")},
        "alg none + sig": f"{_seg({'alg': 'none'})}.{_seg(good)}.{hmac_sig}",
        "no alg": f"{_seg({'typ': 'JWT'})}.{_seg(good)}.{hmac_sig}",
        "RS256 header, HMAC body": f"{_seg({'alg': 'RS256', 'typ': 'JWT'})}.{_seg(good)}.{hmac_sig}",
        "header swapped onto another body": f"{jwt.encode(good, secret).split('.')[0]}.{_seg({**good, 'sub': str(uuid.uuid4())})}.{hmac_sig}",
        "HS384": jwt.encode(good, secret, algorithm="HS384"),
        "secret as text not hex": jwt.encode(good, bytes.fromhex(secret).hex().upper()),
        "empty secret": jwt.encode(good, ""),
        # claims of the wrong type or missing
        "sub not a uuid": jwt.encode({**good, "sub": "../../etc/passwd"}, secret),
        "sub int": jwt.encode({**good, "sub": 1}, secret),
        "tv bool": jwt.encode({**good, "tv": True}, secret),
        "tv string": jwt.encode({**good, "tv": "1"}, secret),
        "tv huge": jwt.encode({**good, "tv": 2 ** 70}, secret),
        "no iat": jwt.encode({k: v for k, v in good.items() if k != "iat"}, secret),
        "no exp": jwt.encode({k: v for k, v in good.items() if k != "exp"}, secret),
        "no sub": jwt.encode({k: v for k, v in good.items() if k != "sub"}, secret),
        "exp string": jwt.encode({**good, "exp": str(now + 600)}, secret),
        "nbf future": jwt.encode({**good, "nbf": now + 3600}, secret),
        # structure
        "four segments": jwt.encode(good, secret) + ".x",
        "two segments": ".".join(jwt.encode(good, secret).split(".")[:2]),
        "bad base64": "!!!." + _seg(good) + "." + hmac_sig,
        "json array body": f"{_seg({'alg': 'HS256'})}.{base64.urlsafe_b64encode(b'[1,2]').decode().rstrip('=')}.{hmac_sig}",
        "8 KB junk": "A" * 8192,
        "non-ascii": "Bearer \xff\xfe\u00e9".encode("latin-1"),
    }
    expired = jwt.encode({**good, "iat": now - 100, "exp": now - 10}, secret)
    raw_headers: dict[str, bytes] = {
        "Basic scheme": b"Basic dXNlcjpwYXNz",
        "Bearer only": b"Bearer",
        "double Bearer": ("Bearer Bearer " + jwt.encode(good, secret)).encode(),
        "lowercase token scheme": ("Token " + jwt.encode(good, secret)).encode(),
    }
    c = server.client()
    for what, token in forged.items():
        value = token if isinstance(token, bytes) else ("Bearer " + token).encode()
        r = c.get("/account", headers={"Authorization": value})
        body = assert_error_shape(r, 401)
        # (a well-signed token with a malformed exp may say token_expired: both make clients re-login)
        assert body["code"] in ("token_invalid", "token_expired"), (what, body)
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), (what, r.headers)
        assert a.username not in r.text and str(a.user_id) not in r.text, (what, body)
    for what, value in raw_headers.items():
        assert_error_shape(c.get("/account", headers={"Authorization": value}), 401, "token_invalid")
    assert_error_shape(c.get("/account", headers={"Authorization": f"Bearer {expired}"}), 401, "token_expired")
    # a token is never taken from the query string or a cookie
    assert_error_shape(c.get("/account", params={"access_token": jwt.encode(good, secret)}), 401)
    assert_error_shape(c.get("/account", headers={"Cookie": f"access_token={jwt.encode(good, secret)}"}), 401)
    assert "Traceback" not in server.log()


def test_other_users_token_on_my_ids_is_404_on_every_get_route(server):
    a, b = ApiUser(server), ApiUser(server)
    d = a.create(a.root, "d", is_dir=True)
    f = a.create(d, "f", key=True)
    blob = a.put_blob(f, b"secret bytes of A")
    assert a.commit(f, [blob], base=1).status_code == 200
    values = {"inode": str(f), "blob_id": str(blob), "name_hash": nh("f"), "gen": "1"}
    dir_values = {**values, "inode": str(d)}
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    checked = []
    for path, methods in spec["paths"].items():
        if "get" not in methods or "{" not in path or path.startswith("/s/") or "{username}" in path:
            # /s/: links for anyone, whose id is the capability (tests/test_links.py);
            # public keys are published by username on purpose (tests/test_shares.py)
            continue
        params = re.findall(r"{(\w+)}", path)
        assert set(params) <= set(values), f"new path parameter in {path}: extend this test"
        fill = dir_values if "/dirs/" in path else values
        url = path.removeprefix("/api/v1")
        for name in params:
            url = url.replace("{" + name + "}", fill[name])
        mine = a.c.get(url)
        assert mine.status_code in (200, 206), (url, mine.status_code, mine.text)
        theirs = b.c.get(url)
        assert_error_shape(theirs, 404, "not_found")
        assert str(a.user_id) not in theirs.text and a.username not in theirs.text
        checked.append(url)
    assert len(checked) >= 5, checked
    # the account-wide listings of B show nothing of A
    assert str(f) not in b.c.get("/keys").text
    assert str(f) not in b.c.get("/fs/changes", params={"since": 0}).text


def test_deleted_account_sessions_die_and_stay_dead_after_reregistration(server):
    a = ApiUser(server)
    t1 = a.token
    t2 = a.login()                               # a second session (another device)
    f = a.create(a.root, "f", key=True)
    a.put_blob(f, b"x" * 1000)
    r = a.c.request("DELETE", "/account", headers={"Authorization": f"Bearer {t1}"},
                    json={"auth_key": a.auth_key})
    assert r.status_code == 204, r.text
    probes = [("GET", "/account"), ("GET", f"/fs/inodes/{a.root}"), ("GET", "/keys"),
              ("PUT", f"/blobs/{f}/{uuid.uuid4()}"), ("POST", "/auth/logout"), ("DELETE", "/account")]
    for tok in (t1, t2):
        for method, url in probes:
            r = a.c.request(method, url, headers={"Authorization": f"Bearer {tok}"},
                            content=b"y" if method == "PUT" else None)
            assert_error_shape(r, 401, "token_invalid")
    # the same username registered again is a new account: the old tokens stay dead
    again = ApiUser(server, username=a.username)
    assert again.user_id != a.user_id
    for tok in (t1, t2):
        assert_error_shape(again.c.get("/account", headers={"Authorization": f"Bearer {tok}"}), 401, "token_invalid")
    assert again.c.get(f"/fs/inodes/{f}").status_code == 404
    assert not (server.data_dir / "storage" / str(a.user_id)).exists()


# ------------------------------------------------------------------ brute force
def _login(srv, username: str, key: str, addr: str, device: str | None = None,
           headers: dict | None = None) -> httpx.Response:
    with client(srv, addr, headers=headers) as c:
        return c.post("/auth/login", json={"username": username, "auth_key": key}
                      | ({"device": device} if device else {}))


@pytest.mark.slow
def test_brute_force_is_throttled_per_user_and_per_address(server):
    victim, bystander, other = (ApiUser(server, login=False) for _ in range(3))
    ghost = "ghost" + uuid.uuid4().hex[:8]
    r = _login(server, victim.username, victim.auth_key, fresh_addr())     # the victim's own laptop
    assert r.status_code == 200
    laptop = r.json()["device"]
    assert laptop
    # 1. a distributed guess at one account: every try from a new address
    for name in (victim.username, ghost):
        for _ in range(LOGIN_MAX_PER_USER):
            assert_error_shape(_login(server, name, b64(32), fresh_addr()), 401, "bad_credentials")
    r_victim = _login(server, victim.username, victim.auth_key, fresh_addr())   # a new device: must wait
    r_ghost = _login(server, ghost, b64(32), fresh_addr())
    for r in (r_victim, r_ghost):
        assert_error_shape(r, 429, "throttled")
        assert 1 <= int(r.headers["Retry-After"]) <= 15 * 60, r.headers
    assert r_victim.json() == r_ghost.json(), "throttling reveals whether the user exists"
    # ... but the guessing never locks out a device the account already uses (a mount
    # renewing its token), nor does a stolen-looking credential of another account help
    r = _login(server, victim.username, victim.auth_key, fresh_addr(), device=laptop)
    assert r.status_code == 200, r.text
    assert r.json()["device"] is None                      # the same device, no new credential
    assert_error_shape(_login(server, ghost, b64(32), fresh_addr(), device=laptop), 429, "throttled")
    # ... and it does not spill over to other accounts
    assert _login(server, bystander.username, bystander.auth_key, fresh_addr()).status_code == 200
    # 2. one address trying many accounts: cut off per address, other addresses unaffected
    attacker = fresh_addr()
    statuses = [_login(server, f"guess{i}-{uuid.uuid4().hex[:6]}", b64(32), attacker).status_code
                for i in range(20)]
    assert statuses == [401] * 20, statuses
    r = _login(server, other.username, other.auth_key, attacker)
    assert_error_shape(r, 429, "throttled")
    assert int(r.headers["Retry-After"]) >= 1
    assert _login(server, other.username, other.auth_key, fresh_addr()).status_code == 200
    # 3. guessing the current password through the password change is throttled too
    bystander.login()
    body = {"current_auth_key": b64(32), "new_auth_key": b64(32),
            "new_kdf": {"alg": "argon2id", "salt": b64(16), "memory_kib": 65536, "iterations": 3, "lanes": 4,
                        "check": b64(32)},
            "master_keys": [{"gen": 1, "wrapped_master": b64(40), "wrapped_namespace": b64(40)}]}
    codes = []
    for _ in range(7):
        with client(server, fresh_addr(), headers=bystander.auth) as c:
            codes.append(c.put("/account/password", json=body).status_code)
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}, codes
    assert "Traceback" not in server.log()


def test_concurrent_guesses_are_counted_before_they_are_checked(server):
    """40 guesses at once from one address: only the 5 the limit allows are even
    checked (each attempt is counted atomically before its key is verified)."""
    victim = ApiUser(server, login=False)
    addr = fresh_addr()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda _: _login(server, victim.username, b64(32), addr).status_code, range(40)))
    assert sorted(codes) == [401] * 5 + [429] * 35, sorted(codes)


def test_forwarded_for_is_believed_only_from_configured_proxies(make_server):
    """A caller picks no address of its own with X-Forwarded-For: 25 failures from
    one address with 25 different headers are throttled as one address (uvicorn's
    default believed the header from any caller on 127.0.0.1)."""
    srv = make_server()
    addr = "127.0.0.1"
    codes = [_login(srv, f"guess{i}-{uuid.uuid4().hex[:6]}", b64(32), addr,
                    headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(25)]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}, codes
    # Behind a configured proxy the header names the client: its addresses count apart.
    proxied = make_server(extra_args=["--trusted-proxy", addr])
    codes = [_login(proxied, f"guess{i}-{uuid.uuid4().hex[:6]}", b64(32), addr,
                    headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code for i in range(25)]
    assert codes == [401] * 25, codes


def test_login_and_registration_errors_do_not_reveal_existence(server):
    users = [ApiUser(server, login=False) for _ in range(3)]
    c = server.client()
    known, unknown = [], []
    for i in range(6):
        u = users[i % 3]
        for name, bucket in ((u.username, known), (f"nobody-{uuid.uuid4().hex[:8]}", unknown)):
            t = time.perf_counter()
            r = _login(server, name, b64(32), fresh_addr())
            bucket.append(time.perf_counter() - t)
            assert_error_shape(r, 401, "bad_credentials")
            assert r.json() == {"detail": r.json()["detail"], "code": "bad_credentials"}
            assert name not in r.text
    # an unknown user costs the same hash as a known one (no fast path to probe with)
    assert statistics.median(unknown) > 0.4 * statistics.median(known), (known, unknown)
    # registration: "taken" is the only thing it says, and schema errors look the same either way
    r = c.post("/users", json=register_body(users[0].username, b64(32), uuid.uuid4()))
    assert_error_shape(r, 409, "exists")
    bad_known = c.post("/users", json={**register_body(users[0].username, b64(32), uuid.uuid4()), "auth_key": "x"})
    bad_new = c.post("/users", json={**register_body("free-" + uuid.uuid4().hex[:8], b64(32), uuid.uuid4()), "auth_key": "x"})
    assert bad_known.status_code == bad_new.status_code == 422
    assert bad_known.json() == bad_new.json()
    # the KDF lookup answers unknown names like known ones (shape and status)
    k = c.get("/auth/kdf", params={"username": users[0].username})
    g = c.get("/auth/kdf", params={"username": "nobody-" + uuid.uuid4().hex[:8]})
    assert k.status_code == g.status_code == 200 and set(k.json()["kdf"]) == set(g.json()["kdf"])


# ------------------------------------------------------------------ secrets
def _variants(raw: bytes) -> set[str]:
    return {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="), raw.hex(), raw.hex().upper()}


def test_no_secret_in_any_log_and_secret_files_are_private(make_server, make_machine, make_mount, tmp_path):
    srv = make_server(extra_args=["--log-level", "debug"])
    m = make_machine(srv).register()
    outputs: list[str] = []

    def run(*args, input=None):
        proc = m.run(*args, input=input)
        outputs.extend([proc.stdout, proc.stderr])
        return proc

    secrets: dict[str, str] = {"password": m.password}

    def collect(tag: str) -> None:
        keys = json.loads((m.home / "keys.json").read_text())
        cfg = json.loads((m.home / "config.json").read_text())
        for field in ("auth_key", "kek"):
            for v in _variants(base64.b64decode(keys[field])):
                secrets[f"{field} {tag} {v[:6]}"] = v
        secrets[f"token {tag}"] = cfg["token"]
        secrets[f"token signature {tag}"] = cfg["token"].split(".")[2]

    collect("1")
    src = tmp_path / "doc.bin"
    make_pattern_file(src, 3, seed=7)
    run("--debug", "upload", str(src))
    run("--debug", "ls", "/")
    run("--debug", "download", "/doc.bin", "-o", str(tmp_path / "back.bin"))
    mnt = make_mount(m, "--verbose")
    (mnt.path / "via-mount.txt").write_bytes(b"hello through the mount")
    assert (mnt.path / "doc.bin").read_bytes()[:8] == bytes(8)
    assert sorted(p.name for p in mnt.path.iterdir()) == ["doc.bin", "via-mount.txt"]
    mnt.unmount()
    # a wrong password, a password change and a fresh login, all with --debug
    bad = m.run("--debug", "login", m.username, "--password-stdin", input="wrong password 123\n", check=False)
    outputs.extend([bad.stdout, bad.stderr])
    new_pw = "another long passphrase 42"
    secrets["new password"] = new_pw
    secrets["wrong password"] = "wrong password 123"
    run("--debug", "passwd", "--password-stdin", input=f"{m.password}\n{new_pw}\n")
    m.password = new_pw
    collect("2")
    run("--debug", "ls", "/")
    collect("3")
    secrets["server signing secret"] = _secret(srv)

    logs = {"server log": srv.log_path.read_text(errors="replace")}
    for p in (m.home / "logs").glob("*"):
        logs[f"mount log {p.name}"] = p.read_text(errors="replace")
    logs["CLI output"] = "\n".join(outputs)
    assert "HTTP Request" in logs["CLI output"] or "GET" in logs["server log"]      # logs are not empty
    leaks = [(what, where) for what, value in secrets.items() for where, text in logs.items()
             if len(value) >= 8 and value in text]
    assert not leaks, f"secrets found in logs: {leaks}"
    assert "Authorization" not in logs["server log"] and "Bearer " not in "".join(logs.values())

    # at rest: every client secret file 0600 in a 0700 home, the server's .env 0600
    assert stat.S_IMODE(m.home.stat().st_mode) & 0o077 == 0, oct(m.home.stat().st_mode)
    for name in ("config.json", "keys.json", "versions.db"):
        assert stat.S_IMODE((m.home / name).stat().st_mode) == 0o600, name
    # (the mount's cache and spool live under that 0700 home and hold only ciphertext)
    assert stat.S_IMODE((srv.data_dir / ".env").stat().st_mode) == 0o600
    assert stat.S_IMODE((srv.data_dir / "app.db").stat().st_mode) & 0o077 == 0
