"""Wrapped per-file keys (a column of each file's inode record)."""
from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Response

from .. import errors as E
from ..auth import CurrentAccess, CurrentUser
from ..models import Error, KeyBatchRequest, KeyListResponse, WrappedKeyResponse
from .common import DbDep, b64decode

router = APIRouter(tags=["keys"], responses={401: {"model": Error}, 404: {"model": Error},
                                             422: {"model": Error}})


@router.get("/fs/inodes/{inode}/key", response_model=WrappedKeyResponse)
def get_key(inode: UUID, access: CurrentAccess, db: DbDep):
    found = db.get_key(access.owner.id, inode, access.share)
    if found is None:
        raise E.not_found("no file key for this inode")
    gen, wrapped, share = found
    return WrappedKeyResponse(inode=inode, gen=gen, wrapped_key=wrapped, share=share)


@router.get("/keys", response_model=KeyListResponse)
def list_keys(user: CurrentUser, db: DbDep):
    return KeyListResponse(keys=[WrappedKeyResponse(inode=i, gen=g, wrapped_key=k, share=sh)
                                 for i, g, k, sh in db.list_keys(user.id)])


@router.put("/keys", status_code=204, responses={400: {"model": Error}, 507: {"model": Error}})
def put_keys(body: KeyBatchRequest, user: CurrentUser, db: DbDep):
    seen: set[UUID] = set()
    for k in body.keys:
        if k.inode in seen:
            raise E.invalid(f"inode {k.inode} listed twice")
        seen.add(k.inode)
        b64decode(k.wrapped_key, f"wrapped_key of {k.inode}")
    db.set_keys(user, [(k.inode, k.gen, k.wrapped_key) for k in body.keys])
    return Response(status_code=204)
