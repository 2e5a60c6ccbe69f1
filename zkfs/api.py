"""HTTP client for the /api/v1 contract (docs/API.md). Knows nothing about crypto.

Idempotent requests are retried with backoff when the server cannot be reached
(a restart should not surface to the user); a request that changes state is
retried only when it provably never reached the server (connect failure).
An expired token is renewed once through the ``reauth`` callback.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable
from urllib.parse import urlsplit
from uuid import UUID

import tenacity

from .errors import ServerError, Unreachable, ZkfsError, drop_frames
from .transport import ConnectError, Response, TlsError, TransportError, Urllib3Transport

log = logging.getLogger(__name__)

class _Unavailable(TransportError):
    """A 503 ``unavailable`` from the server (its database away: nothing was
    applied), or a gateway error from a load balancer in front of it for an
    idempotent request (the node behind it died): tried again like a lost connection."""


# A member's requests into a share of another account's name it (server/auth.py).
SHARE_HEADER = "X-Zkfs-Share"


def _scoped(share: UUID | None) -> dict[str, str]:
    return {SHARE_HEADER: str(share)} if share is not None else {}


_NEVER_SENT = (ConnectError, _Unavailable)
_TRANSPORT = (TransportError,)
_GATEWAY = (502, 503, 504)


def check_server_url(url: str, *, insecure_http: bool = False) -> str:
    """``url`` if this client may talk to it: https://, or http:// to this machine
    (loopback), or any http:// with ``insecure_http``. Plain http over a network
    hands everyone on the path what the server gets, and lets them lie like it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ZkfsError(f"{url!r} is not a server URL (https://HOST[:PORT])")
    if parts.scheme == "http" and not insecure_http and not _is_loopback(parts.hostname):
        raise ZkfsError(f"refusing plain http:// to {parts.hostname}: the auth key, the token and every "
                        "answer would cross the network unprotected, open to anyone on the path; "
                        "use https://, or --insecure-http on a network you trust")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, *, retry_seconds: float = 5.0,
                 timeout: float = 60.0, reauth: Callable[[], str] | None = None,
                 insecure_http: bool = False):
        self.base_url = check_server_url(base_url, insecure_http=insecure_http).rstrip("/")
        self.token = token
        self.reauth = reauth
        self.retry_seconds = retry_seconds
        self._transport = Urllib3Transport(max_connections=32, connect_timeout=5.0, read_timeout=timeout)
        self._reauth_lock = threading.Lock()
        self._down_since: float | None = None
        self._direct: bool | None = None    # whether the server offers direct blob URLs
        # (inode, blob) -> (GET URL, monotonic deadline) handed out ahead by download-urls
        self._read_urls: OrderedDict[tuple[UUID, UUID], tuple[str, float]] = OrderedDict()
        self._urls_lock = threading.Lock()
        self._urls_fetch = threading.Lock()
        self._upload_urls = _Coalescer(self._fetch_upload_urls)

    def close(self) -> None:
        self._transport.close()

    # ------------------------------------------------------------ plumbing
    def _send(self, method: str, path: str, *, idempotent: bool, headers: dict | None = None,
              url: str | None = None, **kw) -> Response:
        """``url``: an absolute URL the server handed out (an object store's), sent
        without this client's credentials; otherwise ``path`` under the API."""
        headers = (self._headers() if url is None else {}) | (headers or {})
        kw["url"] = url or f"{self.base_url}/api/v1{path}"
        retryable = _TRANSPORT if idempotent else _NEVER_SENT
        try:
            if self._down_since is None:
                # The usual case: one attempt, no retry machinery set up for it.
                try:
                    return self._attempt(method, headers, kw, idempotent)
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
                    return self._attempt(method, headers, kw, idempotent)
        except _TRANSPORT as exc:
            why = (f"TLS: {exc}" if isinstance(exc, TlsError) else str(exc) if isinstance(exc, _Unavailable)
                   else exc.reason)
            drop_frames(exc)
            where = (f"the server at {self.base_url}" if url is None or url.startswith(self.base_url + "/")
                     else f"the object store at {urlsplit(url).netloc}")
            failure = Unreachable(f"cannot reach {where} ({why})")
        # Raised outside the handler (no chain to the transport error), and not kept
        # by this frame (the error's traceback refers back to it).
        try:
            raise failure
        finally:
            del failure

    def _attempt(self, method: str, headers: dict, kw: dict, idempotent: bool) -> Response:
        try:
            resp = self._transport.send(method, headers=headers, **kw)
            if resp.status_code in _GATEWAY and (idempotent or self._error(resp).code == "unavailable"):
                raise _Unavailable(f"HTTP {resp.status_code}")
        except _TRANSPORT:
            if self._down_since is None:
                self._down_since = time.monotonic()
            raise
        self._down_since = None
        return resp

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, idempotent: bool | None = None, share: UUID | None = None,
                **kw) -> Response:
        """``share``: a request into that share of another account's (a member's)."""
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        if share is not None:
            kw["headers"] = (kw.get("headers") or {}) | _scoped(share)
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
    def _is_token_error(resp: Response) -> bool:
        try:
            return resp.json().get("code") in ("token_expired", "token_invalid")
        except ValueError:
            return False

    @staticmethod
    def _error(resp: Response) -> ServerError:
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

    def set_kdf(self, kdf: dict) -> None:
        """Adds the kdf check to an account from before checks (same parameters)."""
        self.request("PUT", "/account/kdf", json={"kdf": kdf})

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
    def get_key(self, inode: UUID, share: UUID | None = None) -> dict:
        return self._json("GET", f"/fs/inodes/{inode}/key", share=share)

    def list_keys(self) -> list[dict]:
        return self._json("GET", "/keys")["keys"]

    def put_keys(self, keys: list[dict]) -> None:
        self.request("PUT", "/keys", json={"keys": keys})

    # ------------------------------------------------------------ namespace
    def get_inode(self, inode: UUID, share: UUID | None = None) -> dict:
        return self._json("GET", f"/fs/inodes/{inode}", share=share)

    def list_dir(self, inode: UUID, share: UUID | None = None) -> dict:
        """``{"dir": inode record, "entries": [...]}``."""
        return self._json("GET", f"/fs/dirs/{inode}/entries", share=share)

    def list_dirs(self, inodes: list[UUID], share: UUID | None = None) -> dict[UUID, dict]:
        """Listings (as ``list_dir``) of several directories (read, so safe to retry).
        Some may be missing from the answer: the server bounds its size."""
        body = self._json("POST", "/fs/listings", json={"dirs": [str(i) for i in inodes]}, idempotent=True,
                          share=share)
        return {UUID(listing["dir"]["id"]): listing for listing in body["listings"]}

    def lookup(self, parent: UUID, name_hash: str) -> dict:
        return self._json("GET", f"/fs/dirs/{parent}/entries/{name_hash}")

    def statfs(self) -> dict:
        return self._json("GET", "/fs/statfs")

    def changes(self, since: int, share: UUID | None = None) -> dict:
        return self._json("GET", "/fs/changes", params={"since": since}, share=share)

    def ops(self, ops: list[dict], batch_id: UUID | None = None, share: UUID | None = None) -> dict:
        """One transaction; a failure names the op (``ServerError.op_index``). With a
        ``batch_id`` the server applies it once, so it is safe to send again (a lost
        answer is retried like a read)."""
        body = {"ops": ops} | ({"batch_id": str(batch_id)} if batch_id is not None else {})
        return self._json("POST", "/fs/ops", json=body, idempotent=batch_id is not None,
                          share=share)

    # ------------------------------------------------------------ sharing
    def set_identity(self, record: dict) -> None:
        self.request("PUT", "/account/identity", json=record)

    def public_key(self, username: str) -> dict:
        return self._json("GET", f"/users/{username}/public-key")

    def shares(self) -> list[dict]:
        return self._json("GET", "/shares")["shares"]

    def create_share(self, body: dict) -> None:
        self.request("POST", "/shares", json=body, idempotent=False)

    def share_ready(self, share: UUID) -> None:
        self.request("PUT", f"/shares/{share}/state", json={"state": "ready"})

    def add_member(self, share: UUID, body: dict) -> None:
        self.request("POST", f"/shares/{share}/members", json=body, idempotent=False)

    def new_share_generation(self, share: UUID, body: dict) -> None:
        self.request("POST", f"/shares/{share}/generations", json=body, idempotent=False)

    def drop_share_generation(self, share: UUID, gen: int) -> None:
        self.request("DELETE", f"/shares/{share}/generations/{gen}")

    # ------------------------------------------------------------ blobs
    # A server on an object store offers short-lived URLs so chunk bytes skip its API
    # nodes: ``upload-urls`` before PUTs, ``download-urls`` (or a 307) before GETs. What
    # comes back from them is no more trusted than the server's own answers (chunks
    # are verified by the vault).
    def put_blob(self, inode: UUID, blob_id: UUID, data: bytes, share: UUID | None = None) -> None:
        if self._direct is not False:
            try:
                self._put_direct(inode, blob_id, data, share)
                self._direct = True
                return
            except ServerError as exc:
                if exc.code != "direct_unavailable":
                    if exc.code == "exists":      # a retry whose first attempt landed
                        return
                    raise
                self._direct = False
        try:
            self.request("PUT", f"/blobs/{inode}/{blob_id}", content=data, share=share,
                         headers={"Content-Type": "application/octet-stream"})
        except ServerError as exc:
            # A retried PUT whose first attempt landed: blobs are immutable, so done.
            if exc.code != "exists":
                raise

    def _put_direct(self, inode: UUID, blob_id: UUID, data: bytes, share: UUID | None) -> None:
        for attempt in range(2):
            url = self._upload_urls.get((inode, blob_id, len(data), share))
            resp = self._send("PUT", "", url=url, idempotent=True, content=data)
            if resp.status_code < 300:
                return
            if resp.status_code != 403 or attempt:
                raise _store_error(resp, "upload")
            # 403: the URL expired while this client retried: ask for a fresh one

    def _fetch_upload_urls(self, wanted: list[tuple[UUID, UUID, int, UUID | None]]) -> dict:
        """Upload URLs of several blobs in one request per share (idempotent: staging
        the same blob with the same size again is a retry)."""
        urls = {}
        for share in dict.fromkeys(w[3] for w in wanted):
            body = self._json("POST", "/blobs/upload-urls", idempotent=True, share=share, json={"blobs": [
                {"inode": str(i), "blob_id": str(b), "size": n} for i, b, n, s in wanted if s == share]})
            urls |= {(UUID(u["inode"]), UUID(u["blob_id"])): _checked_url(u["url"]) for u in body["urls"]}
        if any((i, b) not in urls for i, b, _n, _s in wanted):
            raise ServerError(502, "bad_answer", "the server left out upload URLs it was asked for")
        return urls

    def blob_urls_ahead(self, inode: UUID, blob_ids: list[UUID], share: UUID | None = None) -> None:
        """Fetch read URLs of several blobs in one request (a file's next chunks),
        unless the first is known already or the server has no object store."""
        if self._direct is False or not blob_ids or self._read_url(inode, blob_ids[0]):
            return
        with self._urls_fetch:      # parallel readers of one file wait for one batch
            if self._read_url(inode, blob_ids[0]):
                return
            refs = [{"inode": str(inode), "blob_id": str(b)} for b in blob_ids[:_URLS_PER_REQUEST]]
            try:
                body = self._json("POST", "/blobs/download-urls", json={"blobs": refs}, idempotent=True,
                                  share=share)
            except ServerError as exc:
                if exc.code != "direct_unavailable":
                    raise
                self._direct = False
                return
            self._keep_urls(body)

    def _keep_urls(self, body: dict) -> None:
        # used until well before they expire: a retried read must not get a 403
        deadline = time.monotonic() + body["expires_in"] / 2
        with self._urls_lock:
            for u in body["urls"]:
                self._read_urls[(UUID(u["inode"]), UUID(u["blob_id"]))] = (_checked_url(u["url"]), deadline)
            while len(self._read_urls) > _URLS_KEPT:
                self._read_urls.popitem(last=False)

    def _read_url(self, inode: UUID, blob_id: UUID) -> str | None:
        with self._urls_lock:
            found = self._read_urls.get((inode, blob_id))
            if found and found[1] > time.monotonic():
                return found[0]
            self._read_urls.pop((inode, blob_id), None)
            return None

    def get_blob(self, inode: UUID, blob_id: UUID, start: int | None = None, end: int | None = None,
                 share: UUID | None = None) -> bytes:
        headers = {}
        if start is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        url = self._read_url(inode, blob_id)
        if url is not None:
            resp = self._send("GET", "", url=url, idempotent=True, headers=headers)
            if resp.status_code < 300:
                return resp.content
            with self._urls_lock:     # expired, or gone: the API knows which
                self._read_urls.pop((inode, blob_id), None)
        path = f"/blobs/{inode}/{blob_id}"
        for attempt in range(2):
            resp = self.request("GET", path, headers=headers, share=share)
            if resp.status_code != 307:
                return resp.content
            resp = self._send("GET", "", url=_checked_url(resp.headers.get("location", "")), idempotent=True,
                              headers=headers)
            if resp.status_code < 300:
                return resp.content
            if resp.status_code == 404:
                raise ServerError(404, "not_found", "the object store has no such blob")
            if resp.status_code != 403 or attempt:
                raise _store_error(resp, "download")
        raise AssertionError("unreachable")


    # ------------------------------------------------------------ links for anyone
    def create_link(self, body: dict) -> dict:
        return self._json("POST", "/links", json=body, idempotent=False)

    def list_links(self) -> list[dict]:
        return self._json("GET", "/links")["links"]

    def revoke_link(self, link_id: str) -> None:
        self.request("DELETE", f"/links/{link_id}")

    # The anonymous side (/s/<id>, outside the API): sent without any credentials.
    def link_get(self, link_id: str, part: str) -> bytes:
        """``GET /s/<id>/<part>`` (record, manifest, blobs/<blob>); a 429 waits its
        Retry-After (up to LINK_THROTTLE_WAIT in all) and asks again."""
        waited = 0.0
        while True:
            resp = self._send("GET", "", url=f"{self.base_url}/s/{link_id}/{part}", idempotent=True)
            if resp.status_code == 429 and waited < LINK_THROTTLE_WAIT:
                pause = min(_retry_after(resp), LINK_THROTTLE_WAIT - waited)
                log.info("link requests throttled: waiting %.0f s", pause)
                time.sleep(pause)
                waited += pause
                continue
            if resp.status_code >= 400:
                raise self._error(resp)
            return resp.content


LINK_THROTTLE_WAIT = 120.0


def _retry_after(resp: Response) -> float:
    try:
        return max(1.0, float(resp.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


class _Coalescer:
    """Parallel uploaders ask for their upload URLs together, the way a database
    groups commits: while one request is out, the callers that arrive wait and
    then go as the next batch. Exact ids and sizes, so nothing is reserved ahead;
    a refused batch is retried one blob at a time (one bad blob fails alone)."""

    def __init__(self, fetch) -> None:
        self.fetch = fetch
        self.cond = threading.Condition()
        self.pending: list[list] = []        # [key, result or None]
        self.busy = False

    def get(self, key: tuple[UUID, UUID, int, UUID | None]) -> str:
        entry = [key, None]
        with self.cond:
            self.pending.append(entry)
            while entry[1] is None:
                if self.busy:
                    self.cond.wait()
                    continue
                self.busy = True
                batch, self.pending = self.pending[:_URLS_PER_REQUEST], self.pending[_URLS_PER_REQUEST:]
                self.cond.release()
                try:
                    self._serve(batch)
                finally:
                    self.cond.acquire()
                    self.busy = False
                    self.cond.notify_all()
        kind, value = entry[1]
        if kind == "error":
            raise value
        return value

    def _serve(self, batch: list[list]) -> None:
        try:
            urls = self.fetch([e[0] for e in batch])
        except ServerError as exc:          # refused: find which blob, if several
            if len(batch) == 1:
                batch[0][1] = ("error", exc)
            for e in batch if len(batch) > 1 else ():
                self._serve([e])
            return
        except BaseException as exc:        # unreachable: every caller hears it
            for e in batch:
                e[1] = ("error", exc)
            return
        for e in batch:
            e[1] = ("url", urls[e[0][:2]])


_URLS_PER_REQUEST = 64       # URLs asked for at once (a reader's next 64 MiB)
_URLS_KEPT = 8192


def _checked_url(url: str) -> str:
    """A URL from the server, if it is one this client will follow (http or https)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ServerError(502, "bad_url", "the server offered a transfer URL that is not http(s)")
    return url


def _store_error(resp: Response, what: str) -> ServerError:
    return ServerError(resp.status_code, "object_store",
                       f"the object store refused the {what} (HTTP {resp.status_code})")
