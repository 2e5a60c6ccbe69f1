"""Metadata store: users, master keys, inodes, directory entries, blob records.

:class:`MetadataStore` is the narrow interface the routers use;
:class:`SqliteMetadataStore` implements it on one sqlite file (WAL mode,
``busy_timeout``, ``BEGIN IMMEDIATE`` for writes, one connection per thread), which
is safe with several uvicorn worker processes.

Every query is scoped by ``user_id``: another user's ids simply do not exist.
Every mutating namespace transaction bumps ``users.seq`` and stamps
``changed_seq`` on each inode it changed (including directories whose entries
changed); deleted inodes leave a tombstone so ``GET /fs/changes`` reports them.

Stored values are opaque base64 text (meta, names, manifests, wrapped keys):
nothing here decodes them.
"""
from __future__ import annotations

import abc
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence
from uuid import UUID

from . import errors as E
from .models import (KdfParams, MasterKeyRecord, OpCommit, OpCreate, OpDeleteInode, OpExchange,
                     OpLink, OpRename, OpRmdir, OpSetMeta, OpUnlink)

SCHEMA = """
CREATE TABLE IF NOT EXISTS users(
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    auth_hash TEXT NOT NULL,
    kdf_json TEXT NOT NULL,
    token_version INTEGER NOT NULL DEFAULT 1,
    current_gen INTEGER NOT NULL,
    root_inode TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    used_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS master_keys(
    user_id TEXT NOT NULL,
    gen INTEGER NOT NULL,
    wrapped_master TEXT NOT NULL,
    wrapped_namespace TEXT NOT NULL,
    PRIMARY KEY(user_id, gen)
);
CREATE TABLE IF NOT EXISTS inodes(
    user_id TEXT NOT NULL,
    id TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    version INTEGER NOT NULL,
    meta TEXT NOT NULL,
    manifest TEXT,
    key_gen INTEGER,
    changed_seq INTEGER NOT NULL DEFAULT 0,
    orphan_since REAL,
    PRIMARY KEY(user_id, id)
);
CREATE INDEX IF NOT EXISTS inodes_changed ON inodes(user_id, changed_seq);
CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes(orphan_since) WHERE orphan_since IS NOT NULL;
CREATE INDEX IF NOT EXISTS inodes_keygen ON inodes(user_id, key_gen) WHERE key_gen IS NOT NULL;
CREATE TABLE IF NOT EXISTS dentries(
    user_id TEXT NOT NULL,
    parent TEXT NOT NULL,
    name_hash TEXT NOT NULL,
    inode TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY(user_id, parent, name_hash)
);
CREATE INDEX IF NOT EXISTS dentries_inode ON dentries(user_id, inode);
CREATE TABLE IF NOT EXISTS blobs(
    user_id TEXT NOT NULL,
    inode TEXT NOT NULL,
    blob_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY(user_id, inode, blob_id)
);
CREATE INDEX IF NOT EXISTS blobs_staged ON blobs(created_at) WHERE committed = 0;
-- Usage for quotas kept by triggers: no code path can forget it, and a quota
-- check is one row read instead of a SUM over every blob of the user.
CREATE TRIGGER IF NOT EXISTS blobs_usage_add AFTER INSERT ON blobs BEGIN
    UPDATE users SET used_bytes = used_bytes + NEW.size WHERE id = NEW.user_id;
END;
CREATE TRIGGER IF NOT EXISTS blobs_usage_del AFTER DELETE ON blobs BEGIN
    UPDATE users SET used_bytes = used_bytes - OLD.size WHERE id = OLD.user_id;
END;
CREATE TABLE IF NOT EXISTS tombstones(
    user_id TEXT NOT NULL,
    inode TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY(user_id, inode)
);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(user_id, seq);
CREATE TABLE IF NOT EXISTS login_failures(
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures(key, at);
CREATE INDEX IF NOT EXISTS login_failures_at ON login_failures(at);
"""

_NLINK_SQL = """
CASE WHEN i.is_dir THEN 2 + (SELECT count(*) FROM dentries c
                              WHERE c.user_id = i.user_id AND c.parent = i.id AND c.is_dir = 1)
     ELSE (SELECT count(*) FROM dentries l WHERE l.user_id = i.user_id AND l.inode = i.id) END
"""


# ------------------------------------------------------------------ records
@dataclass(frozen=True)
class UserRecord:
    id: UUID
    username: str
    auth_hash: str
    kdf: KdfParams
    token_version: int
    current_gen: int
    root_inode: UUID
    seq: int


@dataclass(frozen=True)
class InodeRecord:
    id: UUID
    is_dir: bool
    version: int
    nlink: int
    meta: str
    manifest: str | None = None


@dataclass(frozen=True)
class EntryRecord:
    name_hash: str
    name: str
    inode: InodeRecord


@dataclass(frozen=True)
class BlobRecord:
    size: int
    committed: bool


@dataclass
class OpsOutcome:
    seq: int
    results: list[tuple[UUID | None, int | None]]
    drop_blobs: list[tuple[UUID, UUID]] = field(default_factory=list)   # (inode, blob)
    drop_inodes: list[UUID] = field(default_factory=list)


# ------------------------------------------------------------------ interface
class MetadataStore(abc.ABC):
    # users
    @abc.abstractmethod
    def create_user(self, user_id: UUID, username: str, auth_hash: str, kdf: KdfParams,
                    master_key: MasterKeyRecord, root_inode: UUID, root_meta: str) -> None: ...

    @abc.abstractmethod
    def get_user(self, user_id: UUID) -> UserRecord | None: ...

    @abc.abstractmethod
    def get_user_by_name(self, username: str) -> UserRecord | None: ...

    @abc.abstractmethod
    def decoy_template(self) -> KdfParams | None:
        """KDF params of the oldest account (decoys for unknown names mimic it)."""

    @abc.abstractmethod
    def master_keys(self, user_id: UUID) -> list[MasterKeyRecord]: ...

    @abc.abstractmethod
    def change_password(self, user_id: UUID, auth_hash: str, kdf: KdfParams,
                        master_keys: Sequence[MasterKeyRecord]) -> int:
        """Returns the new token version."""

    @abc.abstractmethod
    def set_kdf(self, user_id: UUID, kdf: KdfParams) -> None: ...

    @abc.abstractmethod
    def bump_token_version(self, user_id: UUID) -> int: ...

    @abc.abstractmethod
    def add_master_key(self, user_id: UUID, mk: MasterKeyRecord) -> None: ...

    @abc.abstractmethod
    def delete_master_key(self, user_id: UUID, gen: int) -> None: ...

    @abc.abstractmethod
    def delete_user(self, user_id: UUID) -> None: ...

    # login throttling
    @abc.abstractmethod
    def throttle_retry_after(self, limits: Sequence[tuple[str, int]], window: float) -> int | None: ...

    @abc.abstractmethod
    def record_login_failure(self, keys: Sequence[str], window: float) -> None: ...

    @abc.abstractmethod
    def clear_login_failures(self, key: str) -> None: ...

    # namespace reads
    @abc.abstractmethod
    def get_inode(self, user_id: UUID, inode: UUID) -> InodeRecord | None: ...

    @abc.abstractmethod
    def list_entries(self, user_id: UUID, parent: UUID) -> tuple[InodeRecord, list[EntryRecord]] | None:
        """The directory's own record and its entries, from one snapshot."""

    @abc.abstractmethod
    def list_entries_many(self, user_id: UUID, parents: Sequence[UUID],
                          max_entries: int) -> list[tuple[InodeRecord, list[EntryRecord]]]:
        """Listings (as ``list_entries``) of those ``parents`` that are the user's
        directories, in order and from one snapshot, stopping before the one that
        would take the total past ``max_entries``."""

    @abc.abstractmethod
    def lookup_entry(self, user_id: UUID, parent: UUID, name_hash: str) -> EntryRecord | None: ...

    @abc.abstractmethod
    def changes(self, user_id: UUID, since: int) -> tuple[int, list[tuple[UUID, int]]]:
        """The account's current seq and (inode, seq of its last change) after ``since``."""

    @abc.abstractmethod
    def used_bytes(self, user_id: UUID) -> int: ...

    # namespace writes
    @abc.abstractmethod
    def apply_ops(self, user_id: UUID, ops: Sequence, inline_sizes: dict[tuple[UUID, UUID], int],
                  quota: int | None, pre_commit: Callable[[], None] | None = None) -> OpsOutcome: ...

    # blobs
    @abc.abstractmethod
    def check_blob_target(self, user_id: UUID, inode: UUID, blob: UUID) -> int:
        """Validate an upload target; returns the user's current usage."""

    @abc.abstractmethod
    def add_blob(self, user_id: UUID, inode: UUID, blob: UUID, size: int, quota: int | None,
                 pre_commit: Callable[[], None] | None = None) -> None: ...

    @abc.abstractmethod
    def get_blob(self, user_id: UUID, inode: UUID, blob: UUID) -> BlobRecord | None: ...

    # keys
    @abc.abstractmethod
    def key_gen(self, user_id: UUID, inode: UUID) -> int | None:
        """Raises not_found if the inode does not exist."""

    @abc.abstractmethod
    def key_gens(self, user_id: UUID) -> list[tuple[UUID, int]]: ...

    @abc.abstractmethod
    def set_key_gens(self, user_id: UUID, updates: Sequence[tuple[UUID, int]],
                     pre_commit: Callable[[], None] | None = None) -> None: ...

    # maintenance
    @abc.abstractmethod
    def expire_staged(self, older_than: float) -> list[tuple[UUID, UUID, UUID]]: ...

    @abc.abstractmethod
    def expire_orphans(self, older_than: float) -> list[tuple[UUID, UUID]]: ...


# ------------------------------------------------------------------ sqlite
def _s(u: UUID) -> str:
    return str(u)


class SqliteMetadataStore(MetadataStore):
    def __init__(self, path: Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:    # the database holds auth hashes: keep it private
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass

    # -- connections / transactions
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA temp_store = MEMORY")
            self._local.conn = conn
        return conn

    def init_schema(self) -> None:
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        # executescript: the trigger bodies contain ';'. One transaction, idempotent.
        conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``durable=False`` skips the WAL fsync at commit:
        only for records whose loss in a power cut is harmless (a staged blob
        row: its commit would then fail cleanly and be retried)."""
        conn = self._conn()
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- users
    @staticmethod
    def _user(row) -> UserRecord | None:
        if row is None:
            return None
        return UserRecord(id=UUID(row[0]), username=row[1], auth_hash=row[2],
                          kdf=KdfParams.model_validate_json(row[3]), token_version=row[4],
                          current_gen=row[5], root_inode=UUID(row[6]), seq=row[7])

    _USER_COLS = "id, username, auth_hash, kdf_json, token_version, current_gen, root_inode, seq"

    def create_user(self, user_id, username, auth_hash, kdf, master_key, root_inode, root_meta):
        uid = _s(user_id)
        with self.write() as c:
            if c.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise E.exists("username taken")
            c.execute("INSERT INTO users(id, username, auth_hash, kdf_json, token_version, current_gen,"
                      " root_inode, seq, created_at) VALUES (?,?,?,?,1,?,?,0,?)",
                      (uid, username, auth_hash, kdf.model_dump_json(), master_key.gen,
                       _s(root_inode), time.time()))
            c.execute("INSERT INTO master_keys VALUES (?,?,?,?)",
                      (uid, master_key.gen, master_key.wrapped_master, master_key.wrapped_namespace))
            c.execute("INSERT INTO inodes(user_id, id, is_dir, version, meta, changed_seq)"
                      " VALUES (?,?,1,1,?,0)", (uid, _s(root_inode), root_meta))

    def get_user(self, user_id):
        row = self._conn().execute(f"SELECT {self._USER_COLS} FROM users WHERE id = ?",
                                   (_s(user_id),)).fetchone()
        return self._user(row)

    def get_user_by_name(self, username):
        row = self._conn().execute(f"SELECT {self._USER_COLS} FROM users WHERE username = ?",
                                   (username,)).fetchone()
        return self._user(row)

    def decoy_template(self):
        row = self._conn().execute(
            "SELECT kdf_json FROM users ORDER BY created_at, id LIMIT 1").fetchone()
        return KdfParams.model_validate_json(row[0]) if row else None

    def master_keys(self, user_id):
        rows = self._conn().execute(
            "SELECT gen, wrapped_master, wrapped_namespace FROM master_keys WHERE user_id = ?"
            " ORDER BY gen", (_s(user_id),)).fetchall()
        return [MasterKeyRecord(gen=g, wrapped_master=m, wrapped_namespace=n) for g, m, n in rows]

    def change_password(self, user_id, auth_hash, kdf, master_keys):
        uid = _s(user_id)
        with self.write() as c:
            gens = {g for (g,) in c.execute("SELECT gen FROM master_keys WHERE user_id = ?", (uid,))}
            given = [mk.gen for mk in master_keys]
            if len(set(given)) != len(given) or set(given) != gens:
                raise E.invalid("master_keys must re-wrap exactly the stored generations "
                                f"{sorted(gens)}")
            for mk in master_keys:
                c.execute("UPDATE master_keys SET wrapped_master = ?, wrapped_namespace = ?"
                          " WHERE user_id = ? AND gen = ?",
                          (mk.wrapped_master, mk.wrapped_namespace, uid, mk.gen))
            c.execute("UPDATE users SET auth_hash = ?, kdf_json = ?, token_version = token_version + 1"
                      " WHERE id = ?", (auth_hash, kdf.model_dump_json(), uid))
            return c.execute("SELECT token_version FROM users WHERE id = ?", (uid,)).fetchone()[0]

    def set_kdf(self, user_id, kdf):
        with self.write() as c:
            c.execute("UPDATE users SET kdf_json = ? WHERE id = ?", (kdf.model_dump_json(), _s(user_id)))

    def bump_token_version(self, user_id):
        with self.write() as c:
            c.execute("UPDATE users SET token_version = token_version + 1 WHERE id = ?", (_s(user_id),))
            row = c.execute("SELECT token_version FROM users WHERE id = ?", (_s(user_id),)).fetchone()
            if row is None:
                raise E.not_found("no such user")
            return row[0]

    def add_master_key(self, user_id, mk):
        uid = _s(user_id)
        with self.write() as c:
            row = c.execute("SELECT current_gen FROM users WHERE id = ?", (uid,)).fetchone()
            if row is None:
                raise E.not_found("no such user")
            if mk.gen != row[0] + 1:
                raise E.conflict(f"gen must be {row[0] + 1}")
            c.execute("INSERT INTO master_keys VALUES (?,?,?,?)",
                      (uid, mk.gen, mk.wrapped_master, mk.wrapped_namespace))
            c.execute("UPDATE users SET current_gen = ? WHERE id = ?", (mk.gen, uid))

    def delete_master_key(self, user_id, gen):
        uid = _s(user_id)
        with self.write() as c:
            if not c.execute("SELECT 1 FROM master_keys WHERE user_id = ? AND gen = ?",
                             (uid, gen)).fetchone():
                raise E.not_found("no such key generation")
            cur = c.execute("SELECT current_gen FROM users WHERE id = ?", (uid,)).fetchone()[0]
            if gen == cur:
                raise E.in_use("cannot delete the current key generation")
            if c.execute("SELECT 1 FROM inodes WHERE user_id = ? AND key_gen = ? LIMIT 1",
                         (uid, gen)).fetchone():
                raise E.in_use("file keys still use this generation")
            c.execute("DELETE FROM master_keys WHERE user_id = ? AND gen = ?", (uid, gen))

    def delete_user(self, user_id):
        uid = _s(user_id)
        with self.write() as c:
            row = c.execute("SELECT username FROM users WHERE id = ?", (uid,)).fetchone()
            for table in ("master_keys", "inodes", "dentries", "blobs", "tombstones"):
                c.execute(f"DELETE FROM {table} WHERE user_id = ?", (uid,))
            c.execute("DELETE FROM users WHERE id = ?", (uid,))
            if row:
                c.execute("DELETE FROM login_failures WHERE key = ?", ("u:" + row[0],))

    # -- throttling
    def throttle_retry_after(self, limits, window):
        now = time.time()
        conn = self._conn()
        worst = None
        for key, limit in limits:
            rows = conn.execute("SELECT at FROM login_failures WHERE key = ? AND at > ?"
                                " ORDER BY at DESC LIMIT ?", (key, now - window, limit)).fetchall()
            if len(rows) >= limit:
                # Allowed again once the limit-th most recent failure leaves the window.
                wait = int(rows[-1][0] + window - now) + 1
                worst = max(worst or 0, wait)
        return worst

    def record_login_failure(self, keys, window):
        now = time.time()
        with self.write() as c:
            c.execute("DELETE FROM login_failures WHERE at < ?", (now - window,))
            c.executemany("INSERT INTO login_failures VALUES (?, ?)", [(k, now) for k in keys])

    def clear_login_failures(self, key):
        with self.write() as c:
            c.execute("DELETE FROM login_failures WHERE key = ?", (key,))

    # -- namespace reads
    def _inode_row(self, c, uid: str, inode: str, with_manifest: bool):
        cols = "i.id, i.is_dir, i.version, " + _NLINK_SQL + ", i.meta"
        if with_manifest:
            cols += ", i.manifest"
        return c.execute(f"SELECT {cols} FROM inodes i WHERE i.user_id = ? AND i.id = ?",
                         (uid, inode)).fetchone()

    @staticmethod
    def _inode(row, with_manifest: bool) -> InodeRecord:
        return InodeRecord(id=UUID(row[0]), is_dir=bool(row[1]), version=row[2], nlink=row[3],
                           meta=row[4], manifest=row[5] if with_manifest else None)

    def get_inode(self, user_id, inode):
        with self.read() as c:
            row = self._inode_row(c, _s(user_id), _s(inode), True)
        return self._inode(row, True) if row else None

    _ENTRY_SQL = ("SELECT d.name_hash, d.name, i.id, i.is_dir, i.version, " + _NLINK_SQL +
                  ", i.meta FROM dentries d JOIN inodes i ON i.user_id = d.user_id AND i.id = d.inode"
                  " WHERE d.user_id = ? AND d.parent = ?")

    @staticmethod
    def _entry(row) -> EntryRecord:
        return EntryRecord(name_hash=row[0], name=row[1],
                           inode=InodeRecord(id=UUID(row[2]), is_dir=bool(row[3]), version=row[4],
                                             nlink=row[5], meta=row[6]))

    def _listing(self, c, uid: str, parent: str, limit: int = -1
                 ) -> tuple[InodeRecord, list[EntryRecord]] | None:
        """None when ``parent`` is not one of the user's directories; at most
        ``limit`` entries (-1: all)."""
        row = self._inode_row(c, uid, parent, False)
        if row is None or not row[1]:
            return None
        rows = c.execute(self._ENTRY_SQL + " ORDER BY d.name_hash LIMIT ?", (uid, parent, limit)).fetchall()
        return self._inode(row, False), [self._entry(r) for r in rows]

    def list_entries(self, user_id, parent):
        with self.read() as c:
            return self._listing(c, _s(user_id), _s(parent))

    def list_entries_many(self, user_id, parents, max_entries):
        uid, found, room = _s(user_id), [], max_entries
        with self.read() as c:
            for parent in dict.fromkeys(parents):
                listing = self._listing(c, uid, _s(parent), room + 1)
                if listing is None:
                    continue
                if len(listing[1]) > room:
                    break
                found.append(listing)
                room -= len(listing[1])
        return found

    def lookup_entry(self, user_id, parent, name_hash):
        with self.read() as c:
            row = c.execute(self._ENTRY_SQL + " AND d.name_hash = ?",
                            (_s(user_id), _s(parent), name_hash)).fetchone()
        return self._entry(row) if row else None

    def changes(self, user_id, since):
        uid = _s(user_id)
        with self.read() as c:
            row = c.execute("SELECT seq FROM users WHERE id = ?", (uid,)).fetchone()
            seq = row[0] if row else 0
            rows = c.execute("SELECT id, changed_seq FROM inodes WHERE user_id = ? AND changed_seq > ?"
                             " UNION ALL SELECT inode, seq FROM tombstones WHERE user_id = ? AND seq > ?",
                             (uid, since, uid, since)).fetchall()
        return seq, [(UUID(r[0]), r[1]) for r in rows]

    def used_bytes(self, user_id):
        return self._used(self._conn(), _s(user_id))

    @staticmethod
    def _used(c, uid: str) -> int:
        row = c.execute("SELECT used_bytes FROM users WHERE id = ?", (uid,)).fetchone()
        return row[0] if row else 0

    # -- namespace writes
    def apply_ops(self, user_id, ops, inline_sizes, quota, pre_commit=None):
        with self.write() as c:
            tx = _OpsTx(c, _s(user_id))
            for index, op in enumerate(ops):
                try:
                    tx.results.append(tx.apply(op, inline_sizes))
                except E.ApiError as e:
                    e.op_index = index
                    if len(ops) > 1:
                        e.detail = f"op {index} ({op.op}): {e.detail}"
                    raise
            if quota is not None and inline_sizes and self._used(c, tx.uid) > quota:
                raise E.no_space("quota exceeded")
            seq = tx.finish()
            if pre_commit is not None:
                pre_commit()
        return OpsOutcome(seq=seq, results=tx.results, drop_blobs=tx.drop_blobs,
                          drop_inodes=tx.drop_inodes)

    # -- blobs
    def check_blob_target(self, user_id, inode, blob):
        uid = _s(user_id)
        with self.read() as c:
            row = c.execute("SELECT is_dir FROM inodes WHERE user_id = ? AND id = ?",
                            (uid, _s(inode))).fetchone()
            # No row yet is fine: a new file's chunks are staged before the one
            # request that creates it and commits them (atomic appearance).
            if row is not None and row[0]:
                raise E.is_dir("directories have no blobs")
            if c.execute("SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                         (uid, _s(inode), _s(blob))).fetchone():
                raise E.exists("blob already stored")
            return self._used(c, uid)

    def add_blob(self, user_id, inode, blob, size, quota, pre_commit=None):
        uid = _s(user_id)
        with self.write(durable=False) as c:
            row = c.execute("SELECT is_dir FROM inodes WHERE user_id = ? AND id = ?",
                            (uid, _s(inode))).fetchone()
            # No row yet is fine: a new file's chunks are staged before the one
            # request that creates it and commits them (atomic appearance).
            if row is not None and row[0]:
                raise E.is_dir("directories have no blobs")
            if c.execute("SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                         (uid, _s(inode), _s(blob))).fetchone():
                raise E.exists("blob already stored")
            if quota is not None and self._used(c, uid) + size > quota:
                raise E.no_space("quota exceeded")
            c.execute("INSERT INTO blobs VALUES (?,?,?,?,0,?)",
                      (uid, _s(inode), _s(blob), size, time.time()))
            if pre_commit is not None:
                pre_commit()

    def get_blob(self, user_id, inode, blob):
        row = self._conn().execute(
            "SELECT size, committed FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
            (_s(user_id), _s(inode), _s(blob))).fetchone()
        return BlobRecord(size=row[0], committed=bool(row[1])) if row else None

    # -- keys
    def key_gen(self, user_id, inode):
        row = self._conn().execute("SELECT key_gen FROM inodes WHERE user_id = ? AND id = ?",
                                   (_s(user_id), _s(inode))).fetchone()
        if row is None:
            raise E.not_found("no such inode")
        return row[0]

    def key_gens(self, user_id):
        rows = self._conn().execute(
            "SELECT id, key_gen FROM inodes WHERE user_id = ? AND key_gen IS NOT NULL ORDER BY id",
            (_s(user_id),)).fetchall()
        return [(UUID(i), g) for i, g in rows]

    def set_key_gens(self, user_id, updates, pre_commit=None):
        uid = _s(user_id)
        with self.write() as c:
            gens = {g for (g,) in c.execute("SELECT gen FROM master_keys WHERE user_id = ?", (uid,))}
            for inode, gen in updates:
                row = c.execute("SELECT is_dir FROM inodes WHERE user_id = ? AND id = ?",
                                (uid, _s(inode))).fetchone()
                if row is None:
                    raise E.not_found(f"no such inode {inode}")
                if row[0]:
                    raise E.invalid("directories have no file key")
                if gen not in gens:
                    raise E.unknown_key_gen(gen)
                c.execute("UPDATE inodes SET key_gen = ? WHERE user_id = ? AND id = ?",
                          (gen, uid, _s(inode)))
            if pre_commit is not None:
                pre_commit()

    # -- maintenance
    def expire_staged(self, older_than):
        with self.write() as c:
            rows = c.execute("SELECT user_id, inode, blob_id FROM blobs WHERE committed = 0"
                             " AND created_at < ?", (older_than,)).fetchall()
            c.execute("DELETE FROM blobs WHERE committed = 0 AND created_at < ?", (older_than,))
        return [(UUID(u), UUID(i), UUID(b)) for u, i, b in rows]

    def expire_orphans(self, older_than):
        dropped: list[tuple[UUID, UUID]] = []
        with self.write() as c:
            rows = c.execute("SELECT user_id, id FROM inodes WHERE orphan_since IS NOT NULL"
                             " AND orphan_since < ?", (older_than,)).fetchall()
            by_user: dict[str, list[str]] = {}
            for uid, ino in rows:
                by_user.setdefault(uid, []).append(ino)
            for uid, inos in by_user.items():
                tx = _OpsTx(c, uid)
                for ino in inos:
                    if tx.links(ino) == 0 and ino != tx.root:
                        tx.drop_inode(ino)
                    else:   # pragma: no cover - orphan_since is cleared on link
                        c.execute("UPDATE inodes SET orphan_since = NULL WHERE user_id = ? AND id = ?",
                                  (uid, ino))
                tx.finish()
                dropped.extend((UUID(uid), i) for i in tx.drop_inodes)
        return dropped


class _OpsTx:
    """Applies ops inside an open write transaction for one user."""

    def __init__(self, c: sqlite3.Connection, uid: str) -> None:
        self.c, self.uid = c, uid
        row = c.execute("SELECT seq, root_inode FROM users WHERE id = ?", (uid,)).fetchone()
        if row is None:
            raise E.not_found("no such user")
        self.seq = row[0] + 1
        self.root = row[1]
        self.now = time.time()
        self.touched: set[str] = set()
        self.dropped: set[str] = set()
        self.results: list[tuple[UUID | None, int | None]] = []
        self.drop_blobs: list[tuple[UUID, UUID]] = []
        self.drop_inodes: list[UUID] = []

    # -- helpers
    def inode(self, ino: str):
        """(is_dir, version, key_gen) or None."""
        return self.c.execute("SELECT is_dir, version, key_gen FROM inodes WHERE user_id = ? AND id = ?",
                              (self.uid, ino)).fetchone()

    def require_inode(self, ino: str, what: str = "inode"):
        row = self.inode(ino)
        if row is None:
            raise E.not_found(f"no such {what}")
        return row

    def require_dir(self, ino: str):
        row = self.inode(ino)
        if row is None:
            raise E.not_found("no such directory")
        if not row[0]:
            raise E.not_dir("parent is not a directory")
        return row

    def entry(self, parent: str, name_hash: str):
        """(inode, is_dir) or None."""
        return self.c.execute("SELECT inode, is_dir FROM dentries WHERE user_id = ? AND parent = ?"
                              " AND name_hash = ?", (self.uid, parent, name_hash)).fetchone()

    def links(self, ino: str) -> int:
        return self.c.execute("SELECT count(*) FROM dentries WHERE user_id = ? AND inode = ?",
                              (self.uid, ino)).fetchone()[0]

    def dir_empty(self, ino: str) -> bool:
        return self.c.execute("SELECT 1 FROM dentries WHERE user_id = ? AND parent = ? LIMIT 1",
                              (self.uid, ino)).fetchone() is None

    def add_entry(self, parent: str, name_hash: str, ino: str, is_dir: bool, name: str) -> None:
        self.c.execute("INSERT INTO dentries VALUES (?,?,?,?,?,?)",
                       (self.uid, parent, name_hash, ino, int(is_dir), name))

    def del_entry(self, parent: str, name_hash: str) -> None:
        self.c.execute("DELETE FROM dentries WHERE user_id = ? AND parent = ? AND name_hash = ?",
                       (self.uid, parent, name_hash))

    def touch(self, *inos: str) -> None:
        self.touched.update(inos)

    def drop_inode(self, ino: str) -> None:
        c, uid = self.c, self.uid
        for (b,) in c.execute("SELECT blob_id FROM blobs WHERE user_id = ? AND inode = ?", (uid, ino)):
            self.drop_blobs.append((UUID(ino), UUID(b)))
        c.execute("DELETE FROM blobs WHERE user_id = ? AND inode = ?", (uid, ino))
        c.execute("DELETE FROM dentries WHERE user_id = ? AND parent = ?", (uid, ino))
        c.execute("DELETE FROM inodes WHERE user_id = ? AND id = ?", (uid, ino))
        c.execute("INSERT OR REPLACE INTO tombstones VALUES (?,?,?)", (uid, ino, self.seq))
        self.drop_inodes.append(UUID(ino))
        self.dropped.add(ino)

    def release(self, ino: str, is_dir: bool, keep_orphan: bool) -> None:
        """``ino`` lost a name: delete it (or keep it as an orphan) if it has none left."""
        self.touch(ino)
        if self.links(ino) > 0:
            return
        if is_dir or not keep_orphan:
            self.drop_inode(ino)
        else:
            self.c.execute("UPDATE inodes SET orphan_since = ? WHERE user_id = ? AND id = ?",
                           (self.now, self.uid, ino))

    def version(self, ino: str) -> int | None:
        row = self.inode(ino)
        return row[1] if row else None

    def finish(self) -> int:
        live = [i for i in self.touched if i not in self.dropped]
        self.c.executemany("UPDATE inodes SET changed_seq = ? WHERE user_id = ? AND id = ?",
                           [(self.seq, self.uid, i) for i in live])
        self.c.execute("UPDATE users SET seq = ? WHERE id = ?", (self.seq, self.uid))
        return self.seq

    # -- ops
    def apply(self, op, inline_sizes) -> tuple[UUID | None, int | None]:
        handler = getattr(self, "op_" + op.op)
        return handler(op, inline_sizes)

    def op_create(self, op: OpCreate, _inline):
        ino, parent = _s(op.inode), _s(op.parent)
        self.require_dir(parent)
        if self.entry(parent, op.name_hash):
            raise E.exists("name exists")
        if self.inode(ino) is not None or ino in self.dropped:
            raise E.exists("inode id already used")
        if op.is_dir and op.wrapped_key is not None:
            raise E.invalid("directories have no file key")
        self.require_key_gen(op)
        self.c.execute("INSERT INTO inodes(user_id, id, is_dir, version, meta, key_gen, changed_seq)"
                       " VALUES (?,?,?,1,?,?,?)",
                       (self.uid, ino, int(op.is_dir), op.meta, op.key_gen, self.seq))
        self.c.execute("DELETE FROM tombstones WHERE user_id = ? AND inode = ?", (self.uid, ino))
        self.add_entry(parent, op.name_hash, ino, op.is_dir, op.name)
        self.touch(ino, parent)
        return op.inode, 1

    def op_link(self, op: OpLink, _inline):
        ino, parent = _s(op.inode), _s(op.parent)
        row = self.require_inode(ino)
        if row[0]:
            raise E.is_dir("cannot hard-link a directory")
        self.require_dir(parent)
        if self.entry(parent, op.name_hash):
            raise E.exists("name exists")
        self.add_entry(parent, op.name_hash, ino, False, op.name)
        self.c.execute("UPDATE inodes SET orphan_since = NULL WHERE user_id = ? AND id = ?",
                       (self.uid, ino))
        self.touch(ino, parent)
        return op.inode, row[1]

    def _expect(self, ent, expect: UUID | None) -> None:
        """The client's directory digest counts on this entry naming ``expect``."""
        if expect is not None and ent[0] != _s(expect):
            raise E.stale("the entry no longer names the expected inode")

    def op_unlink(self, op: OpUnlink, _inline):
        parent = _s(op.parent)
        self.require_dir(parent)
        ent = self.entry(parent, op.name_hash)
        if ent is None:
            raise E.not_found("no such entry")
        self._expect(ent, op.expect_inode)
        ino, isdir = ent
        if isdir:
            raise E.is_dir("is a directory (use rmdir)")
        self.del_entry(parent, op.name_hash)
        self.touch(parent)
        self.release(ino, False, op.keep_orphan)
        return UUID(ino), self.version(ino)

    def op_rmdir(self, op: OpRmdir, _inline):
        parent = _s(op.parent)
        self.require_dir(parent)
        ent = self.entry(parent, op.name_hash)
        if ent is None:
            raise E.not_found("no such entry")
        self._expect(ent, op.expect_inode)
        ino, isdir = ent
        if not isdir:
            raise E.not_dir("not a directory")
        if not self.dir_empty(ino):
            raise E.not_empty()
        self.del_entry(parent, op.name_hash)
        self.touch(parent)
        self.release(ino, True, False)
        return UUID(ino), None

    def op_rename(self, op: OpRename, _inline):
        sp, dp = _s(op.src_parent), _s(op.dst_parent)
        self.require_dir(sp)
        src = self.entry(sp, op.src_hash)
        if src is None:
            raise E.not_found("no such source entry")
        self.require_dir(dp)
        self._expect(src, op.src_inode)
        ino, isdir = src[0], bool(src[1])
        if sp == dp and op.src_hash == op.dst_hash:
            return UUID(ino), self.version(ino)            # rename(a, a): no-op
        dst = self.entry(dp, op.dst_hash)
        if dst is None and op.dst_inode is not None:
            raise E.stale("the target no longer exists")
        if dst is not None:
            if op.noreplace:
                raise E.exists("target exists")
            self._expect(dst, op.dst_inode)
            if dst[0] == ino:
                return UUID(ino), self.version(ino)        # two names of one inode: no-op
            if isdir and not dst[1]:
                raise E.not_dir("cannot replace a non-directory with a directory")
            if not isdir and dst[1]:
                raise E.is_dir("cannot replace a directory with a non-directory")
            if dst[1] and not self.dir_empty(dst[0]):
                raise E.not_empty("target directory not empty")
        if isdir:
            self._not_under(dp, ino)
        if dst is not None:
            self.del_entry(dp, op.dst_hash)
            self.release(dst[0], bool(dst[1]), op.keep_orphan)
        self.del_entry(sp, op.src_hash)
        self.add_entry(dp, op.dst_hash, ino, isdir, op.dst_name)
        self.touch(ino, sp, dp)
        return UUID(ino), self.version(ino)

    def _not_under(self, target_parent: str, moved_dir: str) -> None:
        """A directory cannot move into itself or one of its descendants."""
        cur, seen = target_parent, set()
        while cur is not None and cur not in seen:
            if cur == moved_dir:
                raise E.invalid_move()
            seen.add(cur)
            row = self.c.execute("SELECT parent FROM dentries WHERE user_id = ? AND inode = ?"
                                 " LIMIT 1", (self.uid, cur)).fetchone()
            cur = row[0] if row else None

    def op_exchange(self, op: OpExchange, _inline):
        ap, bp = _s(op.a_parent), _s(op.b_parent)
        self.require_dir(ap)
        self.require_dir(bp)
        a, b = self.entry(ap, op.a_hash), self.entry(bp, op.b_hash)
        if a is None or b is None:
            raise E.not_found("no such entry")
        self._expect(a, op.a_inode)
        self._expect(b, op.b_inode)
        if a[0] == b[0]:
            return op.a_inode, self.version(a[0])          # one inode, two names: nothing moves
        if a[1]:
            self._not_under(bp, a[0])
        if b[1]:
            self._not_under(ap, b[0])
        self.del_entry(ap, op.a_hash)
        self.del_entry(bp, op.b_hash)
        self.add_entry(ap, op.a_hash, b[0], bool(b[1]), op.a_name)
        self.add_entry(bp, op.b_hash, a[0], bool(a[1]), op.b_name)
        self.touch(a[0], b[0], ap, bp)
        return op.a_inode, self.version(a[0])

    def op_setmeta(self, op: OpSetMeta, _inline):
        ino = _s(op.inode)
        row = self.require_inode(ino)
        if row[1] != op.base_version:
            raise E.conflict(f"version is {row[1]}, not {op.base_version}")
        self.c.execute("UPDATE inodes SET meta = ?, version = version + 1"
                       " WHERE user_id = ? AND id = ?", (op.meta, self.uid, ino))
        self.touch(ino)
        return op.inode, row[1] + 1

    def require_key_gen(self, op) -> None:
        """A new file key's fields go together and name one of the account's generations."""
        if (op.wrapped_key is None) != (op.key_gen is None):
            raise E.invalid("wrapped_key and key_gen go together")
        if op.key_gen is not None and not self.c.execute(
                "SELECT 1 FROM master_keys WHERE user_id = ? AND gen = ?", (self.uid, op.key_gen)).fetchone():
            raise E.unknown_key_gen(op.key_gen)      # retired by a rotate-key: the client re-wraps

    def op_commit(self, op: OpCommit, inline_sizes):
        c, uid, ino = self.c, self.uid, _s(op.inode)
        row = self.require_inode(ino)
        if row[0]:
            raise E.is_dir("directories have no content")
        if row[1] != op.base_version:
            raise E.conflict(f"version is {row[1]}, not {op.base_version}")
        self.require_key_gen(op)
        if op.key_gen is not None:
            c.execute("UPDATE inodes SET key_gen = ? WHERE user_id = ? AND id = ?", (op.key_gen, uid, ino))
        dropped = {(i, b) for i, b in self.drop_blobs}
        for ib in op.inline:
            if (op.inode, ib.blob_id) in dropped or c.execute("SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                         (uid, ino, _s(ib.blob_id))).fetchone():
                raise E.exists(f"blob {ib.blob_id} already stored")
            c.execute("INSERT INTO blobs VALUES (?,?,?,?,0,?)",
                      (uid, ino, _s(ib.blob_id), inline_sizes[(op.inode, ib.blob_id)], self.now))
        c.execute("CREATE TEMP TABLE IF NOT EXISTS commit_set(blob_id TEXT PRIMARY KEY)")
        c.execute("DELETE FROM temp.commit_set")
        c.executemany("INSERT OR IGNORE INTO temp.commit_set VALUES (?)", ((_s(b),) for b in op.blobs))
        missing = c.execute("SELECT s.blob_id FROM temp.commit_set s WHERE NOT EXISTS (SELECT 1 FROM blobs b"
                            " WHERE b.user_id = ? AND b.inode = ? AND b.blob_id = s.blob_id) LIMIT 1",
                            (uid, ino)).fetchone()
        if missing:
            raise E.invalid(f"blob {missing[0]} is not stored for this inode")
        c.execute("UPDATE blobs SET committed = 1 WHERE user_id = ? AND inode = ? AND committed = 0"
                  " AND blob_id IN (SELECT blob_id FROM temp.commit_set)", (uid, ino))
        stale = c.execute("SELECT blob_id FROM blobs WHERE user_id = ? AND inode = ? AND committed = 1"
                          " AND blob_id NOT IN (SELECT blob_id FROM temp.commit_set)", (uid, ino)).fetchall()
        if stale:
            c.executemany("DELETE FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                          [(uid, ino, b) for (b,) in stale])
            self.drop_blobs.extend((op.inode, UUID(b)) for (b,) in stale)
        c.execute("DELETE FROM temp.commit_set")
        c.execute("UPDATE inodes SET meta = ?, manifest = ?, version = version + 1"
                  " WHERE user_id = ? AND id = ?", (op.meta, op.manifest, uid, ino))
        self.touch(ino)
        return op.inode, row[1] + 1

    def op_delete_inode(self, op: OpDeleteInode, _inline):
        ino = _s(op.inode)
        self.require_inode(ino)
        if ino == self.root:
            raise E.in_use("the root directory cannot be deleted")
        if self.links(ino) > 0:
            raise E.in_use("inode still has names")
        self.drop_inode(ino)
        return op.inode, None
