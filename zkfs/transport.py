"""The client's wire: one HTTP exchange over urllib3's connection pool, and the
few failure kinds api.py's retry rules are written in.

Why urllib3 alone: httpx's own transport (httpcore + h11) cost 1-1.7 ms of client
CPU per 1 MiB chunk GET here, in Python-level copies of every 64 KiB the socket
returns, where urllib3 reads a known-length body through http.client in one
C-level loop (0.36 ms); and importing httpx (which loads its command line's
click, rich and pygments) was ~0.13 s of every CLI command's 0.5 s start.
"""
from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlencode

import urllib3
from urllib3 import exceptions as u3

from .errors import drop_frames


class TransportError(Exception):
    """No complete answer: the exchange failed below HTTP."""
    reason = "no complete answer"         # for the user's one line


class ConnectError(TransportError):
    """No connection was made (refused, unresolvable, timed out): the request never
    left this machine, which is what makes a retry of a non-idempotent request safe."""
    reason = "no connection: refused or timed out"


class TlsError(ConnectError):
    """The TLS handshake failed (an untrusted certificate, most often): said as such,
    since "cannot reach the server" alone would hide the reason."""


class ReadTimeout(TransportError):
    """Connected and sent, but no answer in time."""
    reason = "no answer in time"


class ConnectionCut(TransportError):
    """Reset, closed or cut short in the middle of the exchange."""
    reason = "the connection broke off"


@dataclass(frozen=True)
class Response:
    status_code: int
    headers: Mapping[str, str]         # case-insensitive (urllib3's HTTPHeaderDict)
    content: bytes

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return jsonlib.loads(self.content)


class Urllib3Transport:
    def __init__(self, *, max_connections: int, connect_timeout: float, read_timeout: float):
        # block=False: a burst beyond the pool size opens extra connections (not
        # kept) rather than waiting; retries and redirects belong to the caller.
        self._pool = urllib3.PoolManager(
            maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))

    def send(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
             params: Mapping[str, Any] | None = None, json: Any = None,
             content: bytes | None = None) -> Response:
        """One exchange, the answer's body read in full."""
        headers = dict(headers or {})
        if params:
            url += "?" + urlencode(params)
        if json is not None:
            content = jsonlib.dumps(json, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            resp = self._pool.urlopen(method, url, body=content, headers=headers, redirect=False,
                                      retries=False, preload_content=True, decode_content=False)
        except u3.HTTPError as exc:
            drop_frames(exc)               # (see drop_frames: urllib3 keeps its errors in frames)
            raise _failure(exc) from exc
        return Response(resp.status, resp.headers, resp.data)

    def close(self) -> None:
        self._pool.clear()


def _failure(exc: u3.HTTPError) -> TransportError:
    if isinstance(exc, u3.ConnectTimeoutError):    # NewConnectionError is one too
        return ConnectError(str(exc))
    if isinstance(exc, u3.SSLError):
        return TlsError(str(exc.args[0] if exc.args else exc))
    if isinstance(exc, u3.ReadTimeoutError):
        return ReadTimeout(str(exc))
    if isinstance(exc, u3.ProtocolError):
        return ConnectionCut(str(exc))
    return TransportError(str(exc))
