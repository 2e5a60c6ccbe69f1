"""A user driving the raw /api/v1 with httpx and random key material (the server
cannot tell random bytes from real ciphertext), for the auth and fuzz tests.

``from_addr`` binds the client to another loopback source address (127.0.0.0/8 is
all local), so per-address login throttling can be exercised without touching any
host other than 127.0.0.1.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import uuid

import httpx

_addr_counter = itertools.count()


def b64(n: int = 32) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def nh(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def kdf() -> dict:
    return {"alg": "argon2id", "salt": b64(16), "memory_kib": 65536, "iterations": 3, "lanes": 4,
            "check": b64(32)}


def fresh_addr() -> str:
    """A loopback source address not used before in this test process."""
    n = next(_addr_counter)
    return f"127.{(n // 250 // 256) % 256}.{(n // 250) % 256}.{2 + n % 250}"


def client(srv, addr: str | None = None, **kw) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=addr) if addr else None
    # Redirects followed: a server on an object store answers blob GETs with a 307 to a
    # presigned URL (httpx drops the Authorization header on the way to another host).
    return httpx.Client(base_url=srv.api, timeout=kw.pop("timeout", 30), transport=transport,
                        follow_redirects=True, **kw)


def register_body(username: str, auth_key: str, root: uuid.UUID) -> dict:
    return {"username": username, "auth_key": auth_key, "kdf": kdf(),
            "master_key": {"gen": 1, "wrapped_master": b64(40), "wrapped_namespace": b64(40)},
            "root_inode": str(root), "root_meta": b64(64)}


class ApiUser:
    """A registered (and by default logged-in) user driving the API with httpx and
    random key material (the server cannot tell it from real keys)."""

    def __init__(self, srv, username: str | None = None, *, login: bool = True):
        self.srv = srv
        self.username = username or "u" + uuid.uuid4().hex[:12]
        self.auth_key = b64(32)
        self.root = uuid.uuid4()
        self.c = client(srv)
        body = register_body(self.username, self.auth_key, self.root)
        self.kdf = body["kdf"]
        r = self.c.post("/users", json=body)
        assert r.status_code == 201, r.text
        self.user_id = uuid.UUID(r.json()["user_id"])
        self.token: str | None = None
        if login:
            self.login()

    def login(self, addr: str | None = None) -> str:
        """Log in from a fresh source address (immune to per-address throttling
        that other parts of a test may have provoked from 127.0.0.1)."""
        with client(self.srv, addr or fresh_addr()) as c:
            r = c.post("/auth/login", json={"username": self.username, "auth_key": self.auth_key})
        assert r.status_code == 200, r.text
        self.token = r.json()["access_token"]
        self.c.headers["Authorization"] = f"Bearer {self.token}"
        return self.token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def ops(self, *ops: dict) -> httpx.Response:
        return self.c.post("/fs/ops", json={"ops": list(ops)})

    def ok(self, *ops: dict) -> dict:
        r = self.ops(*ops)
        assert r.status_code == 200, r.text
        return r.json()

    def create(self, parent, name: str, is_dir: bool = False, key: bool = False) -> uuid.UUID:
        ino = uuid.uuid4()
        op = {"op": "create", "inode": str(ino), "is_dir": is_dir, "meta": b64(48),
              "parent": str(parent), "name_hash": nh(name), "name": b64(24)}
        if key:
            op.update(key_gen=1, wrapped_key=b64(40))
        self.ok(op)
        return ino

    def names(self, parent) -> dict[str, dict]:
        r = self.c.get(f"/fs/dirs/{parent}/entries")
        assert r.status_code == 200, r.text
        return {e["name_hash"]: e for e in r.json()["entries"]}

    def inode(self, ino) -> dict:
        r = self.c.get(f"/fs/inodes/{ino}")
        assert r.status_code == 200, r.text
        return r.json()

    def put_blob(self, ino, data: bytes, blob: uuid.UUID | None = None) -> uuid.UUID:
        blob = blob or uuid.uuid4()
        r = self.c.put(f"/blobs/{ino}/{blob}", content=data)
        assert r.status_code == 201, r.text
        return blob

    def commit(self, ino, blobs, inline=(), base=None) -> httpx.Response:
        if base is None:
            base = self.inode(ino)["version"]
        return self.ops({"op": "commit", "inode": str(ino), "base_version": base, "meta": b64(48),
                         "manifest": b64(100), "blobs": [str(b) for b in blobs],
                         "inline": [{"blob_id": str(b), "data": base64.b64encode(d).decode()}
                                    for b, d in inline]})


def assert_error_shape(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.request.method, str(r.request.url)[:200], r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body, dict) and set(body) - {"op_index"} == {"detail", "code"}, body
    assert isinstance(body["detail"], str) and isinstance(body["code"], str), body
    if code is not None:
        assert body["code"] == code, body
    return body
