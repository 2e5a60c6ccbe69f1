"""Wrapped per-file keys (stored as the ``key`` object of each inode)."""
from __future__ import annotations

import base64
import logging
from uuid import UUID

from fastapi import APIRouter, Response

from .. import errors as E
from ..auth import CurrentUser
from ..models import Error, KeyBatchRequest, KeyListResponse, WrappedKeyResponse
from ..storage import Staged
from .common import DbDep, StoreDep, b64decode, commit_all, discard_all, done_all

log = logging.getLogger("zkfs.server")

router = APIRouter(tags=["keys"], responses={401: {"model": Error}, 404: {"model": Error},
                                             422: {"model": Error}})


@router.get("/fs/inodes/{inode}/key", response_model=WrappedKeyResponse)
def get_key(inode: UUID, user: CurrentUser, db: DbDep, store: StoreDep):
    gen = db.key_gen(user.id, inode)
    data = store.get_key(user.id, inode) if gen is not None else None
    if data is None:
        raise E.not_found("no file key for this inode")
    return WrappedKeyResponse(inode=inode, gen=gen, wrapped_key=base64.b64encode(data).decode())


@router.get("/keys", response_model=KeyListResponse)
def list_keys(user: CurrentUser, db: DbDep, store: StoreDep):
    out = []
    for inode, gen in db.key_gens(user.id):
        data = store.get_key(user.id, inode)
        if data is None:
            log.warning("file key object missing for an inode")
            continue
        out.append(WrappedKeyResponse(inode=inode, gen=gen, wrapped_key=base64.b64encode(data).decode()))
    return KeyListResponse(keys=out)


@router.put("/keys", status_code=204, responses={400: {"model": Error}})
def put_keys(body: KeyBatchRequest, user: CurrentUser, db: DbDep, store: StoreDep):
    seen: set[UUID] = set()
    decoded = []
    for k in body.keys:
        if k.inode in seen:
            raise E.invalid(f"inode {k.inode} listed twice")
        seen.add(k.inode)
        decoded.append((k.inode, k.gen, b64decode(k.wrapped_key, f"wrapped_key of {k.inode}")))
    staged: list[Staged] = []
    try:
        for inode, _gen, data in decoded:
            staged.append(store.stage_key(user.id, inode, data))
        db.set_key_gens(user.id, [(i, g) for i, g, _ in decoded], pre_commit=commit_all(staged))
    except BaseException:
        discard_all(staged)
        raise
    done_all(staged)
    return Response(status_code=204)
