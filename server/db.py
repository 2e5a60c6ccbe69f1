"""Metadata store: users, master keys, inodes (with their wrapped file keys),
directory entries, blob records, login throttling.

:class:`MetadataStore` is what the routers use. It is written once, in the SQL
that sqlite and PostgreSQL both speak, over a :class:`~server.sqldb.Database`;
the namespace rules themselves are :mod:`server.namespace`.

Every query is scoped by ``user_id``: another user's ids simply do not exist.
A member of a share reaches the owner's rows through ``share=`` (the owner's id
as ``user_id``): then only the inodes tagged with that share exist.
Every mutating namespace transaction bumps ``users.seq`` and stamps
``changed_seq`` on each inode it changed (including directories whose entries
changed); deleted inodes leave a tombstone so ``GET /fs/changes`` reports them.

Stored values are opaque base64 text (meta, names, manifests, wrapped keys):
nothing here decodes them.
"""
from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence
from uuid import UUID, uuid4

from . import errors as E
from .models import (Grant, IdentityRecord, KdfParams, MasterKeyRecord, NewGenerationRequest, NewMemberRequest,
                     ShareMemberOut, ShareOut)
from .namespace import (INODE_BYTES_SQL, NamespaceTx, OpsOutcome, Scope, bump_shares_seq, check_quota,
                        require_member, share_key_gens)
from .sqldb import Database, Tx, UniqueViolation

__all__ = ["MetadataStore", "UserRecord", "InodeRecord", "EntryRecord", "BlobRecord", "OpsOutcome"]

_NLINK_SQL = """
CASE WHEN i.is_dir <> 0 THEN 2 + (SELECT count(*) FROM dentries c
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
    quota_bytes: int | None = None     # this account's own quota (None: the server's)


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


def _s(u: UUID) -> str:
    return str(u)


def _only(share: UUID | None, alias: str = "") -> tuple[str, tuple]:
    """SQL narrowing a query on ``inodes`` to one share's (nothing if None)."""
    return Scope("", _s(share) if share else None).only(alias)


class MetadataStore:
    def __init__(self, db: Database, default_quota: int | None = None) -> None:
        self.db = db
        self.default_quota = default_quota

    @property
    def kind(self) -> str:
        return self.db.kind

    def close(self) -> None:
        self.db.close()

    def _write(self, fn: Callable[[Tx], object], durable: bool = True):
        return self.db.transaction(fn, durable=durable)

    def _read(self, fn: Callable[[Tx], object]):
        return self.db.transaction(fn, write=False)

    def quota_of(self, user: UserRecord) -> int | None:
        return user.quota_bytes if user.quota_bytes is not None else self.default_quota

    # -- users
    _USER_COLS = "id, username, auth_hash, kdf_json, token_version, current_gen, root_inode, seq, quota_bytes"

    @staticmethod
    def _user(row) -> UserRecord | None:
        if row is None:
            return None
        return UserRecord(id=UUID(row[0]), username=row[1], auth_hash=row[2],
                          kdf=KdfParams.model_validate_json(row[3]), token_version=row[4],
                          current_gen=row[5], root_inode=UUID(row[6]), seq=row[7], quota_bytes=row[8])

    def create_user(self, user_id: UUID, username: str, auth_hash: str, kdf: KdfParams,
                    master_key: MasterKeyRecord, root_inode: UUID, root_meta: str,
                    invite_hash: str | None = None) -> None:
        """``invite_hash``: the single-use invite this registration spends (in the
        same transaction: a failed registration keeps it)."""
        uid = _s(user_id)

        def run(c: Tx) -> None:
            if invite_hash is not None and c.run("DELETE FROM invites WHERE code_hash = ?", (invite_hash,)) != 1:
                raise E.forbidden("this invite is not valid (unknown or already used)")
            if c.one("SELECT 1 FROM users WHERE lower(username) = lower(?)", (username,)):
                raise E.exists("username taken")
            c.run("INSERT INTO users(id, username, auth_hash, kdf_json, token_version, current_gen,"
                  " root_inode, seq, used_bytes, created_at) VALUES (?,?,?,?,1,?,?,0,?,?)",
                  (uid, username, auth_hash, kdf.model_dump_json(), master_key.gen,
                   _s(root_inode), len(root_meta), time.time()))
            c.run("INSERT INTO master_keys(user_id, gen, wrapped_master, wrapped_namespace) VALUES (?,?,?,?)",
                  (uid, master_key.gen, master_key.wrapped_master, master_key.wrapped_namespace))
            c.run("INSERT INTO inodes(user_id, id, is_dir, version, meta, changed_seq)"
                  " VALUES (?,?,1,1,?,0)", (uid, _s(root_inode), root_meta))
        try:
            self._write(run)
        except UniqueViolation:     # the same name registered concurrently elsewhere
            raise E.exists("username taken") from None

    def get_user(self, user_id: UUID) -> UserRecord | None:
        return self._user(self.db.one(f"SELECT {self._USER_COLS} FROM users WHERE id = ?", (_s(user_id),)))

    def get_user_by_name(self, username: str) -> UserRecord | None:
        """Usernames are case-insensitive (unique whatever their case)."""
        return self._user(self.db.one(f"SELECT {self._USER_COLS} FROM users WHERE lower(username) = lower(?)",
                                      (username,)))

    def list_users(self) -> list[tuple[UserRecord, int, float]]:
        """Every account with its usage and creation time, oldest first."""
        rows = self.db.all(f"SELECT {self._USER_COLS}, used_bytes, created_at FROM users ORDER BY created_at, id")
        return [(self._user(r[:9]), r[9], r[10]) for r in rows]

    def set_quota(self, user_id: UUID, quota: int | None) -> None:
        if self._write(lambda c: c.run("UPDATE users SET quota_bytes = ? WHERE id = ?",
                                       (quota, _s(user_id)))) != 1:
            raise E.not_found("no such user")

    def add_invite(self, code_hash: str) -> None:
        self._write(lambda c: c.run("INSERT INTO invites(code_hash, created_at) VALUES (?, ?)",
                                    (code_hash, time.time())))

    def decoy_template(self) -> KdfParams | None:
        """KDF params of the oldest account (decoys for unknown names mimic it)."""
        row = self.db.one("SELECT kdf_json FROM users ORDER BY created_at, id LIMIT 1")
        return KdfParams.model_validate_json(row[0]) if row else None

    def master_keys(self, user_id: UUID) -> list[MasterKeyRecord]:
        rows = self.db.all("SELECT gen, wrapped_master, wrapped_namespace FROM master_keys WHERE user_id = ?"
                           " ORDER BY gen", (_s(user_id),))
        return [MasterKeyRecord(gen=g, wrapped_master=m, wrapped_namespace=n) for g, m, n in rows]

    def change_password(self, user_id: UUID, auth_hash: str, kdf: KdfParams,
                        master_keys: Sequence[MasterKeyRecord]) -> int:
        """Returns the new token version."""
        uid = _s(user_id)

        def run(c: Tx) -> int:
            c.lock_row("SELECT id FROM users WHERE id = ?", (uid,))
            gens = {g for (g,) in c.all("SELECT gen FROM master_keys WHERE user_id = ?", (uid,))}
            given = [mk.gen for mk in master_keys]
            if len(set(given)) != len(given) or set(given) != gens:
                raise E.invalid("master_keys must re-wrap exactly the stored generations "
                                f"{sorted(gens)}")
            for mk in master_keys:
                c.run("UPDATE master_keys SET wrapped_master = ?, wrapped_namespace = ?"
                      " WHERE user_id = ? AND gen = ?", (mk.wrapped_master, mk.wrapped_namespace, uid, mk.gen))
            c.run("UPDATE users SET auth_hash = ?, kdf_json = ?, token_version = token_version + 1"
                  " WHERE id = ?", (auth_hash, kdf.model_dump_json(), uid))
            return c.one("SELECT token_version FROM users WHERE id = ?", (uid,))[0]
        return self._write(run)

    def set_kdf(self, user_id: UUID, kdf: KdfParams) -> None:
        """Store an account's KDF parameters with their check (accounts from before checks)."""
        self._write(lambda c: c.run("UPDATE users SET kdf_json = ? WHERE id = ?", (kdf.model_dump_json(), _s(user_id))))

    def add_master_key(self, user_id: UUID, mk: MasterKeyRecord) -> None:
        uid = _s(user_id)

        def run(c: Tx) -> None:
            row = c.lock_row("SELECT current_gen FROM users WHERE id = ?", (uid,))
            if row is None:
                raise E.not_found("no such user")
            if mk.gen != row[0] + 1:
                raise E.conflict(f"gen must be {row[0] + 1}")
            c.run("INSERT INTO master_keys(user_id, gen, wrapped_master, wrapped_namespace) VALUES (?,?,?,?)",
                  (uid, mk.gen, mk.wrapped_master, mk.wrapped_namespace))
            c.run("UPDATE users SET current_gen = ? WHERE id = ?", (mk.gen, uid))
        self._write(run)

    def delete_master_key(self, user_id: UUID, gen: int) -> None:
        uid = _s(user_id)

        def run(c: Tx) -> None:
            cur = c.lock_row("SELECT current_gen FROM users WHERE id = ?", (uid,))
            if cur is None or not c.one("SELECT 1 FROM master_keys WHERE user_id = ? AND gen = ?", (uid, gen)):
                raise E.not_found("no such key generation")
            if gen == cur[0]:
                raise E.in_use("cannot delete the current key generation")
            # A shared folder's keys are under its own generations, except while the
            # share is being made (its files' keys move from the account's to it).
            if c.one("SELECT 1 FROM inodes WHERE user_id = ? AND key_gen = ? AND (share_id IS NULL OR share_id IN"
                     " (SELECT id FROM shares WHERE state = 'converting')) LIMIT 1", (uid, gen)):
                raise E.in_use("file keys still use this generation")
            if c.one("SELECT 1 FROM users WHERE id = ? AND identity_gen = ?", (uid, gen)):
                raise E.in_use("the identity key is wrapped under this generation")
            c.run("DELETE FROM master_keys WHERE user_id = ? AND gen = ?", (uid, gen))
        self._write(run)

    def delete_user(self, user_id: UUID) -> None:
        uid = _s(user_id)

        def run(c: Tx) -> None:
            c.lock_row("SELECT username FROM users WHERE id = ?", (uid,))
            for (share,) in c.all("SELECT share_id FROM share_members WHERE user_id = ?", (uid,)):
                bump_shares_seq(c, share)
            c.run("DELETE FROM share_members WHERE user_id = ?", (uid,))
            c.run("DELETE FROM share_grants WHERE user_id = ?", (uid,))
            for (share,) in c.all("SELECT id FROM shares WHERE owner_id = ?", (uid,)):
                bump_shares_seq(c, share)
                c.run("DELETE FROM share_members WHERE share_id = ?", (share,))
                c.run("DELETE FROM share_grants WHERE share_id = ?", (share,))
            c.run("DELETE FROM shares WHERE owner_id = ?", (uid,))
            for table in ("master_keys", "inodes", "dentries", "blobs", "tombstones", "devices",
                          "applied_batches", "links", "link_blobs"):
                c.run(f"DELETE FROM {table} WHERE user_id = ?", (uid,))
            c.run("DELETE FROM users WHERE id = ?", (uid,))
        self._write(run)

    # -- devices (sessions)
    def add_device(self, user_id: UUID, secret_hash: str) -> UUID:
        device = uuid4()
        self._write(lambda c: c.run("INSERT INTO devices(id, user_id, secret_hash, created_at) VALUES (?,?,?,?)",
                                    (_s(device), _s(user_id), secret_hash, time.time())))
        return device

    def device_of(self, user_id: UUID, device: UUID, secret_hash: str) -> bool:
        """Whether ``device`` is one of the user's, with that credential."""
        row = self.db.one("SELECT secret_hash FROM devices WHERE id = ? AND user_id = ?", (_s(device), _s(user_id)))
        return row is not None and hmac.compare_digest(row[0], secret_hash)

    def get_session_user(self, user_id: UUID, device: UUID) -> UserRecord | None:
        """The user, if ``device`` is still one of its sessions (one query per request)."""
        cols = ", ".join("u." + c.strip() for c in self._USER_COLS.split(","))
        return self._user(self.db.one(f"SELECT {cols} FROM users u JOIN devices d ON d.user_id = u.id"
                                      " WHERE u.id = ? AND d.id = ?", (_s(user_id), _s(device))))

    def revoke_device(self, user_id: UUID, device: UUID) -> None:
        self._write(lambda c: c.run("DELETE FROM devices WHERE id = ? AND user_id = ?", (_s(device), _s(user_id))))

    def revoke_all_devices(self, user_id: UUID) -> None:
        """Every session of the account ends (tokens and device credentials)."""
        def run(c: Tx) -> None:
            c.run("DELETE FROM devices WHERE user_id = ?", (_s(user_id),))
            c.run("UPDATE users SET token_version = token_version + 1 WHERE id = ?", (_s(user_id),))
        self._write(run)

    # -- throttling (in the database: atomic, and shared by every node)
    def reserve_attempt(self, limits: Sequence[tuple[str, int]], window: float) -> tuple[float, int | None]:
        """Count one attempt against each (key, limit) *before* it is checked, so
        concurrent guesses cannot all be evaluated; unless a limit is already
        reached: then nothing is counted and the wait in seconds is returned.
        Returns (the attempt's timestamp, wait or None)."""
        now = time.time()

        def run(c: Tx) -> int | None:
            for key, _limit in sorted(limits):
                c.lock_key("throttle:" + key)
            worst = None
            for key, limit in limits:
                c.run("DELETE FROM login_failures WHERE key = ? AND at <= ?", (key, now - window))
                rows = c.all("SELECT at FROM login_failures WHERE key = ? ORDER BY at DESC LIMIT ?", (key, limit))
                if len(rows) >= limit:
                    # Allowed again once the limit-th most recent attempt leaves the window.
                    worst = max(worst or 0, int(rows[-1][0] + window - now) + 1)
            if worst is None:
                c.many("INSERT INTO login_failures(key, at) VALUES (?, ?)", [(k, now) for k, _ in limits])
            return worst
        return now, self._write(run)

    def release_attempt(self, keys: Sequence[str], at: float, clear: Sequence[str] = ()) -> None:
        """An attempt reserved at ``at`` succeeded: it no longer counts, and neither
        does anything counted under ``clear``."""
        def run(c: Tx) -> None:
            c.many("DELETE FROM login_failures WHERE key = ? AND at = ?", [(k, at) for k in keys])
            c.many("DELETE FROM login_failures WHERE key = ?", [(k,) for k in clear])
        self._write(run)

    # -- namespace reads
    _INODE_COLS = "i.id, i.is_dir, i.version, " + _NLINK_SQL + ", i.meta"

    @staticmethod
    def _inode(row, with_manifest: bool) -> InodeRecord:
        return InodeRecord(id=UUID(row[0]), is_dir=bool(row[1]), version=row[2], nlink=row[3],
                           meta=row[4], manifest=row[5] if with_manifest else None)

    def get_inode(self, user_id: UUID, inode: UUID, share: UUID | None = None) -> InodeRecord | None:
        only, args = _only(share, "i.")
        row = self.db.one(f"SELECT {self._INODE_COLS}, i.manifest FROM inodes i WHERE i.user_id = ? AND i.id = ?"
                          f"{only}", (_s(user_id), _s(inode), *args))
        return self._inode(row, True) if row else None

    _ENTRY_SQL = ("SELECT d.name_hash, d.name, " + _INODE_COLS +
                  " FROM dentries d JOIN inodes i ON i.user_id = d.user_id AND i.id = d.inode"
                  " WHERE d.user_id = ? AND d.parent = ?")

    @classmethod
    def _entry(cls, row) -> EntryRecord:
        return EntryRecord(name_hash=row[0], name=row[1], inode=cls._inode(row[2:], False))

    def _listing(self, c: Tx, uid: str, parent: str, limit: int | None = None, share: UUID | None = None
                 ) -> tuple[InodeRecord, list[EntryRecord]] | None:
        """The directory's own record and its entries (at most ``limit``); None when
        ``parent`` is not one of the user's directories (in ``share``, if given)."""
        only, only_args = _only(share, "i.")
        row = c.one(f"SELECT {self._INODE_COLS} FROM inodes i WHERE i.user_id = ? AND i.id = ?{only}",
                    (uid, parent, *only_args))
        if row is None or not row[1]:
            return None
        sql = self._ENTRY_SQL + only + " ORDER BY d.name_hash"
        args: tuple = (uid, parent, *only_args)
        if limit is not None:
            sql, args = sql + " LIMIT ?", args + (limit,)
        return self._inode(row, False), [self._entry(r) for r in c.all(sql, args)]

    def list_entries(self, user_id: UUID, parent: UUID, share: UUID | None = None
                     ) -> tuple[InodeRecord, list[EntryRecord]] | None:
        """The directory's own record and its entries, from one snapshot."""
        return self._read(lambda c: self._listing(c, _s(user_id), _s(parent), share=share))

    def list_entries_many(self, user_id: UUID, parents: Sequence[UUID], max_entries: int,
                          share: UUID | None = None) -> list[tuple[InodeRecord, list[EntryRecord]]]:
        """Listings (as ``list_entries``) of those ``parents`` that are the user's
        directories, in order and from one snapshot, stopping before the one that
        would take the total past ``max_entries``."""
        uid = _s(user_id)

        def run(c: Tx):
            found, room = [], max_entries
            for parent in dict.fromkeys(parents):
                listing = self._listing(c, uid, _s(parent), room + 1, share)
                if listing is None:
                    continue
                if len(listing[1]) > room:
                    break
                found.append(listing)
                room -= len(listing[1])
            return found
        return self._read(run)

    def lookup_entry(self, user_id: UUID, parent: UUID, name_hash: str, share: UUID | None = None
                     ) -> EntryRecord | None:
        only, args = _only(share, "i.")
        row = self.db.one(self._ENTRY_SQL + " AND d.name_hash = ?" + only, (_s(user_id), _s(parent), name_hash, *args))
        return self._entry(row) if row else None

    def changes(self, user_id: UUID, since: int, share: UUID | None = None
                ) -> tuple[int, list[tuple[UUID, int]], int]:
        """The account's current seq, (inode, seq of its last change) after ``since``
        (of one share's inodes, if given) and the account's shares counter."""
        uid = _s(user_id)
        only, args = _only(share)

        def run(c: Tx):
            row = c.one("SELECT seq, shares_seq FROM users WHERE id = ?", (uid,))
            rows = c.all(f"SELECT id, changed_seq FROM inodes WHERE user_id = ? AND changed_seq > ?{only}"
                         f" UNION ALL SELECT inode, seq FROM tombstones WHERE user_id = ? AND seq > ?{only}",
                         (uid, since, *args, uid, since, *args))
            seq, shares_seq = row if row else (0, 0)
            return seq, [(UUID(r[0]), r[1]) for r in rows], shares_seq
        return self._read(run)

    def used_bytes(self, user_id: UUID) -> int:
        """Everything the account makes the server keep: blobs and metadata."""
        row = self.db.one("SELECT used_bytes FROM users WHERE id = ?", (_s(user_id),))
        return row[0] if row else 0

    # -- namespace writes
    def batch_answer(self, user_id: UUID, batch_id: UUID) -> dict | None:
        """The answer a batch sent before got (POST /fs/ops with a batch_id), if applied."""
        row = self.db.one("SELECT answer FROM applied_batches WHERE user_id = ? AND batch_id = ?",
                          (_s(user_id), _s(batch_id)))
        return json.loads(row[0]) if row else None

    def apply_ops(self, user_id: UUID, ops: Sequence, inline_sizes: dict[tuple[UUID, UUID], int],
                  pre_commit: Callable[[], None] | None = None, batch_id: UUID | None = None,
                  scope: Scope | None = None) -> OpsOutcome:
        """All ops in one transaction. ``batch_id``: its answer is kept with it, and a
        second batch with that id fails (UniqueViolation) instead of applying twice.
        ``scope``: a member's request into one share of ``user_id``'s (else the
        account's own)."""
        def run(c: Tx) -> OpsOutcome:
            tx = NamespaceTx(c, _s(user_id), self.default_quota, scope)
            for index, op in enumerate(ops):
                try:
                    tx.results.append(tx.apply(op, inline_sizes))
                except E.ApiError as e:
                    e.op_index = index
                    if len(ops) > 1:
                        e.detail = f"op {index} ({op.op}): {e.detail}"
                    raise
            seq = tx.finish()
            if batch_id is not None:
                answer = {"seq": seq, "results": [{"inode": None if i is None else str(i), "version": v}
                                                  for i, v in tx.results]}
                c.run("INSERT INTO applied_batches(user_id, batch_id, answer, at) VALUES (?,?,?,?)",
                      (_s(user_id), _s(batch_id), json.dumps(answer), time.time()))
            if pre_commit is not None:
                pre_commit()
            return OpsOutcome(seq=seq, results=tx.results, drop_blobs=tx.drop_blobs,
                              drop_inodes=tx.drop_inodes)
        return self._write(run)

    def forget_batches(self, older_than: float) -> int:
        """Forget the answers of batches applied before ``older_than``."""
        return self._write(lambda c: c.run("DELETE FROM applied_batches WHERE at < ?", (older_than,)))

    # -- blobs
    def _blob_target(self, c: Tx, uid: str, inode: str, blob: str, share: UUID | None = None) -> None:
        row = c.one("SELECT is_dir, share_id FROM inodes WHERE user_id = ? AND id = ?", (uid, inode))
        # No row yet is fine: a new file's chunks are staged before the one
        # request that creates it and commits them (atomic appearance).
        if row is not None and share is not None and row[1] != _s(share):
            raise E.not_found("no such inode")
        if row is not None and row[0]:
            raise E.is_dir("directories have no blobs")
        if c.one("SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?", (uid, inode, blob)):
            raise E.exists("blob already stored")

    def check_blob_target(self, user: UserRecord, inode: UUID, blob: UUID, share: UUID | None = None) -> int:
        """Validate an upload target; returns the account's current usage."""
        uid = _s(user.id)

        def run(c: Tx) -> int:
            self._blob_target(c, uid, _s(inode), _s(blob), share)
            return c.one("SELECT used_bytes FROM users WHERE id = ?", (uid,))[0]
        return self._read(run)

    def add_blob(self, user: UserRecord, inode: UUID, blob: UUID, size: int,
                 pre_commit: Callable[[], None] | None = None, scope: Scope | None = None) -> None:
        """Record a staged blob of ``size`` bytes that went through this node
        (charged to the account now)."""
        self.stage_blobs(user, [(inode, blob, size)], verified=True, pre_commit=pre_commit, scope=scope)

    def stage_blobs(self, user: UserRecord, blobs: Sequence[tuple[UUID, UUID, int]], *, verified: bool,
                    pre_commit: Callable[[], None] | None = None, scope: Scope | None = None) -> None:
        """Record staged blobs (inode, blob, size), all or none, charged to the account
        now. ``verified=False``: about to be uploaded straight to the object store,
        so a commit checks first that each arrived with its size; asking again for
        such a blob with the same size is a retry, not a conflict."""
        uid = _s(user.id)

        def run(c: Tx) -> None:
            used = c.lock_row("SELECT used_bytes FROM users WHERE id = ?", (uid,))[0]
            if scope is not None:
                require_member(c, scope)
            share = scope.share if scope is not None else None
            new = []
            for inode, blob, size in blobs:
                ino, b = _s(inode), _s(blob)
                if not verified and c.one("SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?"
                                          " AND size = ? AND committed = 0 AND verified = 0", (uid, ino, b, size)):
                    continue
                self._blob_target(c, uid, ino, b, share)
                new.append((uid, ino, b, size, int(verified), time.time()))
            growth = sum(row[3] for row in new)
            check_quota(used, growth, self.quota_of(user))
            c.many("INSERT INTO blobs(user_id, inode, blob_id, size, committed, verified, created_at)"
                   " VALUES (?,?,?,?,0,?,?)", new)
            c.run("UPDATE users SET used_bytes = used_bytes + ? WHERE id = ?", (growth, uid))
            if pre_commit is not None:
                pre_commit()
        # Not durable: a staged row lost in a power cut only makes its commit fail cleanly.
        self._write(run, durable=False)

    def get_blob(self, user_id: UUID, inode: UUID, blob: UUID, share: UUID | None = None) -> BlobRecord | None:
        """A blob of the user's; of an inode of ``share``, if given (a blob staged for a
        new file of a share has no inode yet: only a commit in the share reads it)."""
        if share is not None and not self._in_share(_s(user_id), inode, share):
            return None
        row = self.db.one("SELECT size, committed FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?"
                          " AND committed >= 0", (_s(user_id), _s(inode), _s(blob)))
        return BlobRecord(size=row[0], committed=row[1] == 1) if row else None

    def _in_share(self, uid: str, inode: UUID, share: UUID, c: Tx | None = None) -> bool:
        return (c or self.db).one("SELECT 1 FROM inodes WHERE user_id = ? AND id = ? AND share_id = ?",
                                  (uid, _s(inode), _s(share))) is not None

    def existing_blobs(self, user_id: UUID, wanted: Sequence[tuple[UUID, UUID]],
                       share: UUID | None = None) -> list[tuple[UUID, UUID]]:
        """Those of ``wanted`` (inode, blob) that the user has (staged or committed), in order."""
        uid = _s(user_id)
        inodes = list(dict.fromkeys(i for i, _ in wanted))

        def run(c: Tx) -> set[tuple[UUID, UUID]]:
            have = set()
            for ino in inodes:
                if share is not None and not self._in_share(uid, ino, share, c):
                    continue
                have.update((ino, UUID(b)) for (b,) in c.all(
                    "SELECT blob_id FROM blobs WHERE user_id = ? AND inode = ? AND committed >= 0", (uid, _s(ino))))
            return have
        have = self._read(run)
        return [w for w in dict.fromkeys(wanted) if w in have]

    def unverified_blobs(self, user_id: UUID, wanted: Sequence[tuple[UUID, UUID]]) -> list[tuple[UUID, UUID, int]]:
        """Those of ``wanted`` (inode, blob) uploaded directly and not yet checked, with
        their declared size."""
        uid = _s(user_id)
        by_inode: dict[UUID, set[str]] = {}
        for ino, blob in wanted:
            by_inode.setdefault(ino, set()).add(_s(blob))

        def run(c: Tx):
            out = []
            for ino, blobs in by_inode.items():
                for b, size in c.all("SELECT blob_id, size FROM blobs WHERE user_id = ? AND inode = ?"
                                     " AND verified = 0 AND committed = 0", (uid, _s(ino))):
                    if b in blobs:
                        out.append((ino, UUID(b), size))
            return out
        return self._read(run)

    def mark_verified(self, user_id: UUID, blobs: Sequence[tuple[UUID, UUID]]) -> None:
        uid = _s(user_id)
        self._write(lambda c: c.many("UPDATE blobs SET verified = 1 WHERE user_id = ? AND inode = ?"
                                     " AND blob_id = ? AND committed = 0",
                                     [(uid, _s(i), _s(b)) for i, b in blobs]), durable=False)

    # -- file keys (wrapped by the client; opaque here)
    def get_key(self, user_id: UUID, inode: UUID, share: UUID | None = None
                ) -> tuple[int, str, UUID | None] | None:
        """(gen, wrapped key, the share whose generation wrapped it) of a file; None if
        it has none; not_found if no inode (in ``share``, if given)."""
        only, args = _only(share)
        row = self.db.one(f"SELECT key_gen, wrapped_key, share_id FROM inodes WHERE user_id = ? AND id = ?{only}",
                          (_s(user_id), _s(inode), *args))
        if row is None:
            raise E.not_found("no such inode")
        if row[0] is None or row[1] is None:
            return None
        return row[0], row[1], UUID(row[2]) if row[2] else None

    def list_keys(self, user_id: UUID) -> list[tuple[UUID, int, str, UUID | None]]:
        rows = self.db.all("SELECT id, key_gen, wrapped_key, share_id FROM inodes WHERE user_id = ?"
                           " AND key_gen IS NOT NULL AND wrapped_key IS NOT NULL ORDER BY id", (_s(user_id),))
        return [(UUID(i), g, k, UUID(sh) if sh else None) for i, g, k, sh in rows]

    def set_keys(self, user: UserRecord, updates: Sequence[tuple[UUID, int, str]]) -> None:
        """Replace wrapped file keys (rotate-key), all or none."""
        uid = _s(user.id)

        def run(c: Tx) -> None:
            used = c.lock_row("SELECT used_bytes FROM users WHERE id = ?", (uid,))[0]
            gens = {g for (g,) in c.all("SELECT gen FROM master_keys WHERE user_id = ?", (uid,))}
            share_gens: dict[str, set[int]] = {}
            growth = 0
            for inode, gen, wrapped in updates:
                row = c.one(f"SELECT is_dir, {INODE_BYTES_SQL}, share_id FROM inodes WHERE user_id = ? AND id = ?",
                            (uid, _s(inode)))
                if row is None:
                    raise E.not_found(f"no such inode {inode}")
                if row[0]:
                    raise E.invalid("directories have no file key")
                if row[2] is not None and row[2] not in share_gens:
                    share_gens[row[2]] = share_key_gens(c, row[2])[1]
                if gen not in (gens if row[2] is None else share_gens[row[2]]):
                    raise E.unknown_key_gen(gen)
                c.run("UPDATE inodes SET key_gen = ?, wrapped_key = ? WHERE user_id = ? AND id = ?",
                      (gen, wrapped, uid, _s(inode)))
                growth += c.one(f"SELECT {INODE_BYTES_SQL} FROM inodes WHERE user_id = ? AND id = ?",
                                (uid, _s(inode)))[0] - row[1]
            check_quota(used, growth, self.quota_of(user))
            c.run("UPDATE users SET used_bytes = used_bytes + ? WHERE id = ?", (growth, uid))
        self._write(run)

    # -- identity keys and shares (docs/API.md "Shares")
    def identity(self, user_id: UUID) -> IdentityRecord | None:
        row = self.db.one("SELECT identity_public, identity_private, identity_gen FROM users WHERE id = ?",
                          (_s(user_id),))
        if row is None or row[0] is None:
            return None
        return IdentityRecord(public_key=row[0], wrapped_private=row[1], gen=row[2])

    def set_identity(self, user_id: UUID, rec: IdentityRecord) -> None:
        """Stores the account's identity key, or re-wraps it (a rotate-key): the public
        key, once published, never changes (others have pinned it)."""
        uid = _s(user_id)

        def run(c: Tx) -> None:
            row = c.lock_row("SELECT identity_public FROM users WHERE id = ?", (uid,))
            if row is None:
                raise E.not_found("no such user")
            if row[0] is not None and row[0] != rec.public_key:
                raise E.conflict("the account's identity key never changes (only its wrapping)")
            if not c.one("SELECT 1 FROM master_keys WHERE user_id = ? AND gen = ?", (uid, rec.gen)):
                raise E.unknown_key_gen(rec.gen)
            c.run("UPDATE users SET identity_public = ?, identity_private = ?, identity_gen = ? WHERE id = ?",
                  (rec.public_key, rec.wrapped_private, rec.gen, uid))
        self._write(run)

    def public_key(self, username: str) -> tuple[str, str] | None:
        """(username as registered, public key) of an account with an identity key."""
        row = self.db.one("SELECT username, identity_public FROM users WHERE lower(username) = lower(?)"
                          " AND identity_public IS NOT NULL", (username,))
        return (row[0], row[1]) if row else None

    def create_share(self, owner: UUID, share: UUID, root: UUID, name: str, grant: str, members_seal: str) -> None:
        """Tags ``root``'s subtree with a new share, ``converting`` (invisible to members)
        until the owner has re-sealed it. Refused for the account's root, a folder in
        or containing a share, and a subtree with a file that has a name outside it."""
        uid, sid = _s(owner), _s(share)

        def run(c: Tx) -> None:
            account_root = c.lock_row("SELECT root_inode FROM users WHERE id = ?", (uid,))[0]
            row = c.one("SELECT is_dir, share_id FROM inodes WHERE user_id = ? AND id = ?", (uid, _s(root)))
            if row is None:
                raise E.not_found("no such folder")
            if not row[0]:
                raise E.not_dir("only folders are shared")
            if _s(root) == account_root:
                raise E.invalid("the root folder cannot be shared")
            if row[1] is not None:
                raise E.conflict("this folder is already in a shared folder")
            tagged = self._share_subtree(c, uid, _s(root))
            c.many("UPDATE inodes SET share_id = ? WHERE user_id = ? AND id = ?", [(sid, uid, i) for i in tagged])
            try:
                c.run("INSERT INTO shares(id, owner_id, root_inode, name, state, current_gen, members_seal,"
                      " created_at) VALUES (?,?,?,?,'converting',1,?,?)",
                      (sid, uid, _s(root), name, members_seal, time.time()))
            except UniqueViolation:
                raise E.exists("share id already used") from None
            c.run("INSERT INTO share_grants(share_id, gen, user_id, wrapped) VALUES (?,1,?,?)", (sid, uid, grant))
            bump_shares_seq(c, sid)
        try:
            self._write(run)
        except UniqueViolation:
            raise E.exists("share id already used") from None

    @staticmethod
    def _share_subtree(c: Tx, uid: str, root: str) -> list[str]:
        """Every inode under ``root`` (itself included), checking that none is already
        in a share and that no file has a name outside the subtree."""
        dirs, out, names_inside = [root], [root], {}
        while dirs:
            d = dirs.pop()
            for ino, is_dir, share in c.all("SELECT d.inode, d.is_dir, i.share_id FROM dentries d JOIN inodes i"
                                            " ON i.user_id = d.user_id AND i.id = d.inode"
                                            " WHERE d.user_id = ? AND d.parent = ?", (uid, d)):
                if share is not None:
                    raise E.conflict("a folder inside is already shared")
                if is_dir:
                    dirs.append(ino)
                    out.append(ino)
                elif ino not in names_inside:
                    out.append(ino)
                names_inside[ino] = names_inside.get(ino, 0) + (not is_dir)
        files = [i for i, n in names_inside.items() if n]
        for k in range(0, len(files), 500):
            part = files[k:k + 500]
            for ino, n in c.all(f"SELECT inode, count(*) FROM dentries WHERE user_id = ? AND inode IN"
                                f" ({','.join('?' * len(part))}) GROUP BY inode", (uid, *part)):
                if n != names_inside[ino]:
                    raise E.conflict("a file in this folder has a hard link outside it")
        return out

    def _owned_share(self, c: Tx, owner: str, share: str):
        """(root, state, current gen) of a share of ``owner``'s (whose row is locked)."""
        c.lock_row("SELECT id FROM users WHERE id = ?", (owner,))
        row = c.one("SELECT root_inode, state, current_gen FROM shares WHERE id = ? AND owner_id = ?", (share, owner))
        if row is None:
            raise E.not_found("no such share")
        return row

    def _user_id(self, c: Tx, username: str) -> str:
        row = c.one("SELECT id, identity_public FROM users WHERE lower(username) = lower(?)", (username,))
        if row is None or row[1] is None:
            raise E.not_found(f"no user {username!r} with a public key")
        return row[0]

    def add_member(self, owner: UUID, share: UUID, req: NewMemberRequest) -> None:
        """``req.grants``: the share's every key generation, wrapped for the new member;
        ``req.members_seal``: the owner's seal of the members once it is added to
        ``req.expect_members`` (409 if those are not the members now)."""
        uid, sid = _s(owner), _s(share)
        username, read_only, grants = req.username, req.read_only, req.grants

        def run(c: Tx) -> None:
            self._owned_share(c, uid, sid)
            now = {n.lower() for (n,) in c.all("SELECT u.username FROM share_members m JOIN users u"
                                               " ON u.id = m.user_id WHERE m.share_id = ?", (sid,))}
            if now != {n.lower() for n in req.expect_members}:
                raise E.conflict("the shared folder's members changed meanwhile: try again")
            member = self._user_id(c, username)
            if member == uid:
                raise E.invalid("the owner of a shared folder is not one of its members")
            if c.one("SELECT 1 FROM share_members WHERE share_id = ? AND user_id = ?", (sid, member)):
                raise E.exists(f"{username} is already a member")
            gens = share_key_gens(c, sid)[1]
            if sorted(g.gen for g in grants) != sorted(gens):
                raise E.conflict(f"grants must cover exactly the share's generations {sorted(gens)}")
            c.run("INSERT INTO share_members(share_id, user_id, read_only) VALUES (?,?,?)", (sid, member, int(read_only)))
            c.many("INSERT INTO share_grants(share_id, gen, user_id, wrapped) VALUES (?,?,?,?)",
                   [(sid, g.gen, member, g.wrapped) for g in grants])
            c.run("UPDATE shares SET members_seal = ? WHERE id = ?", (req.members_seal, sid))
            bump_shares_seq(c, sid)
        self._write(run)

    def new_share_generation(self, owner: UUID, share: UUID, req: NewGenerationRequest) -> None:
        """Removes ``remove`` (every grant of theirs too) and adds key generation
        ``gen``, granted to exactly the owner and the remaining members, in one
        transaction; the share is ``rotating`` until the owner has re-sealed it."""
        uid, sid = _s(owner), _s(share)
        gen, grants, remove = req.gen, req.grants, req.remove

        def run(c: Tx) -> None:
            _root, _state, current = self._owned_share(c, uid, sid)
            if gen != current + 1:
                raise E.conflict(f"gen must be {current + 1}")
            removed = []
            if remove is not None:
                member = self._user_id(c, remove)
                if c.run("DELETE FROM share_members WHERE share_id = ? AND user_id = ?", (sid, member)) != 1:
                    raise E.not_found(f"{remove} is not a member of this share")
                c.run("DELETE FROM share_grants WHERE share_id = ? AND user_id = ?", (sid, member))
                removed.append(member)
            to = {self._user_id(c, g.username): g.wrapped for g in grants}
            expected = {uid} | {m for (m,) in c.all("SELECT user_id FROM share_members WHERE share_id = ?", (sid,))}
            if len(to) != len(grants) or set(to) != expected:
                raise E.conflict("the new generation must be granted to the owner and every member, once each")
            c.many("INSERT INTO share_grants(share_id, gen, user_id, wrapped) VALUES (?,?,?,?)",
                   [(sid, gen, m, w) for m, w in to.items()])
            c.run("UPDATE shares SET current_gen = ?, name = ?, members_seal = ?, state = 'rotating' WHERE id = ?",
                  (gen, req.name, req.members_seal, sid))
            bump_shares_seq(c, sid, *removed)
        self._write(run)

    def set_share_ready(self, owner: UUID, share: UUID) -> None:
        uid, sid = _s(owner), _s(share)

        def run(c: Tx) -> None:
            self._owned_share(c, uid, sid)
            c.run("UPDATE shares SET state = 'ready' WHERE id = ?", (sid,))
            bump_shares_seq(c, sid)
        self._write(run)

    def drop_share_generation(self, owner: UUID, share: UUID, gen: int) -> None:
        """Forget an old generation's grants once no file key of the share uses it."""
        uid, sid = _s(owner), _s(share)

        def run(c: Tx) -> None:
            _root, _state, current = self._owned_share(c, uid, sid)
            if gen == current:
                raise E.in_use("cannot drop the current generation")
            if c.one("SELECT 1 FROM inodes WHERE user_id = ? AND share_id = ? AND key_gen = ? LIMIT 1", (uid, sid, gen)):
                raise E.in_use("file keys still use this generation")
            if c.run("DELETE FROM share_grants WHERE share_id = ? AND gen = ?", (sid, gen)) == 0:
                raise E.not_found("no such generation")
            bump_shares_seq(c, sid)
        self._write(run)

    def share_access(self, share: UUID, user_id: UUID) -> tuple[UserRecord, bool] | None:
        """(the owner, read-only?) if ``user_id`` owns ``share`` or is a member of it
        (not while it is being made); None otherwise."""
        cols = ", ".join("u." + c.strip() for c in self._USER_COLS.split(","))
        row = self.db.one(f"SELECT {cols}, coalesce(m.read_only, 0) FROM shares s JOIN users u ON u.id = s.owner_id"
                          " LEFT JOIN share_members m ON m.share_id = s.id AND m.user_id = ?"
                          " WHERE s.id = ? AND (s.owner_id = ? OR (m.user_id IS NOT NULL AND s.state <> 'converting'))",
                          (_s(user_id), _s(share), _s(user_id)))
        return (self._user(row[:9]), bool(row[9])) if row else None

    def shares_of(self, user_id: UUID) -> list[ShareOut]:
        """The shares ``user_id`` owns and those it is a member of (once made)."""
        uid = _s(user_id)

        def run(c: Tx) -> list[ShareOut]:
            rows = c.all("SELECT s.id, u.username, u.identity_public, s.root_inode, s.name, s.state, s.current_gen,"
                         " coalesce(m.read_only, 0), s.owner_id, s.members_seal FROM shares s JOIN users u ON u.id = s.owner_id"
                         " LEFT JOIN share_members m ON m.share_id = s.id AND m.user_id = ?"
                         " WHERE s.owner_id = ? OR (m.user_id IS NOT NULL AND s.state <> 'converting')"
                         " ORDER BY s.created_at, s.id", (uid, uid))
            out = []
            for sid, owner, owner_public, root, name, state, gen, read_only, owner_id, seal in rows:
                grants = c.all("SELECT gen, wrapped FROM share_grants WHERE share_id = ? AND user_id = ?"
                               " ORDER BY gen", (sid, uid))
                gens = sorted(g for (g,) in c.all("SELECT DISTINCT gen FROM share_grants WHERE share_id = ?", (sid,)))
                members = [] if owner_id != uid else [
                    ShareMemberOut(username=n, public_key=p, read_only=bool(r)) for n, p, r in c.all(
                        "SELECT u.username, u.identity_public, m.read_only FROM share_members m"
                        " JOIN users u ON u.id = m.user_id WHERE m.share_id = ? ORDER BY u.username", (sid,))]
                out.append(ShareOut(id=UUID(sid), owner=owner, owner_public_key=owner_public, root_inode=UUID(root),
                                    name=name, state=state, current_gen=gen, gens=gens, read_only=bool(read_only),
                                    grants=[Grant(gen=g, wrapped=w) for g, w in grants], members=members,
                                    members_seal=seal if owner_id == uid else None))
            return out
        return self._read(run)

    # -- maintenance
    def claim_staged(self, older_than: float) -> list[tuple[UUID, UUID, UUID]]:
        """Staged blobs older than ``older_than``, marked as being swept (a commit
        no longer accepts them) so their objects can be deleted. Safe from several
        nodes at once: a blob may be claimed twice, deleting it twice is harmless."""
        def run(c: Tx):
            return c.all("UPDATE blobs SET committed = -1 WHERE committed <> 1 AND created_at < ?"
                         " RETURNING user_id, inode, blob_id", (older_than,))
        rows = self._write(run)
        return [(UUID(u), UUID(i), UUID(b)) for u, i, b in rows]

    def forget_swept(self, blobs: Sequence[tuple[UUID, UUID, UUID]]) -> None:
        """Drop the rows of swept blobs whose objects are gone (uncharging their owners)."""
        def run(c: Tx) -> None:
            for user, inode, blob in blobs:
                row = c.one("DELETE FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ? AND committed = -1"
                            " RETURNING size", (_s(user), _s(inode), _s(blob)))
                if row:
                    c.run("UPDATE users SET used_bytes = used_bytes - ? WHERE id = ?", (row[0], _s(user)))
        self._write(run)

    def expire_orphans(self, older_than: float) -> list[tuple[UUID, UUID, list[UUID]]]:
        """Delete orphans (no names left) older than ``older_than``: (user, inode, its blobs)."""
        rows = self.db.all("SELECT DISTINCT user_id FROM inodes WHERE orphan_since IS NOT NULL"
                           " AND orphan_since < ?", (older_than,))
        dropped: list[tuple[UUID, UUID, list[UUID]]] = []
        for (uid,) in rows:
            def run(c: Tx, uid=uid):
                tx = NamespaceTx(c, uid)
                for (ino,) in c.all("SELECT id FROM inodes WHERE user_id = ? AND orphan_since IS NOT NULL"
                                    " AND orphan_since < ?", (uid, older_than)):
                    if tx.links(ino) == 0 and ino != tx.root:
                        tx.drop_inode(ino)
                tx.finish()
                return [(UUID(uid), i, [b for bi, b in tx.drop_blobs if bi == i]) for i in tx.drop_inodes]
            dropped.extend(self._write(run))
        return dropped
