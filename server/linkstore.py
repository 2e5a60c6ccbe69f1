"""Link records (docs/FORMAT.md §8): what the server keeps of a link for anyone, and
the reads that serve it anonymously.

A link serves the version of one file it was made of: the server copies that
version's manifest token into the link's row and its chunks to objects of the
link's own (``<user>/<store_id>/<blob>``), charged to the owner, so the file may
change or be deleted meanwhile. Everything else in the row is the owner's sealed
record and note (opaque here), the expiry and the revocation. An ended link (revoked,
or expired and swept) keeps its row without record, manifest or chunks, so it answers
410 rather than 404, until it is pruned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence
from uuid import UUID

from . import errors as E
from .db import MetadataStore, UserRecord
from .namespace import check_quota
from .sqldb import Tx, UniqueViolation

ENDED_KEPT = 30 * 86400        # an ended link answers 410 (not 404) this long


def _s(u: UUID) -> str:
    return str(u)


@dataclass(frozen=True)
class LinkRow:
    id: UUID
    inode: UUID
    version: int
    store_id: UUID
    charged: int
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    note: str | None
    live: bool              # record, manifest and chunks still kept

    def active(self, now: float) -> bool:
        return self.live and self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class PublicLink:
    """A link as its anonymous endpoints see it."""
    user_id: UUID
    store_id: UUID
    active: bool
    record: str | None


@dataclass(frozen=True)
class Ended:
    """What a revocation or an expiry sweep leaves to delete from the blob store."""
    user_id: UUID
    store_id: UUID


_COLS = "id, inode, version, store_id, charged, created_at, expires_at, revoked_at, note, record IS NOT NULL"


def _row(r) -> LinkRow:
    return LinkRow(UUID(r[0]), UUID(r[1]), r[2], UUID(r[3]), r[4], r[5], r[6], r[7], r[8], bool(r[9]))


class LinkStore:
    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta
        self.db = meta.db

    # -- the owner's
    def snapshot(self, user_id: UUID, inode: UUID, version: int) -> tuple[str | None, list[tuple[UUID, int]]]:
        """The manifest token and the chunks (blob, size) of ``inode`` at ``version``:
        a file's committed blobs are exactly its current version's (a commit drops
        the others in its transaction)."""
        uid, ino = _s(user_id), _s(inode)

        def run(c: Tx):
            row = c.one("SELECT is_dir, version, manifest FROM inodes WHERE user_id = ? AND id = ?", (uid, ino))
            if row is None:
                raise E.not_found("no such inode")
            if row[0]:
                raise E.is_dir("a link opens a file, not a directory")
            if row[1] != version:
                raise E.conflict(f"version is {row[1]}, not {version}")
            blobs = c.all("SELECT blob_id, size FROM blobs WHERE user_id = ? AND inode = ? AND committed = 1",
                          (uid, ino))
            return row[2], [(UUID(b), n) for b, n in blobs]
        return self.db.transaction(run, write=False)

    def add(self, user: UserRecord, link_id: UUID, inode: UUID, version: int, store_id: UUID,
            record: str, manifest: str | None, note: str, blobs: Sequence[tuple[UUID, int]],
            expires_at: float | None) -> tuple[float, int]:
        """Record a link whose chunks were copied to ``store_id``; refused (nothing
        recorded) if the file moved past ``version`` meanwhile (its chunks may have gone
        before they were copied), the id is taken, or the quota would be exceeded.
        Returns the creation time and the bytes charged."""
        uid = _s(user.id)
        charged = sum(n for _b, n in blobs) + len(record) + len(manifest or "")
        now = time.time()

        def run(c: Tx) -> tuple[float, int]:
            used = c.lock_row("SELECT used_bytes FROM users WHERE id = ?", (uid,))[0]
            row = c.one("SELECT version FROM inodes WHERE user_id = ? AND id = ?", (uid, _s(inode)))
            if row is None or row[0] != version:
                raise E.conflict("the file changed while the link was being made")
            if c.one("SELECT 1 FROM links WHERE id = ?", (_s(link_id),)):
                raise E.exists("link id taken")
            check_quota(used, charged, self.meta.quota_of(user))
            c.run("INSERT INTO links(id, user_id, inode, version, store_id, record, manifest, note, charged,"
                  " created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                  (_s(link_id), uid, _s(inode), version, _s(store_id), record, manifest, note, charged, now,
                   expires_at))
            c.many("INSERT INTO link_blobs(link_id, blob_id, user_id, size) VALUES (?,?,?,?)",
                   [(_s(link_id), _s(b), uid, n) for b, n in blobs])
            c.run("UPDATE users SET used_bytes = used_bytes + ? WHERE id = ?", (charged, uid))
            return now, charged
        try:
            return self.db.transaction(run)
        except UniqueViolation:
            raise E.exists("link id taken") from None

    def list(self, user_id: UUID) -> list[LinkRow]:
        rows = self.db.all(f"SELECT {_COLS} FROM links WHERE user_id = ? ORDER BY created_at, id", (_s(user_id),))
        return [_row(r) for r in rows]

    def revoke(self, user_id: UUID, link_id: UUID) -> Ended | None:
        """End one of the user's links now (not_found if it is not theirs); returns
        what to delete, None if it had ended already."""
        def run(c: Tx) -> Ended | None:
            row = c.lock_row("SELECT store_id, revoked_at FROM links WHERE id = ? AND user_id = ?",
                             (_s(link_id), _s(user_id)))
            if row is None:
                raise E.not_found("no such link")
            if row[1] is None:
                c.run("UPDATE links SET revoked_at = ? WHERE id = ?", (time.time(), _s(link_id)))
            ended = self._empty(c, [(link_id, user_id, UUID(row[0]))])
            return ended[0] if ended else None
        return self.db.transaction(run)

    # -- maintenance
    def sweep(self, now: float) -> list[Ended]:
        """Empty the links that expired (several nodes may sweep at once: each row is
        claimed by one UPDATE) and drop the rows of those ended long ago."""
        def run(c: Tx) -> list[Ended]:
            rows = c.all("SELECT id, user_id, store_id FROM links WHERE record IS NOT NULL AND expires_at <= ?",
                         (now,))
            ended = self._empty(c, [(UUID(i), UUID(u), UUID(s)) for i, u, s in rows])
            c.run("DELETE FROM links WHERE record IS NULL AND coalesce(revoked_at, expires_at) < ?",
                  (now - ENDED_KEPT,))
            return ended
        return self.db.transaction(run)

    @staticmethod
    def _empty(c: Tx, links: list[tuple[UUID, UUID, UUID]]) -> list[Ended]:
        """Drop the record, manifest and chunk rows of ``links`` (id, user, store id) and
        uncharge their owners."""
        ended = []
        for link_id, user_id, store_id in links:
            row = c.one("UPDATE links SET record = NULL, manifest = NULL WHERE id = ? AND record IS NOT NULL"
                        " RETURNING charged", (_s(link_id),))
            if row is None:
                continue
            c.run("DELETE FROM link_blobs WHERE link_id = ?", (_s(link_id),))
            c.run("UPDATE users SET used_bytes = used_bytes - ? WHERE id = ?", (row[0], _s(user_id)))
            ended.append(Ended(user_id, store_id))
        return ended

    # -- anonymous reads
    def public(self, link_id: UUID, now: float) -> PublicLink | None:
        row = self.db.one("SELECT user_id, store_id, record, expires_at, revoked_at FROM links WHERE id = ?",
                          (_s(link_id),))
        if row is None:
            return None
        active = row[2] is not None and row[4] is None and (row[3] is None or row[3] > now)
        return PublicLink(UUID(row[0]), UUID(row[1]), active, row[2] if active else None)

    def public_manifest(self, link_id: UUID) -> str | None:
        row = self.db.one("SELECT manifest FROM links WHERE id = ?", (_s(link_id),))
        return row[0] if row else None

    def public_blob_size(self, link_id: UUID, blob_id: UUID) -> int | None:
        row = self.db.one("SELECT size FROM link_blobs WHERE link_id = ? AND blob_id = ?", (_s(link_id), _s(blob_id)))
        return row[0] if row else None
