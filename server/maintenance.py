"""Start-up and periodic cleanup: temp files, stale staged blobs, old orphans,
expired links.

Safe with several API nodes running it at once: a staged blob is first claimed
in the database (a commit no longer accepts it), then its object deleted, then
its row; two nodes may claim and delete the same one, which is harmless. A
direct-upload URL expires long before its blob is old enough to be swept, so
nothing can be written after the sweep.
"""
from __future__ import annotations

import logging
import time

from .config import BATCH_RESULT_MAX_AGE, DIRECT_URL_TTL, ORPHAN_MAX_AGE, STAGED_MAX_AGE
from .db import MetadataStore
from .linkstore import LinkStore
from .storage import BlobStore

log = logging.getLogger("zkfs.server")

assert DIRECT_URL_TTL * 4 < STAGED_MAX_AGE


def expire(db: MetadataStore, store: BlobStore, now: float | None = None) -> tuple[int, int]:
    """Drop staged blobs older than STAGED_MAX_AGE, orphans older than ORPHAN_MAX_AGE and
    the copies of links that expired (metadata first, then the objects), and old batch
    answers. Returns (blobs, inodes) removed."""
    now = time.time() if now is None else now
    staged = db.claim_staged(now - STAGED_MAX_AGE)
    for user, inode, blob in staged:
        store.delete_blobs(user, inode, [blob])
    if staged:
        db.forget_swept(staged)
    orphans = db.expire_orphans(now - ORPHAN_MAX_AGE)
    db.forget_batches(now - BATCH_RESULT_MAX_AGE)
    for user, inode, blobs in orphans:
        store.delete_blobs(user, inode, blobs)
        store.delete_inode(user, inode)
    links = LinkStore(db).sweep(now)
    for ended in links:
        store.delete_inode(ended.user_id, ended.store_id)
    if staged or orphans or links:
        log.info("cleanup: removed %d staged blob(s), %d orphan inode(s), %d expired link(s)",
                 len(staged), len(orphans), len(links))
    return len(staged), len(orphans)


def startup(db: MetadataStore, store: BlobStore) -> None:
    """Run once before serving (in the main process when there are several workers)."""
    n = store.cleanup_temp()
    if n:
        log.info("cleanup: removed %d temp file(s)", n)
    remove_legacy = getattr(store, "remove_legacy_keys", None)
    if remove_legacy is not None and (n := remove_legacy()):
        log.info("cleanup: removed %d key object(s) the schema migration moved into the database", n)
    expire(db, store)
