"""Shared router helpers."""
from __future__ import annotations

import base64
import binascii
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Iterable, Sequence
from uuid import UUID

from fastapi import Depends, Request

from .. import errors as E
from ..config import Settings
from ..db import MetadataStore
from ..deps import get_db, get_settings, get_store
from ..storage import BlobStore, Staged

SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[MetadataStore, Depends(get_db)]
StoreDep = Annotated[BlobStore, Depends(get_store)]


def b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise E.invalid(f"{what} is not valid base64") from None


def client_addr(request: Request) -> str:
    """The peer's address; X-Forwarded-For replaces it only from a configured proxy
    (uvicorn's forwarded_allow_ips, set from --trusted-proxy)."""
    return request.client.host if request.client else "unknown"


def commit_all(staged: list[Staged]):
    def run() -> None:
        for s in staged:
            s.commit()
    return run


def discard_all(staged: Iterable[Staged]) -> None:
    for s in staged:
        s.discard()


def drop_objects(store: BlobStore, user: UUID, blobs: list[tuple[UUID, UUID]],
                 inodes: list[UUID]) -> None:
    """Remove storage objects whose metadata is already gone (after a commit)."""
    gone = set(inodes)
    by_inode: dict[UUID, list[UUID]] = {}
    for ino, blob in blobs:
        if ino not in gone:
            by_inode.setdefault(ino, []).append(blob)
    for ino, ids in by_inode.items():
        store.delete_blobs(user, ino, ids)
    for ino in inodes:
        store.delete_inode(user, ino)


def verify_direct_uploads(db: MetadataStore, store: BlobStore, user: UUID,
                          wanted: Sequence[tuple[UUID, UUID]]) -> None:
    """Blobs a client put straight into the object store are believed only once
    they are there with the size declared for their URL (before a commit may
    reference them)."""
    pending = db.unverified_blobs(user, wanted)
    if not pending:
        return
    # One listing per inode (1,000 objects a request) instead of one HEAD per chunk.
    inodes = list(dict.fromkeys(i for i, _b, _n in pending))
    with ThreadPoolExecutor(min(8, len(inodes))) as pool:
        listed = dict(zip(inodes, pool.map(lambda ino: store.sizes(user, ino), inodes)))
    for ino, blob, declared in pending:
        actual = listed[ino].get(blob)
        if actual is None:
            raise E.invalid(f"blob {blob} was never uploaded")
        if actual != declared:
            raise E.invalid(f"blob {blob} has {actual} bytes, not the {declared} declared")
    db.mark_verified(user, [(i, b) for i, b, _ in pending])
