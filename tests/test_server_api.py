"""End-to-end tests of the zkfs server API against real uvicorn processes.

Random bytes stand in for all key material and ciphertext: the server cannot
tell the difference (it never interprets them).
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import stat
import time
import uuid
from pathlib import Path

import httpx
import pytest
from jose import jwt

from server.config import ORPHAN_MAX_AGE, STAGED_MAX_AGE

from apiuser import ApiUser as Account, b64, kdf, nh

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends]


# ------------------------------------------------------------------ helpers
def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) - {"op_index"} == {"detail", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["detail"], str)


def rename(src_parent, src: str, dst_parent, dst: str, **kw) -> dict:
    return {"op": "rename", "src_parent": str(src_parent), "src_hash": nh(src),
            "dst_parent": str(dst_parent), "dst_hash": nh(dst), "dst_name": b64(24), **kw}


def unlink(parent, name: str, **kw) -> dict:
    return {"op": "unlink", "parent": str(parent), "name_hash": nh(name), **kw}


def metadata_bytes(srv, user_id) -> int:
    """Bytes of encrypted attributes, manifests, wrapped keys and names the server
    keeps for an account (they count toward its quota), read out of band."""
    uid = str(user_id)
    inodes = srv.query("SELECT coalesce(sum(length(meta) + coalesce(length(manifest), 0)"
                       " + coalesce(length(wrapped_key), 0)), 0) FROM inodes WHERE user_id = ?", uid)[0][0]
    names = srv.query("SELECT coalesce(sum(length(name)), 0) FROM dentries WHERE user_id = ?", uid)[0][0]
    return inodes + names


# ------------------------------------------------------------------ accounts
def test_health_and_error_shape(shared_server):
    c = shared_server.client()
    assert c.get("/health").json() == {"status": "ok"}
    assert_error(c.get("/no/such/route"), 404, "not_found")
    assert_error(c.post("/users", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "validation")
    r = c.post("/users", json={"username": "x"})
    assert_error(r, 422, "validation")
    assert "\n" not in r.json()["detail"]


def test_register_login_account(shared_server):
    a = Account(shared_server)
    r = a.c.get("/account")
    assert r.status_code == 200
    body = r.json()
    assert body["username"] == a.username and body["user_id"] == str(a.user_id)
    assert body["root_inode"] == str(a.root) and body["current_gen"] == 1
    assert body["kdf"] == a.kdf and [m["gen"] for m in body["master_keys"]] == [1]
    root = a.inode(a.root)
    assert root["is_dir"] and root["version"] == 1 and root["nlink"] == 2
    assert a.names(a.root) == {}
    # duplicate username
    c = shared_server.client()
    r = c.post("/users", json={
        "username": a.username, "auth_key": b64(32), "kdf": kdf(),
        "master_key": {"gen": 1, "wrapped_master": b64(40), "wrapped_namespace": b64(40)},
        "root_inode": str(uuid.uuid4()), "root_meta": b64(10)})
    assert_error(r, 409, "exists")


def test_kdf_lookup_and_decoy(shared_server):
    a = Account(shared_server, login=False)
    c = shared_server.client()
    real = c.get("/auth/kdf", params={"username": a.username})
    assert real.status_code == 200 and real.json()["kdf"] == a.kdf
    ghost = "ghost" + uuid.uuid4().hex[:8]
    d1 = c.get("/auth/kdf", params={"username": ghost})
    d2 = c.get("/auth/kdf", params={"username": ghost})
    other = c.get("/auth/kdf", params={"username": ghost + "x"})
    assert d1.status_code == 200 and d1.json() == d2.json()          # stable
    assert d1.json()["kdf"]["salt"] != other.json()["kdf"]["salt"]    # per-name
    assert set(d1.json()["kdf"]) == set(real.json()["kdf"])          # same shape
    assert len(base64.b64decode(d1.json()["kdf"]["salt"])) == len(base64.b64decode(a.kdf["salt"]))
    assert_error(c.get("/auth/kdf", params={"username": "../etc"}), 422, "validation")


def test_login_failures_look_identical_and_throttle(server):
    a = Account(server, login=False)
    c = server.client()
    wrong = c.post("/auth/login", json={"username": a.username, "auth_key": b64(32)})
    unknown = c.post("/auth/login", json={"username": "nobody" + a.username, "auth_key": b64(32)})
    assert_error(wrong, 401, "bad_credentials")
    assert_error(unknown, 401, "bad_credentials")
    assert wrong.json() == unknown.json()
    for _ in range(4):
        assert c.post("/auth/login", json={"username": a.username, "auth_key": b64(32)}).status_code == 401
    # 5 failures for this username from this address: this address may not try again...
    r = c.post("/auth/login", json={"username": a.username, "auth_key": a.auth_key})
    assert_error(r, 429, "throttled")
    assert int(r.headers["Retry-After"]) > 0
    # ... but the guessing does not lock the owner out: the right key from elsewhere works
    assert a.login() and a.c.get("/account").status_code == 200
    # per-address limit: 20 failures from this address across usernames
    for i in range(14):
        c.post("/auth/login", json={"username": f"n{i}" + a.username, "auth_key": b64(32)})
    b = Account(server, login=False)
    r = c.post("/auth/login", json={"username": b.username, "auth_key": b.auth_key})
    assert_error(r, 429, "throttled")


def test_tokens(make_server):
    srv = make_server(env={"ZKFS_TOKEN_TTL_SECONDS": "2"})
    a = Account(srv)
    assert a.c.get("/account").status_code == 200
    secret = srv.secret()
    now = int(time.time())
    claims = {"sub": str(a.user_id), "iat": now, "exp": now + 600, "tv": 1,
              "did": jwt.get_unverified_claims(a.token)["did"]}

    def status_with(token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return srv.client().get("/account", headers=headers)

    assert status_with(jwt.encode(claims, secret, algorithm="HS256")).status_code == 200
    assert_error(status_with(None), 401, "token_invalid")
    assert_error(status_with("garbage"), 401, "token_invalid")
    assert_error(status_with("a.b.c"), 401, "token_invalid")
    # alg: none
    def seg(d): return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    assert_error(status_with(f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims)}."), 401, "token_invalid")
    # signed with another secret / another algorithm family
    assert_error(status_with(jwt.encode(claims, "0" * 64, algorithm="HS256")), 401, "token_invalid")
    assert_error(status_with(jwt.encode(claims, secret, algorithm="HS512")), 401, "token_invalid")
    # stale token version, user id that does not exist, missing tv
    assert_error(status_with(jwt.encode({**claims, "tv": 0}, secret)), 401, "token_invalid")
    assert_error(status_with(jwt.encode({**claims, "sub": str(uuid.uuid4())}, secret)), 401, "token_invalid")
    no_tv = {k: v for k, v in claims.items() if k != "tv"}
    assert_error(status_with(jwt.encode(no_tv, secret)), 401, "token_invalid")
    # a device (session) that is not the user's, or no device at all
    assert_error(status_with(jwt.encode({**claims, "did": str(uuid.uuid4())}, secret)), 401, "token_invalid")
    no_did = {k: v for k, v in claims.items() if k != "did"}
    assert_error(status_with(jwt.encode(no_did, secret)), 401, "token_invalid")
    # expired (TTL is 2 s for this server)
    old = a.token
    time.sleep(2.2)
    assert_error(status_with(old), 401, "token_expired")


def test_password_change_logout_and_delete_account(server):
    a = Account(server)
    old_token = a.token
    t2 = a.c.post("/auth/login", json={"username": a.username, "auth_key": a.auth_key}).json()["access_token"]
    new_key, new_kdf = b64(32), kdf()
    body = {"current_auth_key": b64(32), "new_auth_key": new_key, "new_kdf": new_kdf,
            "master_keys": [{"gen": 1, "wrapped_master": b64(40), "wrapped_namespace": b64(40)}]}
    assert_error(a.c.put("/account/password", json=body), 401, "bad_credentials")
    body["current_auth_key"] = a.auth_key
    bad = {**body, "master_keys": [{"gen": 2, "wrapped_master": b64(40), "wrapped_namespace": b64(40)}]}
    assert_error(a.c.put("/account/password", json=bad), 400, "invalid")
    r = a.c.put("/account/password", json=body)
    assert r.status_code == 200, r.text
    fresh = r.json()["access_token"]
    for stale in (old_token, t2):
        assert_error(a.c.get("/account", headers={"Authorization": f"Bearer {stale}"}), 401, "token_invalid")
    a.c.headers["Authorization"] = f"Bearer {fresh}"
    acct = a.c.get("/account").json()
    assert acct["kdf"] == new_kdf and acct["master_keys"] == body["master_keys"]
    assert a.c.post("/auth/login", json={"username": a.username, "auth_key": a.auth_key}).status_code == 401
    a.auth_key = new_key
    a.login()
    # logout ends this device's session only; ?all=true ends every device's
    other = a.token
    a.login()
    assert a.c.post("/auth/logout").status_code == 204
    assert_error(a.c.get("/account"), 401, "token_invalid")
    assert a.c.get("/account", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    a.login()
    assert a.c.post("/auth/logout", params={"all": "true"}).status_code == 204
    assert_error(a.c.get("/account"), 401, "token_invalid")
    assert_error(a.c.get("/account", headers={"Authorization": f"Bearer {other}"}), 401, "token_invalid")
    a.login()
    # delete the account (a token alone is not enough: a fresh proof of the key is):
    # data and storage gone, token dead, username free again
    f = a.create(a.root, "f", key=True)
    a.put_blob(f, b"x" * 100)
    assert server.stored_objects(a.user_id)
    assert_error(a.c.request("DELETE", "/account"), 422, "validation")
    assert_error(a.c.request("DELETE", "/account", json={"auth_key": b64(32)}), 401, "bad_credentials")
    assert server.stored_objects(a.user_id) and a.c.get("/account").status_code == 200
    assert a.c.request("DELETE", "/account", json={"auth_key": new_key}).status_code == 204
    assert not server.stored_objects(a.user_id)
    assert_error(a.c.get("/account"), 401, "token_invalid")
    assert_error(a.c.post("/auth/login", json={"username": a.username, "auth_key": new_key}),
                 401, "bad_credentials")
    Account(server, username=a.username)


def test_master_keys(shared_server):
    a = Account(shared_server)
    mk = lambda g: {"master_key": {"gen": g, "wrapped_master": b64(40), "wrapped_namespace": b64(40)},  # noqa: E731
                    "auth_key": a.auth_key}
    proof = {"auth_key": a.auth_key}
    # replacing master keys needs a fresh proof of the password-derived key
    assert_error(a.c.post("/account/master-keys", json={**mk(2), "auth_key": b64(32)}), 401, "bad_credentials")
    assert_error(a.c.request("DELETE", "/account/master-keys/1", json={"auth_key": b64(32)}),
                 401, "bad_credentials")
    assert_error(a.c.post("/account/master-keys", json=mk(3)), 409, "conflict")
    assert a.c.post("/account/master-keys", json=mk(2)).status_code == 204
    acct = a.c.get("/account").json()
    assert acct["current_gen"] == 2 and [m["gen"] for m in acct["master_keys"]] == [1, 2]
    f = a.create(a.root, "f", key=True)            # key gen 1
    assert_error(a.c.request("DELETE", "/account/master-keys/2", json=proof), 409, "in_use")   # current
    assert_error(a.c.request("DELETE", "/account/master-keys/1", json=proof), 409, "in_use")   # f uses it
    assert_error(a.c.request("DELETE", "/account/master-keys/9", json=proof), 404, "not_found")
    # re-wrap f's key under gen 2, then gen 1 can go
    r = a.c.put("/keys", json={"keys": [{"inode": str(f), "gen": 2, "wrapped_key": b64(40)}]})
    assert r.status_code == 204, r.text
    assert a.c.request("DELETE", "/account/master-keys/1", json=proof).status_code == 204
    assert [m["gen"] for m in a.c.get("/account").json()["master_keys"]] == [2]


def test_file_keys(shared_server):
    a = Account(shared_server)
    key = b64(40)
    f = uuid.uuid4()
    a.ok({"op": "create", "inode": str(f), "is_dir": False, "meta": b64(8), "parent": str(a.root),
          "name_hash": nh("f"), "name": b64(8), "key_gen": 1, "wrapped_key": key})
    assert a.c.get(f"/fs/inodes/{f}/key").json() == {"inode": str(f), "gen": 1, "wrapped_key": key, "share": None}
    d = a.create(a.root, "d", is_dir=True)
    assert_error(a.c.get(f"/fs/inodes/{d}/key"), 404, "not_found")
    assert_error(a.c.get(f"/fs/inodes/{uuid.uuid4()}/key"), 404, "not_found")
    g = a.create(a.root, "g", key=True)
    keys = {k["inode"]: k for k in a.c.get("/keys").json()["keys"]}
    assert set(keys) == {str(f), str(g)}
    new = b64(40)
    assert a.c.put("/keys", json={"keys": [{"inode": str(f), "gen": 1, "wrapped_key": new}]}).status_code == 204
    assert a.c.get(f"/fs/inodes/{f}/key").json()["wrapped_key"] == new
    # failing batch changes nothing (unknown gen / unknown inode / bad base64)
    for bad in ({"inode": str(g), "gen": 7, "wrapped_key": b64(40)},
                {"inode": str(uuid.uuid4()), "gen": 1, "wrapped_key": b64(40)},
                {"inode": str(g), "gen": 1, "wrapped_key": "abc"}):
        r = a.c.put("/keys", json={"keys": [{"inode": str(f), "gen": 1, "wrapped_key": b64(40)}, bad]})
        assert r.status_code in (400, 404, 409), r.text
        assert a.c.get(f"/fs/inodes/{f}/key").json()["wrapped_key"] == new
    # a directory cannot carry a key
    r = a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": True, "meta": b64(8),
               "parent": str(a.root), "name_hash": nh("dk"), "name": b64(8), "key_gen": 1,
               "wrapped_key": b64(40)})
    assert_error(r, 400, "invalid")
    # a create under a generation the account does not have (retired by a rotate-key)
    r = a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
               "parent": str(a.root), "name_hash": nh("old"), "name": b64(8), "key_gen": 7,
               "wrapped_key": b64(40)})
    assert_error(r, 409, "unknown_key_gen")


# ------------------------------------------------------------------ namespace
def test_create_lookup_list_nlink(shared_server):
    a = Account(shared_server)
    d = a.create(a.root, "dir", is_dir=True)
    f = a.create(d, "file")
    assert_error(a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
                        "parent": str(d), "name_hash": nh("file"), "name": b64(8)}), 409, "exists")
    assert_error(a.ops({"op": "create", "inode": str(f), "is_dir": False, "meta": b64(8),
                        "parent": str(d), "name_hash": nh("other"), "name": b64(8)}), 409, "exists")
    assert_error(a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
                        "parent": str(f), "name_hash": nh("x"), "name": b64(8)}), 409, "not_dir")
    assert_error(a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
                        "parent": str(uuid.uuid4()), "name_hash": nh("x"), "name": b64(8)}), 404, "not_found")
    e = a.c.get(f"/fs/dirs/{d}/entries/{nh('file')}").json()
    assert e["inode"]["id"] == str(f) and e["inode"]["nlink"] == 1 and e["inode"]["version"] == 1
    assert e["inode"]["manifest"] is None
    assert_error(a.c.get(f"/fs/dirs/{d}/entries/{nh('nope')}"), 404, "not_found")
    assert_error(a.c.get(f"/fs/dirs/{f}/entries"), 404, "not_found")
    # POSIX nlink for directories: 2 + subdirectories
    a.create(d, "sub1", is_dir=True)
    a.create(d, "sub2", is_dir=True)
    assert a.inode(d)["nlink"] == 4
    assert a.inode(a.root)["nlink"] == 3
    # hard links
    a.ok({"op": "link", "inode": str(f), "parent": str(a.root), "name_hash": nh("hl"), "name": b64(8)})
    assert a.inode(f)["nlink"] == 2
    assert a.names(a.root)[nh("hl")]["inode"]["nlink"] == 2
    assert_error(a.ops({"op": "link", "inode": str(d), "parent": str(a.root), "name_hash": nh("dl"),
                        "name": b64(8)}), 409, "is_dir")
    assert_error(a.ops({"op": "link", "inode": str(f), "parent": str(a.root), "name_hash": nh("hl"),
                        "name": b64(8)}), 409, "exists")
    a.ok(unlink(a.root, "hl"))
    assert a.inode(f)["nlink"] == 1


def test_listings_of_several_dirs(shared_server):
    """POST /fs/listings: each listing as its own GET gives it, in the order asked,
    from one request; ids that are not this account's directories are left out."""
    a, b = Account(shared_server), Account(shared_server)
    dirs = [a.create(a.root, f"d{i}", is_dir=True) for i in range(3)]
    for i, d in enumerate(dirs):
        for j in range(i + 1):
            a.create(d, f"f{j}")
    a_file = next(iter(a.names(dirs[0]).values()))["inode"]["id"]
    b_dir = b.create(b.root, "bd", is_dir=True)
    asked = [dirs[2], uuid.uuid4(), a_file, b_dir, dirs[0], dirs[2]]
    r = a.c.post("/fs/listings", json={"dirs": [str(d) for d in asked]})
    assert r.status_code == 200, r.text
    got = r.json()["listings"]
    assert [x["dir"]["id"] for x in got] == [str(dirs[2]), str(dirs[0])]
    for x in got:
        assert x == a.c.get(f"/fs/dirs/{x['dir']['id']}/entries").json()
    assert b.c.post("/fs/listings", json={"dirs": [str(d) for d in dirs]}).json() == {"listings": []}
    assert_error(a.c.post("/fs/listings", json={"dirs": []}), 422, "validation")
    assert_error(a.c.post("/fs/listings", json={"dirs": [str(dirs[0])] * 257}), 422, "validation")
    assert_error(a.c.post("/fs/listings", json={"dirs": ["nope"]}), 422, "validation")

    # The answer is bounded: whole listings, in order, up to the first that would not fit.
    db = shared_server.metadata()
    sizes = lambda found: [(d.id, len(entries)) for d, entries in found]    # noqa: E731
    order = [dirs[2], dirs[0], dirs[1]]                                   # 3, 1 and 2 entries
    assert sizes(db.list_entries_many(a.user_id, order, 6)) == [(dirs[2], 3), (dirs[0], 1), (dirs[1], 2)]
    assert sizes(db.list_entries_many(a.user_id, order, 5)) == [(dirs[2], 3), (dirs[0], 1)]
    assert sizes(db.list_entries_many(a.user_id, order, 3)) == [(dirs[2], 3)]
    assert sizes(db.list_entries_many(a.user_id, order, 2)) == []


def test_unlink_rmdir(shared_server):
    a = Account(shared_server)
    d = a.create(a.root, "d", is_dir=True)
    f = a.create(d, "f", key=True)
    blob = a.put_blob(f, b"data")
    assert a.commit(f, [blob]).status_code == 200
    assert_error(a.ops(unlink(a.root, "d")), 409, "is_dir")
    assert_error(a.ops({"op": "rmdir", "parent": str(a.root), "name_hash": nh("d")}), 409, "not_empty")
    assert_error(a.ops({"op": "rmdir", "parent": str(d), "name_hash": nh("f")}), 409, "not_dir")
    assert_error(a.ops(unlink(d, "nope")), 404, "not_found")
    assert_error(a.ops(unlink(d, "f", expect_inode=str(uuid.uuid4()))), 409, "stale")
    assert shared_server.stored_objects(a.user_id) == {f"{a.user_id}/{f}/{blob}"}
    res = a.ok(unlink(d, "f", expect_inode=str(f)))
    assert res["results"][0]["inode"] == str(f)
    assert_error(a.c.get(f"/fs/inodes/{f}"), 404, "not_found")
    assert not shared_server.stored_objects(a.user_id)               # blobs deleted
    a.ok({"op": "rmdir", "parent": str(a.root), "name_hash": nh("d")})
    assert_error(a.c.get(f"/fs/inodes/{d}"), 404, "not_found")
    assert a.names(a.root) == {}
    assert a.inode(a.root)["nlink"] == 2


def test_rename_posix_cases(shared_server):
    a = Account(shared_server)
    R = a.root
    f1, f2 = a.create(R, "f1"), a.create(R, "f2")
    d1, d2 = a.create(R, "d1", is_dir=True), a.create(R, "d2", is_dir=True)
    d3 = a.create(R, "d3", is_dir=True)
    a.create(d3, "inner")
    # simple move into a directory, with a new name
    a.ok(rename(R, "f1", d1, "g1"))
    assert nh("f1") not in a.names(R) and a.names(d1)[nh("g1")]["inode"]["id"] == str(f1)
    a.ok(rename(d1, "g1", R, "f1"))
    # file over file replaces it (replaced inode deleted)
    a.ok(rename(R, "f1", R, "f2"))
    assert a.names(R)[nh("f2")]["inode"]["id"] == str(f1)
    assert_error(a.c.get(f"/fs/inodes/{f2}"), 404, "not_found")
    # noreplace
    f3 = a.create(R, "f3")
    assert_error(a.ops(rename(R, "f3", R, "f2", noreplace=True)), 409, "exists")
    # type mismatches
    assert_error(a.ops(rename(R, "f3", R, "d1")), 409, "is_dir")
    assert_error(a.ops(rename(R, "d1", R, "f3")), 409, "not_dir")
    # dir over non-empty dir / over empty dir
    assert_error(a.ops(rename(R, "d1", R, "d3")), 409, "not_empty")
    a.ok(rename(R, "d1", R, "d2"))
    assert a.names(R)[nh("d2")]["inode"]["id"] == str(d1)
    assert_error(a.c.get(f"/fs/inodes/{d2}"), 404, "not_found")
    # rename onto itself and onto another name of the same inode: no-ops
    a.ok(rename(R, "f3", R, "f3"))
    a.ok({"op": "link", "inode": str(f3), "parent": str(R), "name_hash": nh("f3b"), "name": b64(8)})
    a.ok(rename(R, "f3", R, "f3b"))
    names = a.names(R)
    assert names[nh("f3")]["inode"]["id"] == names[nh("f3b")]["inode"]["id"] == str(f3)
    assert a.inode(f3)["nlink"] == 2
    # a directory cannot move into itself or a descendant
    sub = a.create(d1, "sub", is_dir=True)
    subsub = a.create(sub, "subsub", is_dir=True)
    assert_error(a.ops(rename(R, "d2", d1, "x")), 409, "invalid_move")
    assert_error(a.ops(rename(R, "d2", subsub, "x")), 409, "invalid_move")
    # but moving a subdir up is fine, and nlink follows
    assert a.inode(d1)["nlink"] == 3
    a.ok(rename(sub, "subsub", R, "up"))
    assert a.inode(sub)["nlink"] == 2
    # missing source / missing target parent / target parent a file
    assert_error(a.ops(rename(R, "zz", R, "yy")), 404, "not_found")
    assert_error(a.ops(rename(R, "f3", uuid.uuid4(), "yy")), 404, "not_found")
    assert_error(a.ops(rename(R, "f3", f3, "yy")), 409, "not_dir")


def test_rename_expectations_exchange_and_op_index(shared_server):
    """A client sealing a folder's entry digest states which inodes it removes or
    replaces: any other gives 409 stale (naming the op), nothing applied."""
    a = Account(shared_server)
    R = a.root
    f, g = a.create(R, "f"), a.create(R, "g")
    d = a.create(R, "d", is_dir=True)
    inner = a.create(d, "inner", is_dir=True)
    r = a.ops(rename(R, "f", R, "g", src_inode=str(g)))
    assert_error(r, 409, "stale")
    r = a.ops({"op": "setmeta", "inode": str(f), "base_version": 1, "meta": b64(3)},
              rename(R, "f", R, "g", src_inode=str(f), dst_inode=str(f)))
    assert_error(r, 409, "stale")
    assert r.json()["op_index"] == 1
    assert a.inode(f)["version"] == 1                            # the whole batch or nothing
    assert_error(a.ops(rename(R, "f", R, "new", src_inode=str(f), dst_inode=str(g))), 409, "stale")
    a.ok(rename(R, "f", R, "g", src_inode=str(f), dst_inode=str(g)))
    assert a.names(R)[nh("g")]["inode"]["id"] == str(f)
    assert_error(a.ops(unlink(R, "g", expect_inode=str(g))), 409, "stale")

    def exchange(ap, an, ai, bp, bn, bi):
        return {"op": "exchange", "a_parent": str(ap), "a_hash": nh(an), "a_inode": str(ai), "a_name": b64(20),
                "b_parent": str(bp), "b_hash": nh(bn), "b_inode": str(bi), "b_name": b64(21)}

    a.ok(exchange(R, "g", f, R, "d", d))                        # a file and a folder swap names
    names = a.names(R)
    assert names[nh("g")]["inode"]["id"] == str(d) and names[nh("g")]["inode"]["is_dir"]
    assert names[nh("d")]["inode"]["id"] == str(f) and not names[nh("d")]["inode"]["is_dir"]
    assert_error(a.ops(exchange(R, "g", f, R, "d", d)), 409, "stale")
    assert_error(a.ops(exchange(R, "g", d, R, "nope", f)), 404, "not_found")
    # a folder cannot swap places with something inside it
    assert_error(a.ops(exchange(R, "g", d, d, "inner", inner)), 409, "invalid_move")


def test_rename_keep_orphan_and_delete_inode(shared_server):
    a = Account(shared_server)
    R = a.root
    f, g = a.create(R, "f", key=True), a.create(R, "g", key=True)
    blob = a.put_blob(g, b"g-data")
    assert a.commit(g, [blob]).status_code == 200
    a.ok(rename(R, "f", R, "g", keep_orphan=True))
    orphan = a.inode(g)                                    # still readable while open
    assert orphan["nlink"] == 0
    assert a.c.get(f"/blobs/{g}/{blob}").content == b"g-data"
    assert_error(a.ops({"op": "delete_inode", "inode": str(f)}), 409, "in_use")
    assert_error(a.ops({"op": "delete_inode", "inode": str(R)}), 409, "in_use")
    a.ok({"op": "delete_inode", "inode": str(g)})
    assert_error(a.c.get(f"/fs/inodes/{g}"), 404, "not_found")
    assert not any(o.split("/")[1] == str(g) for o in shared_server.stored_objects(a.user_id))
    # unlink with keep_orphan, then re-link (orphan revived)
    a.ok(unlink(R, "g", keep_orphan=True))
    assert a.inode(f)["nlink"] == 0
    a.ok({"op": "link", "inode": str(f), "parent": str(R), "name_hash": nh("back"), "name": b64(8)})
    assert a.inode(f)["nlink"] == 1
    assert_error(a.ops({"op": "delete_inode", "inode": str(uuid.uuid4())}), 404, "not_found")


def test_setmeta_cas_and_versions(shared_server):
    a = Account(shared_server)
    f = a.create(a.root, "f")
    m = b64(30)
    res = a.ok({"op": "setmeta", "inode": str(f), "base_version": 1, "meta": m})
    assert res["results"] == [{"inode": str(f), "version": 2}]
    assert a.inode(f)["meta"] == m and a.inode(f)["version"] == 2
    assert_error(a.ops({"op": "setmeta", "inode": str(f), "base_version": 1, "meta": b64(3)}), 409, "conflict")
    assert a.inode(f)["meta"] == m
    # two CAS steps in one batch
    res = a.ok({"op": "setmeta", "inode": str(f), "base_version": 2, "meta": b64(3)},
               {"op": "setmeta", "inode": str(f), "base_version": 3, "meta": m})
    assert [r["version"] for r in res["results"]] == [3, 4]


def test_commit_blobs_and_gc(shared_server):
    a = Account(shared_server)
    f = a.create(a.root, "f", key=True)
    b1 = a.put_blob(f, b"one" * 1000)
    b2 = a.put_blob(f, b"two" * 1000)
    assert_error(a.c.put(f"/blobs/{f}/{b1}", content=b"again"), 409, "exists")   # immutable
    # commit referencing a blob that was never stored -> invalid, nothing changes
    assert_error(a.commit(f, [b1, uuid.uuid4()]), 400, "invalid")
    assert a.inode(f)["version"] == 1
    # commit with staged + inline blobs
    b3 = uuid.uuid4()
    r = a.commit(f, [b1, b2, b3], inline=[(b3, b"three")])
    assert r.status_code == 200, r.text
    ino = a.inode(f)
    assert ino["version"] == 2 and ino["manifest"] is not None
    assert a.c.get(f"/blobs/{f}/{b3}").content == b"three"
    assert a.c.get(f"/blobs/{f}/{b1}").content == b"one" * 1000
    # stale base_version
    assert_error(a.commit(f, [b1], base=1), 409, "conflict")
    # new version dropping b1 and b3: they are deleted after the commit
    b4 = a.put_blob(f, b"four")
    staged = a.put_blob(f, b"staged, not referenced")
    assert a.commit(f, [b2, b4]).status_code == 200
    for gone in (b1, b3):
        assert_error(a.c.get(f"/blobs/{f}/{gone}"), 404, "not_found")
    # b1 and b3 deleted; staged blobs are left to the cleaner; no temp file left
    assert shared_server.stored_objects(a.user_id) == {f"{a.user_id}/{f}/{b}" for b in (b2, b4, staged)}
    # inline blob with invalid base64 -> invalid; inline id already stored -> exists
    r = a.ops({"op": "commit", "inode": str(f), "base_version": 3, "meta": b64(8), "manifest": b64(8),
               "blobs": [], "inline": [{"blob_id": str(uuid.uuid4()), "data": "abc"}]})
    assert_error(r, 400, "invalid")
    assert_error(a.commit(f, [b2], inline=[(b2, b"x")]), 409, "exists")
    assert a.c.get(f"/blobs/{f}/{b2}").content == b"two" * 1000
    # blobs on a directory / unknown inode
    assert_error(a.c.put(f"/blobs/{a.root}/{uuid.uuid4()}", content=b"x"), 409, "is_dir")
    # chunks may be staged before the request that creates their inode
    g, gb = uuid.uuid4(), uuid.uuid4()
    assert a.c.put(f"/blobs/{g}/{gb}", content=b"early").status_code == 201
    r = a.ops({"op": "create", "inode": str(g), "is_dir": False, "meta": b64(8), "parent": str(a.root),
               "name_hash": nh("g"), "name": b64(8)},
              {"op": "commit", "inode": str(g), "base_version": 1, "meta": b64(8), "manifest": b64(8),
               "blobs": [str(gb)]})
    assert r.status_code == 200, r.text
    assert a.c.get(f"/blobs/{g}/{gb}").content == b"early"
    # statfs counts committed and staged bytes
    st = a.c.get("/fs/statfs").json()
    assert st["quota_bytes"] is None
    blob_bytes = 3000 + 4 + len(b"staged, not referenced") + len(b"early")
    assert st["used_bytes"] == blob_bytes + metadata_bytes(shared_server, a.user_id)
    assert st["free_bytes"] > 0


def test_ops_atomicity(shared_server):
    a = Account(shared_server)
    f = a.create(a.root, "f")
    new_inode = uuid.uuid4()
    inline_blob = uuid.uuid4()
    r = a.ops({"op": "create", "inode": str(new_inode), "is_dir": False, "meta": b64(8),
               "parent": str(a.root), "name_hash": nh("new"), "name": b64(8),
               "key_gen": 1, "wrapped_key": b64(40)},
              {"op": "setmeta", "inode": str(f), "base_version": 1, "meta": b64(8)},
              {"op": "commit", "inode": str(new_inode), "base_version": 1, "meta": b64(8),
               "manifest": b64(8), "blobs": [str(inline_blob)],
               "inline": [{"blob_id": str(inline_blob), "data": b64(100)}]},
              {"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
               "parent": str(uuid.uuid4()), "name_hash": nh("x"), "name": b64(8)})
    assert_error(r, 404, "not_found")
    assert "op 3" in r.json()["detail"]
    assert nh("new") not in a.names(a.root)
    assert_error(a.c.get(f"/fs/inodes/{new_inode}"), 404, "not_found")
    assert a.inode(f)["version"] == 1
    assert shared_server.stored_objects(a.user_id) == set()
    # results of a successful batch
    res = a.ok(rename(a.root, "f", a.root, "g"), {"op": "setmeta", "inode": str(f), "base_version": 1,
                                                 "meta": b64(8)})
    assert res["results"][1] == {"inode": str(f), "version": 2}
    assert_error(a.c.post("/fs/ops", json={"ops": []}), 422, "validation")


def test_a_batch_sent_again_is_applied_once(shared_server):
    """A client that lost the answer to a batch (cut connection, crash) sends it again
    with the same batch_id: it gets the first answer, and nothing is applied twice."""
    a = Account(shared_server)
    f = a.create(a.root, "f")
    ino, blob, batch = uuid.uuid4(), uuid.uuid4(), str(uuid.uuid4())
    body = {"batch_id": batch, "ops": [
        {"op": "create", "inode": str(ino), "is_dir": False, "meta": b64(8), "parent": str(a.root),
         "name_hash": nh("new"), "name": b64(8), "key_gen": 1, "wrapped_key": b64(40)},
        {"op": "commit", "inode": str(ino), "base_version": 1, "meta": b64(8), "manifest": b64(8),
         "blobs": [str(blob)], "inline": [{"blob_id": str(blob), "data": b64(100)}]},
        {"op": "setmeta", "inode": str(f), "base_version": 1, "meta": b64(8)}]}
    first = a.c.post("/fs/ops", json=body)
    assert first.status_code == 200, first.text
    seq = first.json()["seq"]
    again = a.c.post("/fs/ops", json=body)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert a.inode(f)["version"] == 2 and a.inode(ino)["version"] == 2
    assert a.c.get("/fs/changes", params={"since": seq}).json()["inodes"] == []
    # the same ops under a new id are a new batch: refused as stale (setmeta's base moved)
    r = a.c.post("/fs/ops", json=body | {"batch_id": str(uuid.uuid4())})
    assert r.status_code == 409, r.text
    # another account's batch with that id is its own
    b = Account(shared_server)
    r = b.c.post("/fs/ops", json={"batch_id": batch, "ops": [
        {"op": "setmeta", "inode": str(b.root), "base_version": 1, "meta": b64(8)}]})
    assert r.status_code == 200 and r.json()["results"] == [{"inode": str(b.root), "version": 2}], r.text
    assert a.inode(f)["version"] == 2
    assert_error(a.c.post("/fs/ops", json=body | {"batch_id": "nope"}), 422, "validation")


def test_changes_feed(shared_server):
    a = Account(shared_server)
    seq0 = a.c.get("/fs/changes", params={"since": 0}).json()["seq"]
    d = a.create(a.root, "d", is_dir=True)
    ch = a.c.get("/fs/changes", params={"since": seq0}).json()
    assert ch["seq"] > seq0 and set(ch["inodes"]) == {str(d), str(a.root)}
    f = a.create(d, "f")
    seq1 = ch["seq"]
    ch = a.c.get("/fs/changes", params={"since": seq1}).json()
    assert set(ch["inodes"]) == {str(d), str(f)}
    seq2 = ch["seq"]
    a.ok({"op": "setmeta", "inode": str(f), "base_version": 1, "meta": b64(8)})
    assert set(a.c.get("/fs/changes", params={"since": seq2}).json()["inodes"]) == {str(f)}
    seq3 = a.c.get("/fs/changes", params={"since": seq2}).json()["seq"]
    a.ok(unlink(d, "f"))                                    # deleted inodes are reported too
    ch = a.c.get("/fs/changes", params={"since": seq3}).json()
    assert set(ch["inodes"]) == {str(d), str(f)}
    assert a.c.get("/fs/changes", params={"since": ch["seq"]}).json()["inodes"] == []
    assert_error(a.c.get("/fs/changes", params={"since": -1}), 422, "validation")


# ------------------------------------------------------------------ blobs
def test_range_requests(shared_server):
    a = Account(shared_server)
    f = a.create(a.root, "f")
    data = os.urandom(1000)
    b = a.put_blob(f, data)
    r = a.c.get(f"/blobs/{f}/{b}")
    assert r.status_code == 200 and r.content == data and r.headers["accept-ranges"] == "bytes"
    for rng, (s, e) in {"bytes=0-99": (0, 100), "bytes=900-": (900, 1000), "bytes=-10": (990, 1000),
                        "bytes=990-5000": (990, 1000), "bytes=5-5": (5, 6)}.items():
        r = a.c.get(f"/blobs/{f}/{b}", headers={"Range": rng})
        assert r.status_code == 206, rng
        assert r.content == data[s:e]
        assert r.headers["content-range"] == f"bytes {s}-{e - 1}/1000"
    for rng in ("bytes=1000-", "bytes=5000-6000", "bytes=-0"):
        r = a.c.get(f"/blobs/{f}/{b}", headers={"Range": rng})
        assert_error(r, 416, "invalid_range")
        assert r.headers["content-range"] == "bytes */1000"
    r = a.c.get(f"/blobs/{f}/{b}", headers={"Range": "items=1-2"})      # ignored
    assert r.status_code == 200 and r.content == data
    empty = a.put_blob(f, b"")
    assert a.c.get(f"/blobs/{f}/{empty}").content == b""


def test_oversized_blob(shared_server):
    a = Account(shared_server)
    f = a.create(a.root, "f")
    limit = 64 * 1024 * 1024
    # declared too large: refused before reading
    r = a.c.put(f"/blobs/{f}/{uuid.uuid4()}", content=b"x" * (limit + 1))
    assert_error(r, 413, "too_large")
    # streamed (chunked, no Content-Length): cut off at the limit
    blob = uuid.uuid4()

    def gen():
        chunk = b"y" * (1024 * 1024)
        for _ in range(64):
            yield chunk
        yield b"z"

    r = a.c.put(f"/blobs/{f}/{blob}", content=gen())
    assert_error(r, 413, "too_large")
    assert_error(a.c.get(f"/blobs/{f}/{blob}"), 404, "not_found")
    assert shared_server.stored_objects(a.user_id) == set()


def test_quota(make_server):
    srv = make_server(quota_bytes=10_000)
    a = Account(srv)
    f = a.create(a.root, "f")
    b1 = a.put_blob(f, os.urandom(6000))
    assert a.commit(f, [b1]).status_code == 200
    before = srv.stored_objects()
    # declared length over the quota
    assert_error(a.c.put(f"/blobs/{f}/{uuid.uuid4()}", content=os.urandom(6000)), 507, "no_space")

    # streamed without length: cut off once over the quota
    def gen():
        for _ in range(6):
            yield os.urandom(1000)

    blob = uuid.uuid4()
    assert_error(a.c.put(f"/blobs/{f}/{blob}", content=gen()), 507, "no_space")
    assert_error(a.c.get(f"/blobs/{f}/{blob}"), 404, "not_found")
    # inline blobs over the quota
    b2 = uuid.uuid4()
    assert_error(a.commit(f, [b1, b2], inline=[(b2, os.urandom(6000))]), 507, "no_space")
    assert a.inode(f)["version"] == 2
    assert srv.stored_objects() == before                       # nothing partial left
    st = a.c.get("/fs/statfs").json()
    used = 6000 + metadata_bytes(srv, a.user_id)
    assert st == {"quota_bytes": 10_000, "used_bytes": used, "free_bytes": 10_000 - used}
    # a rewrite that frees the old blob fits
    assert a.commit(f, [b2], inline=[(b2, os.urandom(6000))]).status_code == 200
    assert a.c.get("/fs/statfs").json()["used_bytes"] == 6000 + metadata_bytes(srv, a.user_id)


def test_metadata_counts_toward_quota(make_server):
    """Attributes, manifests and names are stored bytes too: 400 creates with
    261 KB of attributes each once grew app.db by 105 MB with 0 bytes used."""
    srv = make_server(quota_bytes=1_000_000)
    a = Account(srv)
    big = base64.b64encode(os.urandom(190_000)).decode()           # 253 KB of attributes
    created = 0
    for i in range(8):
        r = a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": big,
                   "parent": str(a.root), "name_hash": nh(f"big{i}"), "name": b64(200)})
        if r.status_code != 200:
            assert_error(r, 507, "no_space")
            break
        created += 1
    assert created == 3                     # the fourth would pass 1,000,000 bytes
    st = a.c.get("/fs/statfs").json()
    assert 3 * len(big) < st["used_bytes"] == metadata_bytes(srv, a.user_id) <= 1_000_000
    # a manifest grows the account too, and an over-quota account can still shrink
    assert a.ops(unlink(a.root, "big0")).status_code == 200
    assert a.c.get("/fs/statfs").json()["used_bytes"] < st["used_bytes"] - len(big)


# ------------------------------------------------------------------ isolation & junk
def test_isolation(shared_server):
    a, b = Account(shared_server), Account(shared_server)
    d = a.create(a.root, "d", is_dir=True)
    f = a.create(d, "f", key=True)
    blob = a.put_blob(f, b"secret")
    assert a.commit(f, [blob]).status_code == 200
    for url in (f"/fs/inodes/{f}", f"/fs/inodes/{a.root}", f"/fs/dirs/{d}/entries",
                f"/fs/dirs/{d}/entries/{nh('f')}", f"/fs/inodes/{f}/key", f"/blobs/{f}/{blob}"):
        assert_error(b.c.get(url), 404, "not_found")
    # B may stage a blob under the same ids, but only in B's own namespace
    assert b.c.put(f"/blobs/{f}/{blob}", content=b"evil").status_code == 201
    assert b.c.get(f"/blobs/{f}/{blob}").content == b"evil"
    assert_error(b.c.put("/keys", json={"keys": [{"inode": str(f), "gen": 1, "wrapped_key": b64(40)}]}),
                 404, "not_found")
    for op in ({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
                "parent": str(d), "name_hash": nh("x"), "name": b64(8)},
               unlink(d, "f"), {"op": "rmdir", "parent": str(a.root), "name_hash": nh("d")},
               rename(d, "f", b.root, "stolen"),
               {"op": "link", "inode": str(f), "parent": str(b.root), "name_hash": nh("l"), "name": b64(8)},
               {"op": "setmeta", "inode": str(f), "base_version": 2, "meta": b64(8)},
               {"op": "commit", "inode": str(f), "base_version": 2, "meta": b64(8), "manifest": b64(8),
                "blobs": [str(blob)]},
               {"op": "delete_inode", "inode": str(f)}):
        assert_error(b.ops(op), 404, "not_found")
    assert str(f) not in {k["inode"] for k in b.c.get("/keys").json()["keys"]}
    assert a.c.get(f"/blobs/{f}/{blob}").content == b"secret"
    assert a.c.get(f"/fs/inodes/{f}/key").status_code == 200
    assert a.inode(f)["version"] == 2
    # the same inode id in B's namespace is a different object
    r = b.ops({"op": "create", "inode": str(f), "is_dir": False, "meta": b64(8), "parent": str(b.root),
               "name_hash": nh("f"), "name": b64(8)},
              {"op": "commit", "inode": str(f), "base_version": 1, "meta": b64(8), "manifest": b64(8),
               "blobs": [str(blob)]})
    assert r.status_code == 200, r.text
    assert b.c.get(f"/blobs/{f}/{blob}").content == b"evil"
    assert a.c.get(f"/blobs/{f}/{blob}").content == b"secret"
    assert a.inode(f)["version"] == 2
    assert shared_server.read_object(a.user_id, f, blob) == b"secret"


def test_junk_ids_never_500(shared_server):
    a = Account(shared_server)
    bad = ["not-a-uuid", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "%00", "' OR 1=1 --", "1" * 300]
    for junk in bad:
        for url in (f"/fs/inodes/{junk}", f"/fs/dirs/{junk}/entries", f"/fs/inodes/{junk}/key",
                    f"/blobs/{junk}/{uuid.uuid4()}", f"/blobs/{a.root}/{junk}",
                    f"/fs/dirs/{a.root}/entries/{junk}", f"/account/master-keys/{junk}"):
            for method in ("GET", "PUT", "DELETE"):
                r = a.c.request(method, url, content=b"x" if method == "PUT" else None)
                assert r.status_code in (404, 405, 422), (method, url, r.status_code, r.text)
                assert set(r.json()) - {"op_index"} == {"detail", "code"}
    r = a.c.get(f"/fs/dirs/{a.root}/entries/{'A' * 64}")        # uppercase hex rejected
    assert_error(r, 422, "validation")
    r = a.c.post("/fs/ops", json={"ops": [{"op": "frobnicate"}]})
    assert_error(r, 422, "validation")
    r = a.c.post("/fs/ops", json={"ops": [{"op": "setmeta", "inode": str(a.root), "base_version": 1,
                                           "meta": "not base64!"}]})
    assert_error(r, 422, "validation")
    huge = 2 ** 70
    r = a.c.post("/fs/ops", json={"ops": [{"op": "setmeta", "inode": str(a.root), "base_version": huge,
                                           "meta": b64(8)}]})
    assert_error(r, 409, "conflict")
    r = a.ops({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
               "parent": str(a.root), "name_hash": nh("h"), "name": b64(8), "key_gen": huge,
               "wrapped_key": b64(40)})
    assert r.status_code in (400, 422), r.text
    assert_error(a.c.get("/fs/changes", params={"since": huge}), 422, "validation")
    assert not any(part in ("passwd", "etc") for o in shared_server.stored_objects() for part in o.split("/"))
    assert "Traceback" not in shared_server.log()


# ------------------------------------------------------------------ server lifecycle
@pytest.mark.sqlite_only            # .env and temp files; the S3 sweeper: test_scale_out.py
def test_env_file_and_startup_cleanup(server):
    env = server.data_dir / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    secret = env.read_text()
    assert secret.startswith("ZKFS_SECRET_KEY=") and len(secret.strip().split("=")[1]) == 64
    a = Account(server)
    f = a.create(a.root, "f")
    committed = a.put_blob(f, b"keep me")
    assert a.commit(f, [committed]).status_code == 200
    staged_old = a.put_blob(f, b"stale staged")
    staged_new = a.put_blob(f, b"fresh staged")
    g = a.create(a.root, "g")
    h = a.create(a.root, "h")
    a.ok(unlink(a.root, "g", keep_orphan=True), unlink(a.root, "h", keep_orphan=True))
    server.stop()
    fdir = server.data_dir / "storage" / str(a.user_id) / str(f)
    tmp = fdir / f".{uuid.uuid4()}.abc.tmp"
    tmp.write_bytes(b"partial upload")
    server.query("UPDATE blobs SET created_at = created_at - ? WHERE blob_id = ?", STAGED_MAX_AGE + 60,
                 str(staged_old))
    server.query("UPDATE inodes SET orphan_since = orphan_since - ? WHERE id = ?", ORPHAN_MAX_AGE + 60, str(g))
    server.start()
    assert (server.data_dir / ".env").read_text() == secret        # secret kept
    a.login()                                                      # (tokens survive restarts too)
    assert not tmp.exists()
    assert_error(a.c.get(f"/blobs/{f}/{staged_old}"), 404, "not_found")
    assert not (fdir / str(staged_old)).exists()
    assert a.c.get(f"/blobs/{f}/{staged_new}").content == b"fresh staged"
    assert a.c.get(f"/blobs/{f}/{committed}").content == b"keep me"
    assert_error(a.c.get(f"/fs/inodes/{g}"), 404, "not_found")     # orphan > 24 h
    assert a.inode(h)["nlink"] == 0                                # recent orphan kept


def _load_secret(path: str) -> str:
    from server.config import load_or_create_secret
    return load_or_create_secret(Path(path))


def test_secret_creation_is_race_free(tmp_path):
    path = tmp_path / "fresh" / ".env"
    with concurrent.futures.ProcessPoolExecutor(6) as pool:
        secrets = list(pool.map(_load_secret, [str(path)] * 24))
    assert len(set(secrets)) == 1 and len(secrets[0]) == 64
    assert path.read_text() == f"ZKFS_SECRET_KEY={secrets[0]}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("server", [{"quota_bytes": 123}], indirect=True)
def test_server_fixture_params(server):
    a = Account(server)
    assert a.c.get("/fs/statfs").json()["quota_bytes"] == 123


def test_kill_and_restart_keeps_data(server):
    a = Account(server)
    f = a.create(a.root, "f")
    b = a.put_blob(f, b"durable")
    assert a.commit(f, [b]).status_code == 200
    server.kill()
    server.start()
    assert a.c.get(f"/blobs/{f}/{b}").content == b"durable"
    assert a.inode(f)["version"] == 2


def test_two_workers_concurrent(make_server):
    srv = make_server(workers=2)
    import psutil
    children = psutil.Process(srv.pid).children(recursive=True)
    assert len([c for c in children if "python" in c.name().lower()]) >= 2
    accounts = [Account(srv) for _ in range(2)]
    a = accounts[0]
    d = a.create(a.root, "d", is_dir=True)
    f = a.create(a.root, "f")

    def work(i: int) -> tuple[int, int, int]:
        with srv.client(headers={"Authorization": f"Bearer {a.token}"}) as c:
            r1 = c.post("/fs/ops", json={"ops": [{
                "op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(8),
                "parent": str(d), "name_hash": nh(f"n{i}"), "name": b64(8)}]})
            r2 = c.put(f"/blobs/{f}/{uuid.uuid4()}", content=os.urandom(2000))
            r3 = c.get(f"/fs/dirs/{d}/entries")
            return r1.status_code, r2.status_code, r3.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(48)))
    assert all(r == (200, 201, 200) for r in results), results
    assert len(a.names(d)) == 48
    assert a.c.get("/fs/statfs").json()["used_bytes"] == 48 * 2000 + metadata_bytes(srv, a.user_id)
    # concurrent CAS on one inode: exactly one of N setmeta with the same base wins
    def cas(_):
        with srv.client(headers={"Authorization": f"Bearer {a.token}"}) as c:
            return c.post("/fs/ops", json={"ops": [{"op": "setmeta", "inode": str(f), "base_version": 1,
                                                    "meta": b64(8)}]}).status_code
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(cas, range(8)))
    assert sorted(codes) == [200] + [409] * 7
    assert "Traceback" not in srv.log()
