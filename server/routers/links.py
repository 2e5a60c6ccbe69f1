"""Links for anyone, the owner's side: make one (of a file's current version), list
them, revoke one. What anyone with the URL gets is server/routers/public_links.py."""
from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated
from uuid import UUID, uuid4

from fastapi import APIRouter, Depends, Path, Response

from .. import errors as E
from ..auth import CurrentUser
from ..deps import get_links
from ..linkstore import LinkStore
from ..models import Error, LinkCreateRequest, LinkId, LinkListResponse, LinkOut
from .common import StoreDep, b64decode

router = APIRouter(prefix="/links", tags=["links"],
                   responses={401: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}})

LinksDep = Annotated[LinkStore, Depends(get_links)]
_COPIES_IN_FLIGHT = 8


def link_uuid(text: str) -> UUID | None:
    """The 22-character id of a URL as the UUID it stands for (16 bytes); None unless
    ``text`` is one, in its one canonical spelling."""
    try:
        link_id = UUID(bytes=base64.urlsafe_b64decode(text + "=="))
    except ValueError:
        return None
    return link_id if link_text(link_id) == text else None


def link_text(link_id: UUID) -> str:
    return base64.urlsafe_b64encode(link_id.bytes).rstrip(b"=").decode()


@router.post("", status_code=201, response_model=LinkOut,
             responses={409: {"model": Error}, 507: {"model": Error}})
def create_link(body: LinkCreateRequest, user: CurrentUser, links: LinksDep, store: StoreDep):
    """A link serving ``inode`` as it is at ``version`` (409 ``conflict`` if that is not
    its current version, or it changes before the link is recorded): its manifest and
    chunks are copied for the link, whatever becomes of the file."""
    b64decode(body.record, "record")
    b64decode(body.note, "note")
    link_id = link_uuid(body.id)
    if link_id is None:
        raise E.invalid("the link id is not 16 bytes in base64url")
    manifest, blobs = links.snapshot(user.id, body.inode, body.version)
    store_id = uuid4()
    try:
        with ThreadPoolExecutor(_COPIES_IN_FLIGHT) as pool:
            list(pool.map(lambda blob: store.copy_blob(user.id, body.inode, blob, store_id), [b for b, _ in blobs]))
        store.sync_inode(user.id, store_id)
    except E.ApiError as exc:
        store.delete_inode(user.id, store_id)
        if exc.code == "not_found":         # a commit dropped it after the snapshot
            raise E.conflict("the file changed while the link was being made") from None
        raise
    except BaseException:
        store.delete_inode(user.id, store_id)
        raise
    expires_at = time.time() + body.expires_in if body.expires_in is not None else None
    try:
        created, charged = links.add(user, link_id, body.inode, body.version, store_id, body.record, manifest,
                            body.note, blobs, expires_at)
    except BaseException:
        store.delete_inode(user.id, store_id)
        raise
    return LinkOut(id=body.id, inode=body.inode, version=body.version, size=charged,
                   created_at=created, expires_at=expires_at, revoked_at=None, active=True, note=body.note)


@router.get("", response_model=LinkListResponse)
def list_links(user: CurrentUser, links: LinksDep):
    """Every link of the account, ended ones too (for 30 days)."""
    now = time.time()
    return LinkListResponse(links=[
        LinkOut(id=link_text(r.id), inode=r.inode, version=r.version, size=r.charged, created_at=r.created_at,
                expires_at=r.expires_at, revoked_at=r.revoked_at, active=r.active(now), note=r.note)
        for r in links.list(user.id)])


@router.delete("/{link_id}", status_code=204)
def revoke_link(link_id: Annotated[LinkId, Path()], user: CurrentUser, links: LinksDep, store: StoreDep):
    """Ends the link at once: every request for it answers 410 from now on, and its
    record, manifest and chunk copies are deleted (a link that ended already: 204 too)."""
    found = link_uuid(link_id)
    if found is None:
        raise E.not_found("no such link")
    ended = links.revoke(user.id, found)
    if ended is not None:
        store.delete_inode(ended.user_id, ended.store_id)
    return Response(status_code=204)
