"""Links for anyone, the anonymous side: ``/s/<id>`` (outside /api/v1, no account).

What a link's URL reaches: the page that opens it in a browser (server/web/), the
link's sealed record, the manifest of the version it serves and that version's chunks
(the link's own copies: ``Range`` honoured, for single segments). Nothing else of the
account: no inode, name, listing or other blob is reachable from here. A revoked or
expired link answers 410 ``gone`` for everything, an unknown one 404; both, and every
opening, count against the caller's ``open`` budget, chunks against ``fetch``
(server/linklimit.py). The key is in the URL's fragment, which browsers never send.
"""
from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse

from .. import errors as E
from ..deps import get_link_limiter
from ..linklimit import LinkLimiter
from ..linkstore import PublicLink
from ..models import Error, LinkRecordResponse
from .blobs import Unsatisfiable, blob_response, read_range, unsatisfiable
from .common import StoreDep, client_addr
from .links import LinksDep, link_uuid

router = APIRouter(prefix="/s", tags=["links for anyone"],
                   responses={404: {"model": Error}, 410: {"model": Error}, 429: {"model": Error}})

LimiterDep = Annotated[LinkLimiter, Depends(get_link_limiter)]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# What the page loads, by name (nothing else under WEB_DIR is served). hash-wasm's
# Argon2id is installed from npm by `./zkfs.sh setup`, for links with a password.
STATIC = {
    "link.js": WEB_DIR / "link.js",
    "linkcrypto.js": WEB_DIR / "linkcrypto.js",
    "sw.js": WEB_DIR / "sw.js",
    "link.css": WEB_DIR / "link.css",
    "argon2.js": WEB_DIR / "node_modules" / "hash-wasm" / "dist" / "argon2.umd.min.js",
}
# The page runs no code but its own (and Argon2id's WebAssembly), talks to no one but
# this server, and cannot be framed; nothing it loads may send a Referer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
                               "connect-src 'self'; worker-src 'self'; frame-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
_ENDED_PAGE = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>zkfs link</title></head>"
               "<body><p>{}</p></body></html>")


@router.get("/static/{name}", include_in_schema=False)
def static(name: str):
    path = STATIC.get(name)
    if path is None or not path.is_file():
        raise E.not_found("no such file")
    return FileResponse(path, media_type="text/css" if name.endswith(".css") else "text/javascript",
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def _find(text: str, request: Request, links, limiter: LinkLimiter, *, counted: bool) -> tuple[UUID, PublicLink]:
    """The link named in the path, if it answers; unknown and ended links cost the
    caller an ``open`` (``counted``: one was counted already)."""
    link_id = link_uuid(text)
    found = links.public(link_id, time.time()) if link_id is not None else None
    if found is None or not found.active:
        if not counted:
            limiter.hit("open", client_addr(request))
        raise E.not_found("no such link") if found is None else E.gone()
    return link_id, found


@router.get("/{link_id}", response_class=HTMLResponse, include_in_schema=False)
def page(link_id: str, request: Request, links: LinksDep, limiter: LimiterDep):
    """The page that opens the link in the browser (200), or a line saying it is unknown
    (404) or ended (410)."""
    limiter.hit("open", client_addr(request))
    try:
        _find(link_id, request, links, limiter, counted=True)
    except E.ApiError as exc:
        text = "This link has expired or was revoked." if exc.status == 410 else "There is no such link."
        return HTMLResponse(_ENDED_PAGE.format(text), status_code=exc.status, headers=PAGE_HEADERS)
    return HTMLResponse((WEB_DIR / "link.html").read_text(), headers=PAGE_HEADERS)


@router.get("/{link_id}/record", response_model=LinkRecordResponse)
def record(link_id: str, request: Request, response: Response, links: LinksDep, limiter: LimiterDep):
    """The link's sealed record (docs/FORMAT.md §8)."""
    limiter.hit("open", client_addr(request))
    _, found = _find(link_id, request, links, limiter, counted=True)
    response.headers.update(NO_STORE)
    return LinkRecordResponse(record=found.record)


@router.get("/{link_id}/manifest", responses={200: {"content": {"application/octet-stream": {}}}})
def manifest(link_id: str, request: Request, links: LinksDep, limiter: LimiterDep):
    """The manifest token of the version the link serves (404 for an empty file, which
    has none)."""
    found_id, _ = _find(link_id, request, links, limiter, counted=False)
    limiter.hit("fetch", client_addr(request))
    token = links.public_manifest(found_id)
    if token is None:
        raise E.not_found("this link's file has no manifest")
    return Response(base64.b64decode(token), media_type="application/octet-stream", headers=NO_STORE)


@router.get("/{link_id}/blobs/{blob_id}",
            responses={200: {"content": {"application/octet-stream": {}}},
                       206: {"content": {"application/octet-stream": {}}}, 416: {"model": Error}})
async def blob(link_id: str, blob_id: UUID, request: Request, links: LinksDep, limiter: LimiterDep,
               store: StoreDep, range_: Annotated[str | None, Header(alias="range")] = None):
    """One chunk of the version the link serves (its bytes or a ``Range`` of them)."""
    def locate():
        found_id, found = _find(link_id, request, links, limiter, counted=False)
        limiter.hit("fetch", client_addr(request))
        size = links.public_blob_size(found_id, blob_id)
        if size is None:
            raise E.not_found("no such blob in this link")
        return (size, *read_range(store, found.user_id, found.store_id, blob_id, size, range_))

    try:
        size, rng, body = await run_in_threadpool(locate)
    except Unsatisfiable as exc:
        return unsatisfiable(exc)
    response = blob_response(size, rng, body, "no-store")
    response.headers.update(NO_STORE)
    return response
