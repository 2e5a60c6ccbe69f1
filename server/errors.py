"""Error type and exception handlers: every error body is ``{"detail", "code"}``.

Codes and statuses are listed in docs/API.md. Handlers never echo request bodies,
tokens or keys; unexpected exceptions become a generic 500 ``internal`` (the
traceback goes to the server log only).
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .sqldb import Unavailable

log = logging.getLogger("zkfs.server")


class ApiError(Exception):
    """An error with an HTTP status and a machine-readable code."""

    def __init__(self, status: int, code: str, detail: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.op_index: int | None = None      # which op of a POST /fs/ops batch failed


# Small constructors so call sites read like the table in docs/API.md.
def invalid(detail: str = "invalid request") -> ApiError:
    return ApiError(400, "invalid", detail)


def bad_credentials() -> ApiError:
    return ApiError(401, "bad_credentials", "invalid username or key")


def token_invalid(detail: str = "invalid token") -> ApiError:
    return ApiError(401, "token_invalid", detail, {"WWW-Authenticate": "Bearer"})


def token_expired() -> ApiError:
    return ApiError(401, "token_expired", "token expired", {"WWW-Authenticate": "Bearer"})


def forbidden(detail: str = "forbidden") -> ApiError:
    return ApiError(403, "forbidden", detail)


def not_found(detail: str = "not found") -> ApiError:
    return ApiError(404, "not_found", detail)


def exists(detail: str = "already exists") -> ApiError:
    return ApiError(409, "exists", detail)


def conflict(detail: str = "version conflict") -> ApiError:
    return ApiError(409, "conflict", detail)


def stale(detail: str = "the entry is not the one the client expected") -> ApiError:
    return ApiError(409, "stale", detail)


def not_empty(detail: str = "directory not empty") -> ApiError:
    return ApiError(409, "not_empty", detail)


def not_dir(detail: str = "not a directory") -> ApiError:
    return ApiError(409, "not_dir", detail)


def is_dir(detail: str = "is a directory") -> ApiError:
    return ApiError(409, "is_dir", detail)


def invalid_move(detail: str = "cannot move a directory into itself") -> ApiError:
    return ApiError(409, "invalid_move", detail)


def read_only(detail: str = "this shared folder is read-only for you") -> ApiError:
    return ApiError(403, "read_only", detail)


def cross_share(detail: str = "nothing moves into or out of a shared folder (copy it)") -> ApiError:
    return ApiError(409, "cross_share", detail)


def in_use(detail: str = "in use") -> ApiError:
    return ApiError(409, "in_use", detail)


def unknown_key_gen(gen: int) -> ApiError:
    return ApiError(409, "unknown_key_gen", f"unknown key generation {gen}")


def direct_unavailable() -> ApiError:
    return ApiError(409, "direct_unavailable", "this server's blob store moves chunks through the API only")


def unavailable(detail: str = "the database is unavailable, try again") -> ApiError:
    return ApiError(503, "unavailable", detail, {"Retry-After": "1"})


def gone(detail: str = "this link has expired or was revoked") -> ApiError:
    return ApiError(410, "gone", detail)


def too_large(detail: str = "body too large") -> ApiError:
    return ApiError(413, "too_large", detail)


def throttled(retry_after: int, detail: str = "too many failed logins") -> ApiError:
    return ApiError(429, "throttled", detail,
                    {"Retry-After": str(max(1, int(retry_after)))})


def no_space(detail: str = "no space left") -> ApiError:
    return ApiError(507, "no_space", detail)


_HTTP_CODES = {
    400: "invalid", 401: "token_invalid", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 410: "gone", 413: "too_large", 415: "invalid",
    416: "invalid_range", 422: "validation", 429: "throttled", 507: "no_space",
}


def _body(status: int, code: str, detail: str, headers=None, op_index: int | None = None) -> JSONResponse:
    body: dict = {"detail": detail, "code": code}
    if op_index is not None:
        body["op_index"] = op_index
    return JSONResponse(body, status_code=status, headers=headers)


def _one_line_validation(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "validation failed"
    first = errs[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    # Only the message, never the offending input (it could be key material).
    msg = str(first.get("msg", "invalid value")).replace("\n", " ")
    text = f"{loc}: {msg}" if loc else msg
    if len(errs) > 1:
        text += f" (and {len(errs) - 1} more)"
    return text[:500]


class BodyLimitMiddleware:
    """Caps request bodies (``limits`` by path, else ``default``; not under
    ``exempt_prefix``, whose routes stream and enforce their own limit) with a
    ``too_large`` error in the usual shape, before anything reads or parses them."""

    def __init__(self, app, default: int, limits: dict[str, int], exempt_prefix: str) -> None:
        self.app, self.default, self.limits, self.exempt_prefix = app, default, limits, exempt_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefix):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    response = _body(413, "too_large", "request body too large")
                    return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Re-raised by FastAPI's body reader, then mapped by _http below.
                    raise StarletteHTTPException(413, "request body too large")
            return message

        return await self.app(scope, limited_receive, send)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        return _body(exc.status, exc.code, exc.detail, exc.headers, exc.op_index)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        return _body(422, "validation", _one_line_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        return _body(exc.status_code, code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Unavailable)
    async def _unavailable(_req: Request, exc: Unavailable):
        log.warning("%s", exc)
        e = unavailable()
        return _body(e.status, e.code, e.detail, e.headers)

    @app.exception_handler(OverflowError)
    async def _overflow(_req: Request, _exc: OverflowError):
        # e.g. an integer too large for sqlite: a client error, not a server fault
        return _body(400, "invalid", "integer out of range")

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception):
        # Starlette re-raises after sending this, so uvicorn logs the traceback.
        log.error("internal error on %s %s: %s", req.method, req.url.path, type(exc).__name__)
        return _body(500, "internal", "internal server error")
