"""Namespace: inodes, directory listings, statfs, change feed and the ops batch."""
from __future__ import annotations

import logging
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, Query

from .. import errors as E
from ..auth import CurrentAccess, CurrentUser
from ..db import EntryRecord, InodeRecord
from ..models import (ChangesResponse, DirListing, EntryList, EntryOut, Error, InodeOut, ListingsRequest,
                      ListingsResponse, NameHash, OpResult, OpsRequest, OpsResponse, StatfsResponse)
from ..namespace import quota_room
from ..sqldb import UniqueViolation
from ..storage import Staged
from .common import (DbDep, StoreDep, b64decode, commit_all, discard_all, drop_objects,
                     verify_direct_uploads)

log = logging.getLogger("zkfs.server")

router = APIRouter(prefix="/fs", tags=["namespace"],
                   responses={401: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}})


def _inode_out(rec: InodeRecord, with_manifest: bool = False) -> InodeOut:
    return InodeOut(id=rec.id, is_dir=rec.is_dir, version=rec.version, nlink=rec.nlink,
                    meta=rec.meta, manifest=rec.manifest if with_manifest else None)


def _entry_out(rec: EntryRecord) -> EntryOut:
    return EntryOut(name_hash=rec.name_hash, name=rec.name, inode=_inode_out(rec.inode))


@router.get("/inodes/{inode}", response_model=InodeOut)
def get_inode(inode: UUID, access: CurrentAccess, db: DbDep):
    rec = db.get_inode(access.owner.id, inode, access.share)
    if rec is None:
        raise E.not_found("no such inode")
    return _inode_out(rec, with_manifest=True)


@router.get("/dirs/{inode}/entries", response_model=EntryList)
def list_entries(inode: UUID, access: CurrentAccess, db: DbDep):
    found = db.list_entries(access.owner.id, inode, access.share)
    if found is None:
        raise E.not_found("no such directory")
    directory, entries = found
    return EntryList(dir=_inode_out(directory), entries=[_entry_out(e) for e in entries])


# What statfs reports free when neither a quota nor the store bounds it (1 PiB).
UNBOUNDED_FREE = 1 << 50

# Bounds one response (~0.5 KB of JSON per entry) while a batch of typical
# folders still fits.
MAX_LISTED_ENTRIES = 10_000


@router.post("/listings", response_model=ListingsResponse)
def list_many(body: ListingsRequest, access: CurrentAccess, db: DbDep):
    """Several directories' listings in one request (the mount reads ahead the
    folders it is about to be asked for). Unknown ids are left out; so are the
    listings after the one that would pass MAX_LISTED_ENTRIES."""
    found = db.list_entries_many(access.owner.id, body.dirs, MAX_LISTED_ENTRIES, access.share)
    return ListingsResponse(listings=[DirListing(dir=_inode_out(d), entries=[_entry_out(e) for e in entries])
                                      for d, entries in found])


@router.get("/dirs/{inode}/entries/{name_hash}", response_model=EntryOut)
def lookup_entry(inode: UUID, name_hash: Annotated[NameHash, Path()], access: CurrentAccess, db: DbDep):
    rec = db.lookup_entry(access.owner.id, inode, name_hash, access.share)
    if rec is None:
        raise E.not_found("no such entry")
    return _entry_out(rec)


@router.get("/statfs", response_model=StatfsResponse)
def statfs(user: CurrentUser, db: DbDep, store: StoreDep):
    used = db.used_bytes(user.id)
    quota = db.quota_of(user)
    free = store.free_bytes()
    room = quota_room(used, quota)
    if room is not None:
        free = room if free is None else min(free, room)
    return StatfsResponse(quota_bytes=quota, used_bytes=used,
                          free_bytes=free if free is not None else UNBOUNDED_FREE)


@router.get("/changes", response_model=ChangesResponse)
def changes(access: CurrentAccess, db: DbDep, since: Annotated[int, Query(ge=0, le=2**62)] = 0):
    """The account's feed, or a share's (a member's: seq numbers are the owner's
    account's; key_gen and shares_seq are 0, they belong to the member's own feed)."""
    seq, changed, shares_seq = db.changes(access.owner.id, since, access.share)
    own = access.share is None
    return ChangesResponse(seq=seq, inodes=[i for i, _ in changed], seqs=[n for _, n in changed],
                           key_gen=access.user.current_gen if own else 0, shares_seq=shares_seq if own else 0)


@router.post("/ops", response_model=OpsResponse,
             responses={400: {"model": Error}, 409: {"model": Error}, 507: {"model": Error}})
def apply_ops(body: OpsRequest, access: CurrentAccess, db: DbDep, store: StoreDep):
    """All ops in one transaction: all or nothing (see docs/API.md). With the share
    header: a member's ops, on that share's inodes only (read-only members: 403)."""
    access.scope.require_write()
    user = access.owner
    if body.batch_id is not None:
        answer = db.batch_answer(user.id, body.batch_id)
        if answer is not None:                 # sent again: applied once already
            return OpsResponse(**answer)
    # Decode everything first so a bad request touches nothing.
    inline: list[tuple[UUID, UUID, bytes]] = []
    inline_sizes: dict[tuple[UUID, UUID], int] = {}
    for i, op in enumerate(body.ops):
        if op.op == "commit":
            for ib in op.inline:
                if (op.inode, ib.blob_id) in inline_sizes:
                    raise E.invalid(f"op {i}: inline blob {ib.blob_id} given twice")
                data = b64decode(ib.data, f"op {i}: inline blob {ib.blob_id}")
                inline_sizes[(op.inode, ib.blob_id)] = len(data)
                inline.append((op.inode, ib.blob_id, data))
        if op.op in ("create", "commit") and op.wrapped_key is not None:
            b64decode(op.wrapped_key, f"op {i}: wrapped_key")
    total = sum(inline_sizes.values())
    free = store.free_bytes()
    if total and free is not None and total > free:
        raise E.no_space("server storage is full")
    commits = [op for op in body.ops if op.op == "commit" and op.blobs]
    if commits and store.direct:
        verify_direct_uploads(db, store, user.id, [(op.inode, b) for op in commits for b in op.blobs])
    for op in commits:
        store.sync_inode(user.id, op.inode)
    staged: list[Staged] = []
    try:
        for ino, blob, data in inline:
            staged.append(store.stage_bytes(user.id, ino, blob, data))
        outcome = db.apply_ops(user.id, body.ops, inline_sizes,
                               pre_commit=commit_all(staged) if staged else None, batch_id=body.batch_id,
                               scope=access.scope)
    except UniqueViolation:
        discard_all(staged)
        # The same batch_id applied meanwhile (a concurrent retry): its answer stands.
        answer = db.batch_answer(user.id, body.batch_id) if body.batch_id else None
        if answer is None:
            raise
        return OpsResponse(**answer)
    except BaseException:
        discard_all(staged)
        raise
    try:
        drop_objects(store, user.id, outcome.drop_blobs, outcome.drop_inodes)
    except OSError:   # pragma: no cover - garbage only, metadata is already consistent
        log.warning("could not remove some unreferenced objects")
    return OpsResponse(seq=outcome.seq,
                       results=[OpResult(inode=i, version=v) for i, v in outcome.results])
