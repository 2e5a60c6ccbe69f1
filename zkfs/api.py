"""HTTP client for the /api/v1 contract (docs/API.md). Knows nothing about crypto.

Idempotent requests are retried with backoff when the server cannot be reached
(a restart should not surface to the user); a request that changes state is
retried only when it provably never reached the server (connect failure).
An expired token is renewed once through the ``reauth`` callback.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable
from uuid import UUID

import httpx
import tenacity

from .errors import ServerError, Unreachable
from .transport import TlsError, Urllib3Transport

log = logging.getLogger(__name__)

_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_TRANSPORT = (httpx.TransportError,)


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, *, retry_seconds: float = 5.0,
                 timeout: float = 60.0, reauth: Callable[[], str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.reauth = reauth
        self.retry_seconds = retry_seconds
        # The transport (connection pool) is used directly: httpx.Client's layers
        # (cookies, redirects, auth flows, URL merging) are unused here and were half
        # the client's CPU per chunk request.
        self._transport = Urllib3Transport(max_connections=32, connect_timeout=5.0, read_timeout=timeout)
        self._reauth_lock = threading.Lock()
        self._down_since: float | None = None

    def close(self) -> None:
        self._transport.close()

    # ------------------------------------------------------------ plumbing
    def _send(self, method: str, path: str, *, idempotent: bool, headers: dict | None = None,
              **kw) -> httpx.Response:
        headers = self._headers() | (headers or {})
        retryable = _TRANSPORT if idempotent else _NEVER_SENT
        try:
            if self._down_since is None:
                # The usual case: one attempt, no retry machinery set up for it.
                try:
                    return self._attempt(method, path, headers, kw)
                except retryable:
                    pass
            # One retry budget per outage, not per request: requests that start while
            # the server is already down get what is left of it (at least one try), so
            # a stream of operations fails within retry_seconds instead of each waiting.
            window = max(0.0, (self._down_since or time.monotonic()) + self.retry_seconds
                         - time.monotonic())
            for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(retryable),
                    wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
                    stop=tenacity.stop_after_delay(window), reraise=True):
                with attempt:
                    return self._attempt(method, path, headers, kw)
        except _TRANSPORT as exc:
            why = f"TLS: {exc}" if isinstance(exc, TlsError) else exc.__class__.__name__
            raise Unreachable(f"cannot reach the server at {self.base_url} ({why})") from None
        raise AssertionError("unreachable")

    def _attempt(self, method: str, path: str, headers: dict, kw: dict) -> httpx.Response:
        try:
            resp = self._exchange(method, path, headers, **kw)
        except _TRANSPORT:
            if self._down_since is None:
                self._down_since = time.monotonic()
            raise
        self._down_since = None
        return resp

    def _exchange(self, method: str, path: str, headers: dict, **kw) -> httpx.Response:
        req = httpx.Request(method, f"{self.base_url}/api/v1{path}", headers=headers, **kw)
        return self._transport.handle_request(req)     # the body is read in full

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, idempotent: bool | None = None, **kw) -> httpx.Response:
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        sent_token = self.token
        resp = self._send(method, path, idempotent=idempotent, **kw)
        if resp.status_code == 401 and self.reauth and sent_token and self._is_token_error(resp):
            with self._reauth_lock:
                if self.token == sent_token:      # another thread may have renewed it already
                    self.token = self.reauth()
            resp = self._send(method, path, idempotent=idempotent, **kw)
        if resp.status_code >= 400:
            raise self._error(resp)
        return resp

    @staticmethod
    def _is_token_error(resp: httpx.Response) -> bool:
        try:
            return resp.json().get("code") in ("token_expired", "token_invalid")
        except ValueError:
            return False

    @staticmethod
    def _error(resp: httpx.Response) -> ServerError:
        try:
            body = resp.json()
            if isinstance(body, dict) and "code" in body:
                index = body.get("op_index")
                return ServerError(resp.status_code, str(body["code"]), str(body.get("detail", "")),
                                   op_index=index if type(index) is int else None)
        except (ValueError, AttributeError):
            pass
        # No zkfs error body: a wrong URL, or something else answering there.
        return ServerError(resp.status_code, "http",
                           f"HTTP {resp.status_code}: not a zkfs server answering (check --server)")

    def _json(self, method: str, path: str, **kw) -> Any:
        resp = self.request(method, path, **kw)
        return resp.json() if resp.content else None

    # ------------------------------------------------------------ accounts
    def kdf(self, username: str) -> dict:
        return self._json("GET", "/auth/kdf", params={"username": username})["kdf"]

    def register(self, body: dict) -> dict:
        return self._json("POST", "/users", json=body)

    def login(self, username: str, auth_key_b64: str, device: str | None = None) -> dict:
        body = {"username": username, "auth_key": auth_key_b64}
        return self._json("POST", "/auth/login", json=body | ({"device": device} if device else {}))

    def logout(self, all_devices: bool = False) -> None:
        self.request("POST", "/auth/logout", idempotent=True,
                     params={"all": "true"} if all_devices else None)

    def account(self) -> dict:
        return self._json("GET", "/account")

    def change_password(self, body: dict) -> dict:
        return self._json("PUT", "/account/password", json=body, idempotent=False)

    # Destructive account operations carry a fresh proof of the password-derived key.
    def add_master_key(self, record: dict, auth_key_b64: str) -> None:
        self.request("POST", "/account/master-keys", json={"master_key": record, "auth_key": auth_key_b64})

    def delete_master_key(self, gen: int, auth_key_b64: str) -> None:
        self.request("DELETE", f"/account/master-keys/{gen}", json={"auth_key": auth_key_b64})

    def delete_account(self, auth_key_b64: str) -> None:
        self.request("DELETE", "/account", json={"auth_key": auth_key_b64})

    # ------------------------------------------------------------ keys
    def get_key(self, inode: UUID) -> dict:
        return self._json("GET", f"/fs/inodes/{inode}/key")

    def list_keys(self) -> list[dict]:
        return self._json("GET", "/keys")["keys"]

    def put_keys(self, keys: list[dict]) -> None:
        self.request("PUT", "/keys", json={"keys": keys})

    # ------------------------------------------------------------ namespace
    def get_inode(self, inode: UUID) -> dict:
        return self._json("GET", f"/fs/inodes/{inode}")

    def list_dir(self, inode: UUID) -> dict:
        """``{"dir": inode record, "entries": [...]}``."""
        return self._json("GET", f"/fs/dirs/{inode}/entries")

    def list_dirs(self, inodes: list[UUID]) -> dict[UUID, dict]:
        """Listings (as ``list_dir``) of several directories (read, so safe to retry).
        Some may be missing from the answer: the server bounds its size."""
        body = self._json("POST", "/fs/listings", json={"dirs": [str(i) for i in inodes]}, idempotent=True)
        return {UUID(listing["dir"]["id"]): listing for listing in body["listings"]}

    def lookup(self, parent: UUID, name_hash: str) -> dict:
        return self._json("GET", f"/fs/dirs/{parent}/entries/{name_hash}")

    def statfs(self) -> dict:
        return self._json("GET", "/fs/statfs")

    def changes(self, since: int) -> dict:
        return self._json("GET", "/fs/changes", params={"since": since})

    def ops(self, ops: list[dict]) -> dict:
        """One transaction; a failure names the op (``ServerError.op_index``)."""
        return self._json("POST", "/fs/ops", json={"ops": ops})

    # ------------------------------------------------------------ blobs
    def put_blob(self, inode: UUID, blob_id: UUID, data: bytes) -> None:
        try:
            self.request("PUT", f"/blobs/{inode}/{blob_id}", content=data,
                         headers={"Content-Type": "application/octet-stream"})
        except ServerError as exc:
            # A retried PUT whose first attempt landed: blobs are immutable, so done.
            if exc.code != "exists":
                raise

    def get_blob(self, inode: UUID, blob_id: UUID, start: int | None = None, end: int | None = None) -> bytes:
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        return self.request("GET", f"/blobs/{inode}/{blob_id}", headers=headers).content
