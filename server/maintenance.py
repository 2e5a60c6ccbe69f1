"""Start-up and periodic cleanup: temp files, stale staged blobs, old orphans."""
from __future__ import annotations

import logging
import time

from .config import ORPHAN_MAX_AGE, STAGED_MAX_AGE
from .db import MetadataStore
from .storage import BlobStore

log = logging.getLogger("zkfs.server")


def expire(db: MetadataStore, store: BlobStore, now: float | None = None) -> tuple[int, int]:
    """Drop staged blobs older than 1 h and orphans older than 24 h (metadata first,
    then the objects). Returns (blobs, inodes) removed."""
    now = time.time() if now is None else now
    staged = db.expire_staged(now - STAGED_MAX_AGE)
    for user, inode, blob in staged:
        store.delete_blobs(user, inode, [blob])
    orphans = db.expire_orphans(now - ORPHAN_MAX_AGE)
    for user, inode in orphans:
        store.delete_inode(user, inode)
    if staged or orphans:
        log.info("cleanup: removed %d staged blob(s), %d orphan inode(s)", len(staged), len(orphans))
    return len(staged), len(orphans)


def startup(db: MetadataStore, store: BlobStore) -> None:
    """Run once before serving (in the main process when there are several workers)."""
    n = store.cleanup_temp()
    if n:
        log.info("cleanup: removed %d temp file(s)", n)
    expire(db, store)
