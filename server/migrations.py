"""Versioned schema migrations, the same for sqlite and PostgreSQL.

``schema_version`` holds the version a database is at. :func:`migrate` brings it
to :data:`LATEST` in one transaction; :func:`check` refuses a schema this server
does not know (newer, or older when upgrades are not automatic). A database made
before versions existed (the sqlite of earlier releases) is version 1.
"""
from __future__ import annotations

import base64
import logging
from typing import Callable
from uuid import UUID

from .sqldb import Database, Tx

log = logging.getLogger("zkfs.server")

# Reads a legacy ``storage/<user>/<inode>/key`` object (version 1 kept wrapped keys there).
LegacyKeys = Callable[[UUID, UUID], "bytes | None"]


class SchemaError(Exception):
    """The database's schema is one this server cannot run on."""


V1 = """
CREATE TABLE IF NOT EXISTS users(
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    auth_hash TEXT NOT NULL,
    kdf_json TEXT NOT NULL,
    token_version INTEGER NOT NULL DEFAULT 1,
    current_gen INTEGER NOT NULL,
    root_inode TEXT NOT NULL,
    seq BIGINT NOT NULL DEFAULT 0,
    used_bytes BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL
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
    version BIGINT NOT NULL,
    meta TEXT NOT NULL,
    manifest TEXT,
    key_gen INTEGER,
    changed_seq BIGINT NOT NULL DEFAULT 0,
    orphan_since DOUBLE PRECISION,
    entries_mtime_ns BIGINT,
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
    size BIGINT NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY(user_id, inode, blob_id)
);
CREATE INDEX IF NOT EXISTS blobs_staged ON blobs(created_at) WHERE committed = 0;
CREATE TABLE IF NOT EXISTS tombstones(
    user_id TEXT NOT NULL,
    inode TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY(user_id, inode)
);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(user_id, seq);
CREATE TABLE IF NOT EXISTS login_failures(
    key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures(key, at);
CREATE INDEX IF NOT EXISTS login_failures_at ON login_failures(at);
"""

# Version 2 (issues 13 and 15): directories' times are the client's (sealed in their
# attributes), so the server's entries_mtime_ns goes; wrapped file keys in the database
# (the blob store keeps only chunks); usage counts metadata too and is kept by the namespace rules (the sqlite
# triggers go); per-account quotas; blobs uploaded directly to an object store are
# "unverified" until a commit checks their size; usernames unique whatever their case;
# single-use invites (``--registration invite``), kept as hashes; devices (a login's
# session: tokens name theirs, logout revokes one, ``logout --all`` every one, and a
# device's credential lets its owner log in while others guess at the account).
V2 = """
ALTER TABLE inodes DROP COLUMN entries_mtime_ns;
ALTER TABLE inodes ADD COLUMN wrapped_key TEXT;
ALTER TABLE users ADD COLUMN quota_bytes BIGINT;
ALTER TABLE blobs ADD COLUMN verified INTEGER NOT NULL DEFAULT 1;
DROP INDEX IF EXISTS blobs_staged;
CREATE INDEX IF NOT EXISTS blobs_staged ON blobs(created_at) WHERE committed <> 1;
CREATE TABLE IF NOT EXISTS invites(
    code_hash TEXT PRIMARY KEY,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS devices(
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_user ON devices(user_id);
"""


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _v2(tx: Tx, kind: str, legacy_keys: LegacyKeys | None) -> None:
    if kind == "sqlite":
        tx.run("DROP TRIGGER IF EXISTS blobs_usage_add")
        tx.run("DROP TRIGGER IF EXISTS blobs_usage_del")
    for stmt in _statements(V2):
        tx.run(stmt)
    clash = tx.one("SELECT lower(username), count(*) FROM users GROUP BY lower(username)"
                   " HAVING count(*) > 1 LIMIT 1")
    if clash:
        raise SchemaError(f"{clash[1]} accounts are named {clash[0]!r} but for case; usernames are now "
                          "case-insensitive: delete or rename all but one (python -m server users) first")
    tx.run("CREATE UNIQUE INDEX IF NOT EXISTS users_username_ci ON users(lower(username))")
    moved = 0
    for uid, ino in tx.all("SELECT user_id, id FROM inodes WHERE key_gen IS NOT NULL"):
        data = legacy_keys(UUID(uid), UUID(ino)) if legacy_keys else None
        if data is None:
            raise SchemaError(f"the file key of inode {ino} is missing from the blob store")
        tx.run("UPDATE inodes SET wrapped_key = ? WHERE user_id = ? AND id = ?",
               (base64.b64encode(data).decode(), uid, ino))
        moved += 1
    if moved:
        log.info("migration 2: %d wrapped file key(s) moved into the database", moved)
    tx.run("""UPDATE users SET used_bytes =
        (SELECT coalesce(sum(size), 0) FROM blobs b WHERE b.user_id = users.id)
      + (SELECT coalesce(sum(length(meta) + coalesce(length(manifest), 0)
                             + coalesce(length(wrapped_key), 0)), 0)
         FROM inodes i WHERE i.user_id = users.id)
      + (SELECT coalesce(sum(length(name)), 0) FROM dentries d WHERE d.user_id = users.id)""")


# Version 3 (issue 14): a batch of ops sent with a batch id is applied once; its answer
# is kept, so a client that lost the answer (a cut connection, a crash) sends it again
# and gets the same answer instead of applying it twice.
V3 = """
CREATE TABLE IF NOT EXISTS applied_batches(
    user_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    answer TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY(user_id, batch_id)
);
CREATE INDEX IF NOT EXISTS applied_batches_at ON applied_batches(at);
"""

# Version 4 (issue 16, links for anyone): a link serves one version of one file to anyone
# with its URL. The server keeps the link's sealed record, a copy of that version's
# manifest and its own copies of the chunks (objects <user>/<store_id>/<blob>, so the
# file can change or go while the link serves what it was made of), charged to the owner;
# an ended link (revoked, or expired and swept) keeps a row without them for 30 days.
V4 = """
CREATE TABLE IF NOT EXISTS links(
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    inode TEXT NOT NULL,
    version BIGINT NOT NULL,
    store_id TEXT NOT NULL,
    record TEXT,
    manifest TEXT,
    note TEXT,
    charged BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    revoked_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS links_user ON links(user_id);
CREATE INDEX IF NOT EXISTS links_expiring ON links(expires_at) WHERE record IS NOT NULL;
CREATE TABLE IF NOT EXISTS link_blobs(
    link_id TEXT NOT NULL,
    blob_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY(link_id, blob_id)
);
CREATE INDEX IF NOT EXISTS link_blobs_user ON link_blobs(user_id);
"""


# Version 5 (issue 16): shared folders. Each account's identity key pair (the public
# half published, the private half wrapped under a master key generation); shares
# (a folder of the owner's, its members, the generations of its keys and each
# generation's key wrapped for each member and the owner); every inode and tombstone
# tagged with the share it belongs to (NULL: the owner's private tree); a counter
# per account that moves whenever a share it owns or belongs to changes. A share's
# members_seal is the owner's MAC of its member list (the server cannot add one).
V5 = """
ALTER TABLE users ADD COLUMN identity_public TEXT;
ALTER TABLE users ADD COLUMN identity_private TEXT;
ALTER TABLE users ADD COLUMN identity_gen INTEGER;
ALTER TABLE users ADD COLUMN shares_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE inodes ADD COLUMN share_id TEXT;
ALTER TABLE tombstones ADD COLUMN share_id TEXT;
CREATE INDEX IF NOT EXISTS inodes_share ON inodes(share_id, changed_seq) WHERE share_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS shares(
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    root_inode TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    current_gen INTEGER NOT NULL,
    members_seal TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS shares_root ON shares(owner_id, root_inode);
CREATE TABLE IF NOT EXISTS share_members(
    share_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    PRIMARY KEY(share_id, user_id)
);
CREATE INDEX IF NOT EXISTS share_members_user ON share_members(user_id);
CREATE TABLE IF NOT EXISTS share_grants(
    share_id TEXT NOT NULL,
    gen INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    wrapped TEXT NOT NULL,
    PRIMARY KEY(share_id, gen, user_id)
);
"""


MIGRATIONS: list[Callable[[Tx, str, LegacyKeys | None], None]] = [
    lambda tx, kind, _keys: [tx.run(s) for s in _statements(V1)],
    _v2,
    lambda tx, kind, _keys: [tx.run(s) for s in _statements(V3)],
    lambda tx, kind, _keys: [tx.run(s) for s in _statements(V4)],
    lambda tx, kind, _keys: [tx.run(s) for s in _statements(V5)],
]
LATEST = len(MIGRATIONS)


def _has_table(tx: Tx, kind: str, name: str) -> bool:
    if kind == "sqlite":
        return tx.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None
    return tx.one("SELECT to_regclass(?)", (name,))[0] is not None


def _version(tx: Tx, kind: str) -> int:
    if _has_table(tx, kind, "schema_version"):
        row = tx.one("SELECT version FROM schema_version")
        return row[0] if row else 0
    return 1 if _has_table(tx, kind, "users") else 0


def version(db: Database) -> int:
    return db.transaction(lambda tx: _version(tx, db.kind), write=False)


def migrate(db: Database, legacy_keys: LegacyKeys | None = None) -> tuple[int, int]:
    """Bring the schema to LATEST (one transaction; safe to run from several
    processes at once). Returns (from, to)."""
    def run(tx: Tx) -> tuple[int, int]:
        tx.lock_key("zkfs-schema-migration")
        start = _version(tx, db.kind)
        if start > LATEST:
            raise SchemaError(f"the database schema is version {start}, newer than this server "
                              f"knows ({LATEST}): upgrade the server")
        for v in range(start, LATEST):
            MIGRATIONS[v](tx, db.kind, legacy_keys)
        if start < LATEST:
            tx.run("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
            tx.run("DELETE FROM schema_version")
            tx.run("INSERT INTO schema_version(version) VALUES (?)", (LATEST,))
        return start, LATEST
    return db.transaction(run)


def check(db: Database, *, upgrade: bool, legacy_keys: LegacyKeys | None = None) -> None:
    """Refuse a schema this server does not know. An empty database is created; an
    older schema is upgraded when ``upgrade`` (the embedded sqlite), else refused."""
    current = version(db)
    if current == LATEST:
        return
    if current > LATEST:
        raise SchemaError(f"the database schema is version {current}, newer than this server "
                          f"knows ({LATEST}): upgrade the server")
    if current and not upgrade:
        raise SchemaError(f"the database schema is version {current}, this server needs {LATEST}: "
                          "run `python -m server migrate` first")
    start, end = migrate(db, legacy_keys)
    if start != end:
        log.info("database schema: version %d -> %d", start, end)
