"""Blob objects: streamed upload (staged until a commit references them) and
streamed, range-capable download."""
from __future__ import annotations

import re
from typing import Annotated, AsyncIterator, Iterator
from uuid import UUID

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from .. import errors as E
from ..auth import CurrentAccess
from ..models import BlobUrl, BlobUrlsResponse, DownloadUrlsRequest, Error, UploadUrlsRequest
from ..namespace import check_quota, quota_room
from ..storage import BlobStore
from .common import DbDep, SettingsDep, StoreDep

router = APIRouter(prefix="/blobs", tags=["blobs"],
                   responses={401: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}})

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class Unsatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, None to serve the whole body
    (absent, malformed or multi-range headers are ignored, as RFC 9110 allows)."""
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:                       # suffix: last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable(size)
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable(size)
    end = min(size, int(last) + 1) if last else size
    return start, end


@router.put("/{inode}/{blob_id}", status_code=201,
            responses={201: {"description": "stored (staged until a commit references it)"},
                       409: {"model": Error}, 413: {"model": Error}, 507: {"model": Error}},
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def put_blob(inode: UUID, blob_id: UUID, request: Request, access: CurrentAccess,
                   db: DbDep, store: StoreDep, settings: SettingsDep):
    """Raw body, streamed to disk (temp file, fsync, rename); 201 when stored."""
    access.scope.require_write()
    user = access.owner
    limit = settings.max_blob_bytes
    declared = None
    if request.headers.get("content-length"):
        try:
            declared = int(request.headers["content-length"])
        except ValueError:
            raise E.invalid("bad Content-Length") from None
        if declared > limit:
            raise E.too_large(f"blob larger than {limit} bytes")
    used = await run_in_threadpool(db.check_blob_target, user, inode, blob_id, access.share)
    room = quota_room(used, db.quota_of(user))
    if declared is not None:
        check_quota(used, declared, db.quota_of(user))
        free = store.free_bytes()
        if free is not None and declared > free:
            raise E.no_space("server storage is full")

    async def chunks() -> AsyncIterator[bytes]:
        received = 0
        async for chunk in request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > limit:
                raise E.too_large(f"blob larger than {limit} bytes")
            if room is not None and received > room:     # refused early; add_blob decides
                raise E.no_space("quota exceeded")
            yield chunk

    try:
        staged = await store.stage_stream(user.id, inode, blob_id, chunks(), limit)
    except ClientDisconnect:
        raise E.invalid("client disconnected during upload") from None
    try:
        await run_in_threadpool(db.add_blob, user, inode, blob_id, staged.size, pre_commit=staged.commit,
                                scope=access.scope)
    except BaseException:
        staged.discard()
        raise
    return Response(status_code=201)


@router.post("/upload-urls", response_model=BlobUrlsResponse,
             responses={409: {"model": Error}, 413: {"model": Error}, 507: {"model": Error}})
def upload_urls(body: UploadUrlsRequest, access: CurrentAccess, db: DbDep, store: StoreDep, settings: SettingsDep):
    """Short-lived URLs to PUT exactly ``size`` bytes of each blob straight into the
    object store (409 ``direct_unavailable`` when the store cannot: then PUT here).
    The blobs are staged from now on, all or none, charged at their declared
    sizes; a commit checks each arrived with its size."""
    if not store.direct:
        raise E.direct_unavailable()
    access.scope.require_write()
    user = access.owner
    if any(b.size > settings.max_blob_bytes for b in body.blobs):
        raise E.too_large(f"blob larger than {settings.max_blob_bytes} bytes")
    wanted = {(b.inode, b.blob_id): b.size for b in body.blobs}
    if len(wanted) != len(body.blobs):
        raise E.invalid("a blob is listed twice")
    db.stage_blobs(user, [(i, b, n) for (i, b), n in wanted.items()], verified=False, scope=access.scope)
    ttl = settings.direct_url_ttl
    return BlobUrlsResponse(urls=[BlobUrl(inode=i, blob_id=b, url=store.presign_put(user.id, i, b, n, ttl))
                                  for (i, b), n in wanted.items()], expires_in=ttl)


@router.post("/download-urls", response_model=BlobUrlsResponse, responses={409: {"model": Error}})
def download_urls(body: DownloadUrlsRequest, access: CurrentAccess, db: DbDep, store: StoreDep,
                  settings: SettingsDep):
    """Short-lived GET URLs for up to 256 blobs at once (a reader asks for the next
    chunks of a file in one request instead of one 307 each); blobs the user does
    not have are left out. 409 ``direct_unavailable`` without an object store."""
    if not store.direct:
        raise E.direct_unavailable()
    ttl = settings.direct_url_ttl
    user = access.owner
    found = db.existing_blobs(user.id, [(b.inode, b.blob_id) for b in body.blobs], access.share)
    return BlobUrlsResponse(urls=[BlobUrl(inode=i, blob_id=b, url=store.presign_get(user.id, i, b, ttl))
                                  for i, b in found], expires_in=ttl)


# A range up to this size is read in the same worker-thread call that looks the
# blob up and sent as one body (one threadpool hop per request instead of one
# per 1 MiB piece plus two); larger ones stream. Chunks are 1 MiB.
_BUFFERED_MAX = 4 * 1024 * 1024


def read_range(store: BlobStore, user: UUID, inode: UUID, blob: UUID, size: int,
               range_header: str | None) -> tuple[tuple[int, int] | None, bytes | Iterator[bytes]]:
    """The range a request asks of a stored chunk of ``size`` bytes (None: all of it)
    and its bytes (call in a worker thread; Unsatisfiable for a range past the end)."""
    rng = parse_range(range_header, size)
    start, end = rng if rng is not None else (0, size)
    body = store.open_range(user, inode, blob, start, end)
    return rng, (b"".join(body) if end - start <= _BUFFERED_MAX else body)


def unsatisfiable(exc: Unsatisfiable) -> JSONResponse:
    return JSONResponse({"detail": "range not satisfiable", "code": "invalid_range"},
                        status_code=416, headers={"Content-Range": f"bytes */{exc.size}"})


def blob_response(size: int, rng: tuple[int, int] | None, body: bytes | Iterator[bytes],
                  cache: str) -> Response:
    """200 with the whole chunk, or 206 with the range (``Content-Range``)."""
    start, end = rng if rng is not None else (0, size)
    headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes", "Cache-Control": cache}
    status = 200
    if rng is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if isinstance(body, bytes):
        return Response(body, status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(body, status_code=status, headers=headers,
                             media_type="application/octet-stream")


@router.get("/{inode}/{blob_id}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       206: {"content": {"application/octet-stream": {}}},
                       307: {"description": "fetch the blob from the Location URL (object stores)"},
                       416: {"model": Error}})
async def get_blob(inode: UUID, blob_id: UUID, access: CurrentAccess, db: DbDep, store: StoreDep,
                   settings: SettingsDep, range_: Annotated[str | None, Header(alias="range")] = None):
    """The blob's bytes, or (object stores) a 307 to a short-lived URL of it."""
    user = access.owner

    def locate() -> tuple[int, tuple[int, int] | None, bytes | Iterator[bytes] | str]:
        rec = db.get_blob(user.id, inode, blob_id, access.share)
        if rec is None:
            raise E.not_found("no such blob")
        if store.direct:
            parse_range(range_, rec.size)        # unsatisfiable: 416 here, not from the store
            return rec.size, None, store.presign_get(user.id, inode, blob_id, settings.direct_url_ttl)
        return (rec.size, *read_range(store, user.id, inode, blob_id, rec.size, range_))

    try:
        size, rng, body = await run_in_threadpool(locate)
    except Unsatisfiable as exc:
        return unsatisfiable(exc)
    if isinstance(body, str):
        return Response(status_code=307, headers={"Location": body, "Cache-Control": "no-store"})
    return blob_response(size, rng, body, "private, max-age=31536000, immutable")
