"""An httpx transport that moves bytes with urllib3 (the pattern httpx's "Custom
transports" documentation points to).

Why: httpx's own transport (httpcore + h11) cost 1-1.7 ms of client CPU per 1 MiB
chunk GET here, in Python-level copies of every 64 KiB the socket returns;
urllib3 reads a known-length body through http.client in one C-level loop
(0.36 ms). A mount reading sequentially is CPU-bound, so that was most of the
gap to the peers. api.py keeps httpx's Request/Response and exception types
(its retry rules are written in them); only this class knows urllib3.
"""
from __future__ import annotations

import httpx
import urllib3
from urllib3 import exceptions as u3

from .errors import drop_frames


class TlsError(httpx.ConnectError):
    """The TLS handshake failed (an untrusted certificate, most often): said as such,
    since "cannot reach the server" alone would hide the reason."""


class Urllib3Transport(httpx.BaseTransport):
    def __init__(self, *, max_connections: int, connect_timeout: float, read_timeout: float):
        # block=False: a burst beyond the pool size opens extra connections (not
        # kept) rather than waiting; retries and redirects belong to the caller.
        self._pool = urllib3.PoolManager(
            maxsize=max_connections, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            resp = self._pool.urlopen(
                request.method, str(request.url), body=request.read() or None,
                headers=dict(request.headers), redirect=False, retries=False,
                preload_content=True, decode_content=False)
        except u3.HTTPError as exc:
            drop_frames(exc)               # (see drop_frames: urllib3 keeps its errors in frames)
            raise _as_httpx(exc, request) from exc
        return httpx.Response(resp.status, headers=list(resp.headers.items()),
                              content=resp.data, request=request)

    def close(self) -> None:
        self._pool.clear()


def _as_httpx(exc: u3.HTTPError, request: httpx.Request) -> httpx.TransportError:
    """urllib3's error as the httpx one api.py's retry rules are written in."""
    if isinstance(exc, u3.ConnectTimeoutError):
        # NewConnectionError (refused, unresolvable) is a subclass: either way the
        # request never left this machine, which is what makes a retry of a
        # non-idempotent request safe.
        kind = httpx.ConnectTimeout if type(exc) is u3.ConnectTimeoutError else httpx.ConnectError
        return kind(str(exc), request=request)
    if isinstance(exc, u3.SSLError):
        return TlsError(str(exc.args[0] if exc.args else exc), request=request)
    if isinstance(exc, u3.ReadTimeoutError):
        return httpx.ReadTimeout(str(exc), request=request)
    if isinstance(exc, u3.ProtocolError):       # reset, closed or truncated mid-exchange
        return httpx.RemoteProtocolError(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)
