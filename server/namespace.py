"""The namespace rules, written once for every SQL engine: POSIX renames and
cycles, versions and compare-and-swap, links and orphans, blob bookkeeping, the
change feed and the quota.

:class:`NamespaceTx` applies ops inside one write transaction of one account
(its ``users`` row locked first, so an account's transactions run one after
another whichever node sends them). It reads and writes rows through a
:class:`~server.sqldb.Tx` in the SQL both engines speak.

Usage (``users.used_bytes``) is every byte the account makes the server keep:
blob bytes plus the encrypted attributes, manifests, wrapped keys and names.

Shared folders (docs/API.md "Shares"): every inode is tagged with the share it
belongs to (``inodes.share_id``; NULL: its owner's private tree). A request works
in a :class:`Scope`: its account's own rows, or, for a member, one share of the
owner's rows, where nothing outside the share exists. Whoever asks, nothing moves
into or out of a share: a new inode takes its folder's share, and a link, rename
or exchange joins folders of the same share only (``cross_share`` otherwise: the
client copies instead).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from uuid import UUID

from . import errors as E
from .models import (OpCommit, OpCreate, OpDeleteInode, OpExchange, OpLink, OpRename, OpRmdir,
                     OpSetMeta, OpUnlink)
from .sqldb import Tx

# Bytes of an inode row the account is charged for (its blobs are counted apart).
INODE_BYTES_SQL = "length(meta) + coalesce(length(manifest), 0) + coalesce(length(wrapped_key), 0)"


def check_quota(used: int, growth: int, quota: int | None) -> None:
    """The one quota rule: a change that grows an account must leave it within its
    quota; a change that does not grow it (deleting, shrinking) is always allowed."""
    if quota is not None and growth > 0 and used + growth > quota:
        raise E.no_space("quota exceeded")


def quota_room(used: int, quota: int | None) -> int | None:
    """Bytes the account may still add (None: no quota)."""
    return None if quota is None else max(0, quota - used)


def _s(u: UUID) -> str:
    return str(u)


@dataclass(frozen=True)
class Scope:
    """The rows a request works on: ``user_id``'s (the owner's) and, when ``share``
    is set (a member's request), only those tagged with that share."""
    user_id: str
    share: str | None = None
    actor: str | None = None          # the member asking (None: the owner)
    read_only: bool = False

    def only(self, alias: str = "") -> tuple[str, tuple]:
        """SQL narrowing a query on ``inodes`` (as ``alias``) to this scope."""
        if self.share is None:
            return "", ()
        return f" AND {alias}share_id = ?", (self.share,)

    def require_write(self) -> None:
        if self.read_only:
            raise E.read_only()


def share_key_gens(c: Tx, share: str) -> tuple[int, set[int]]:
    """(current generation, every generation) of a share's keys."""
    row = c.one("SELECT current_gen FROM shares WHERE id = ?", (share,))
    if row is None:
        raise E.not_found("no such share")
    gens = {g for (g,) in c.all("SELECT DISTINCT gen FROM share_grants WHERE share_id = ?", (share,))}
    return row[0], gens


def require_member(c: Tx, scope: Scope) -> None:
    """Inside the transaction (the owner's row locked, as every share change locks
    it): a member removed since the request was authorised gets nothing more."""
    if scope.share is None or scope.actor is None:
        return
    row = c.one("SELECT m.read_only FROM share_members m JOIN shares s ON s.id = m.share_id"
                " WHERE m.share_id = ? AND m.user_id = ? AND s.state <> 'converting'", (scope.share, scope.actor))
    if row is None:
        raise E.not_found("no such share")
    if row[0]:
        raise E.read_only()


@dataclass
class OpsOutcome:
    seq: int
    results: list[tuple[UUID | None, int | None]]
    drop_blobs: list[tuple[UUID, UUID]] = field(default_factory=list)   # (inode, blob)
    drop_inodes: list[UUID] = field(default_factory=list)


class NamespaceTx:
    """Applies ops inside an open write transaction for one user."""

    def __init__(self, c: Tx, uid: str, default_quota: int | None = None, scope: Scope | None = None) -> None:
        self.c, self.uid = c, uid
        self.scope = scope or Scope(uid)
        self._only, self._only_args = self.scope.only()
        row = c.lock_row("SELECT seq, root_inode, used_bytes, quota_bytes FROM users WHERE id = ?", (uid,))
        if row is None:
            raise E.not_found("no such user")
        require_member(c, self.scope)
        self.seq = row[0] + 1
        self.root = row[1]
        self.used = row[2]
        self.quota = row[3] if row[3] is not None else default_quota
        self.growth = 0                      # change of used_bytes in this transaction
        self.now = time.time()
        self.touched: set[str] = set()
        self.dropped: set[str] = set()
        self.results: list[tuple[UUID | None, int | None]] = []
        self.drop_blobs: list[tuple[UUID, UUID]] = []
        self.drop_inodes: list[UUID] = []

    # -- helpers
    def inode(self, ino: str):
        """(is_dir, version, key_gen, share_id) or None (also for an inode outside the scope)."""
        return self.c.one(f"SELECT is_dir, version, key_gen, share_id FROM inodes WHERE user_id = ? AND id = ?"
                          f"{self._only}", (self.uid, ino, *self._only_args))

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

    def inode_bytes(self, ino: str) -> int:
        row = self.c.one(f"SELECT {INODE_BYTES_SQL} FROM inodes WHERE user_id = ? AND id = ?",
                         (self.uid, ino))
        return row[0] if row else 0

    def entry(self, parent: str, name_hash: str):
        """(inode, is_dir) or None."""
        return self.c.one("SELECT inode, is_dir FROM dentries WHERE user_id = ? AND parent = ?"
                          " AND name_hash = ?", (self.uid, parent, name_hash))

    def links(self, ino: str) -> int:
        return self.c.one("SELECT count(*) FROM dentries WHERE user_id = ? AND inode = ?",
                          (self.uid, ino))[0]

    def dir_empty(self, ino: str) -> bool:
        return self.c.one("SELECT 1 FROM dentries WHERE user_id = ? AND parent = ? LIMIT 1",
                          (self.uid, ino)) is None

    def add_entry(self, parent: str, name_hash: str, ino: str, is_dir: bool, name: str) -> None:
        self.c.run("INSERT INTO dentries(user_id, parent, name_hash, inode, is_dir, name)"
                   " VALUES (?,?,?,?,?,?)", (self.uid, parent, name_hash, ino, int(is_dir), name))
        self.growth += len(name)

    def del_entry(self, parent: str, name_hash: str) -> None:
        row = self.c.one("DELETE FROM dentries WHERE user_id = ? AND parent = ? AND name_hash = ?"
                         " RETURNING length(name)", (self.uid, parent, name_hash))
        self.growth -= row[0] if row else 0

    def touch(self, *inos: str) -> None:
        self.touched.update(inos)

    def drop_inode(self, ino: str) -> None:
        c, uid = self.c, self.uid
        share = c.one("SELECT share_id FROM inodes WHERE user_id = ? AND id = ?", (uid, ino))[0]
        blobs = c.all("SELECT blob_id, size FROM blobs WHERE user_id = ? AND inode = ?", (uid, ino))
        for b, size in blobs:
            self.drop_blobs.append((UUID(ino), UUID(b)))
            self.growth -= size
        c.run("DELETE FROM blobs WHERE user_id = ? AND inode = ?", (uid, ino))
        names = c.one("SELECT coalesce(sum(length(name)), 0) FROM dentries WHERE user_id = ? AND parent = ?",
                      (uid, ino))[0]
        c.run("DELETE FROM dentries WHERE user_id = ? AND parent = ?", (uid, ino))
        self.growth -= names + self.inode_bytes(ino)
        c.run("DELETE FROM inodes WHERE user_id = ? AND id = ?", (uid, ino))
        c.run("INSERT INTO tombstones(user_id, inode, seq, share_id) VALUES (?,?,?,?)"
              " ON CONFLICT(user_id, inode) DO UPDATE SET seq = excluded.seq, share_id = excluded.share_id",
              (uid, ino, self.seq, share))
        if share is not None:
            drop_share_rooted_at(c, uid, ino)
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
            self.c.run("UPDATE inodes SET orphan_since = ? WHERE user_id = ? AND id = ?",
                       (self.now, self.uid, ino))

    def version(self, ino: str) -> int | None:
        row = self.inode(ino)
        return row[1] if row else None

    def finish(self) -> int:
        """Charge the account, stamp the change feed; raises no_space over quota."""
        check_quota(self.used, self.growth, self.quota)
        live = [i for i in self.touched if i not in self.dropped]
        self.c.many("UPDATE inodes SET changed_seq = ? WHERE user_id = ? AND id = ?",
                    [(self.seq, self.uid, i) for i in live])
        self.c.run("UPDATE users SET seq = ?, used_bytes = used_bytes + ? WHERE id = ?",
                   (self.seq, self.growth, self.uid))
        return self.seq

    # -- ops
    def apply(self, op, inline_sizes) -> tuple[UUID | None, int | None]:
        handler = getattr(self, "op_" + op.op)
        return handler(op, inline_sizes)

    def op_create(self, op: OpCreate, _inline):
        ino, parent = _s(op.inode), _s(op.parent)
        share = self.require_dir(parent)[3]           # a new inode is in its folder's share
        if self.entry(parent, op.name_hash):
            raise E.exists("name exists")
        if self.c.one("SELECT 1 FROM inodes WHERE user_id = ? AND id = ?", (self.uid, ino)) is not None \
                or ino in self.dropped:
            raise E.exists("inode id already used")
        if op.is_dir and op.wrapped_key is not None:
            raise E.invalid("directories have no file key")
        self.require_key_gen(op, share)
        self.c.run("INSERT INTO inodes(user_id, id, is_dir, version, meta, key_gen, wrapped_key, changed_seq,"
                   " share_id) VALUES (?,?,?,1,?,?,?,?,?)",
                   (self.uid, ino, int(op.is_dir), op.meta, op.key_gen, op.wrapped_key, self.seq, share))
        self.growth += len(op.meta) + len(op.wrapped_key or "")
        self.c.run("DELETE FROM tombstones WHERE user_id = ? AND inode = ?", (self.uid, ino))
        self.add_entry(parent, op.name_hash, ino, op.is_dir, op.name)
        self.touch(ino, parent)
        return op.inode, 1

    def op_link(self, op: OpLink, _inline):
        ino, parent = _s(op.inode), _s(op.parent)
        row = self.require_inode(ino)
        if row[0]:
            raise E.is_dir("cannot hard-link a directory")
        if self.require_dir(parent)[3] != row[3]:
            raise E.cross_share()
        if self.entry(parent, op.name_hash):
            raise E.exists("name exists")
        self.add_entry(parent, op.name_hash, ino, False, op.name)
        self.c.run("UPDATE inodes SET orphan_since = NULL WHERE user_id = ? AND id = ?", (self.uid, ino))
        self.touch(ino, parent)
        return op.inode, row[1]

    def _expect(self, ent, expect: UUID | None) -> None:
        """The client's directory digest counts on this entry naming ``expect``."""
        if expect is not None and ent[0] != _s(expect):
            raise E.stale("the entry no longer names the expected inode")

    def named(self, op: OpUnlink | OpRmdir) -> tuple[str, str, bool]:
        """(parent, inode, is_dir) of the entry an unlink or rmdir names; not_found
        if it is gone, stale if it no longer names ``expect_inode``."""
        parent = _s(op.parent)
        self.require_dir(parent)
        ent = self.entry(parent, op.name_hash)
        if ent is None:
            raise E.not_found("no such entry")
        self._expect(ent, op.expect_inode)
        return parent, ent[0], bool(ent[1])

    def op_unlink(self, op: OpUnlink, _inline):
        parent, ino, isdir = self.named(op)
        if isdir:
            raise E.is_dir("is a directory (use rmdir)")
        self.del_entry(parent, op.name_hash)
        self.touch(parent)
        self.release(ino, False, op.keep_orphan)
        return UUID(ino), self.version(ino)

    def op_rmdir(self, op: OpRmdir, _inline):
        parent, ino, isdir = self.named(op)
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
        src_share = self.require_dir(sp)[3]
        src = self.entry(sp, op.src_hash)
        if src is None:
            raise E.not_found("no such source entry")
        if self.require_dir(dp)[3] != src_share:
            raise E.cross_share()
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
            row = self.c.one("SELECT parent FROM dentries WHERE user_id = ? AND inode = ? LIMIT 1",
                             (self.uid, cur))
            cur = row[0] if row else None

    def op_exchange(self, op: OpExchange, _inline):
        ap, bp = _s(op.a_parent), _s(op.b_parent)
        if self.require_dir(ap)[3] != self.require_dir(bp)[3]:
            raise E.cross_share()
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
        before = self.inode_bytes(ino)
        self.c.run("UPDATE inodes SET meta = ?, version = version + 1 WHERE user_id = ? AND id = ?",
                   (op.meta, self.uid, ino))
        self.growth += self.inode_bytes(ino) - before
        self.touch(ino)
        return op.inode, row[1] + 1

    def require_key_gen(self, op, share: str | None) -> None:
        """A new file key's fields go together and name one of the account's generations
        or, in a share, its current one (a key wrapped under a generation an unshare
        retired would open for the removed member)."""
        if (op.wrapped_key is None) != (op.key_gen is None):
            raise E.invalid("wrapped_key and key_gen go together")
        if op.key_gen is None:
            return
        if share is not None:
            if share_key_gens(self.c, share)[0] != op.key_gen:
                raise E.unknown_key_gen(op.key_gen)   # the share's keys rotated: the client re-wraps
        elif not self.c.one("SELECT 1 FROM master_keys WHERE user_id = ? AND gen = ?", (self.uid, op.key_gen)):
            raise E.unknown_key_gen(op.key_gen)      # retired by a rotate-key: the client re-wraps

    def op_commit(self, op: OpCommit, inline_sizes):
        c, uid, ino = self.c, self.uid, _s(op.inode)
        row = self.require_inode(ino)
        if row[0]:
            raise E.is_dir("directories have no content")
        if row[1] != op.base_version:
            raise E.conflict(f"version is {row[1]}, not {op.base_version}")
        self.require_key_gen(op, row[3])  # rotate-key --full: a new file key with the content it opens
        dropped = set(self.drop_blobs)
        for ib in op.inline:
            if (op.inode, ib.blob_id) in dropped or c.one(
                    "SELECT 1 FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                    (uid, ino, _s(ib.blob_id))):
                raise E.exists(f"blob {ib.blob_id} already stored")
            size = inline_sizes[(op.inode, ib.blob_id)]
            c.run("INSERT INTO blobs(user_id, inode, blob_id, size, committed, created_at)"
                  " VALUES (?,?,?,?,0,?)", (uid, ino, _s(ib.blob_id), size, self.now))
            self.growth += size
        # Every blob the new manifest lists must be stored (or staged) for this
        # inode; those it no longer lists are dropped after the commit.
        stored = {b: (committed, verified, size) for b, committed, verified, size in c.all(
            "SELECT blob_id, committed, verified, size FROM blobs WHERE user_id = ? AND inode = ?",
            (uid, ino))}
        wanted = dict.fromkeys(_s(b) for b in op.blobs)
        for b in wanted:
            state = stored.get(b)
            if state is None or state[0] < 0:       # never stored, or being swept
                raise E.invalid(f"blob {b} is not stored for this inode")
            if not state[1]:
                raise E.invalid(f"blob {b} was not checked after its direct upload")
        staged = [b for b in wanted if stored[b][0] == 0]
        for i in range(0, len(staged), 500):
            part = staged[i:i + 500]
            # "AND committed = 0": a sweeper on another node may have claimed one since
            # it was read (nothing locks a staged row); then the commit must fail.
            if c.run(f"UPDATE blobs SET committed = 1 WHERE user_id = ? AND inode = ? AND committed = 0"
                     f" AND blob_id IN ({','.join('?' * len(part))})", (uid, ino, *part)) != len(part):
                raise E.invalid("a blob of this commit was swept meanwhile: upload it again")
        stale = [b for b, (committed, _v, _n) in stored.items() if committed == 1 and b not in wanted]
        if stale:
            self.growth -= sum(stored[b][2] for b in stale)
            c.many("DELETE FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                   [(uid, ino, b) for b in stale])
            self.drop_blobs.extend((op.inode, UUID(b)) for b in stale)
        before = self.inode_bytes(ino)
        c.run("UPDATE inodes SET meta = ?, manifest = ?, version = version + 1"
              " WHERE user_id = ? AND id = ?", (op.meta, op.manifest, uid, ino))
        if op.key_gen is not None:
            c.run("UPDATE inodes SET key_gen = ?, wrapped_key = ? WHERE user_id = ? AND id = ?",
                  (op.key_gen, op.wrapped_key, uid, ino))
        self.growth += self.inode_bytes(ino) - before
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


def drop_share_rooted_at(c: Tx, owner: str, root: str) -> None:
    """The owner deleted a shared folder: the share goes with it (its members first
    told, through their shares counter)."""
    row = c.one("SELECT id FROM shares WHERE owner_id = ? AND root_inode = ?", (owner, root))
    if row is None:
        return
    bump_shares_seq(c, row[0])
    for table in ("share_members", "share_grants"):
        c.run(f"DELETE FROM {table} WHERE share_id = ?", (row[0],))
    c.run("DELETE FROM shares WHERE id = ?", (row[0],))


def bump_shares_seq(c: Tx, share: str, *also: str) -> None:
    """The owner's and every member's (and ``also``'s: a member just removed) shares
    counter moves: their clients reload their shares at their next poll."""
    c.run("UPDATE users SET shares_seq = shares_seq + 1 WHERE id IN"
          " (SELECT owner_id FROM shares WHERE id = ? UNION SELECT user_id FROM share_members WHERE share_id = ?)",
          (share, share))
    for uid in also:
        c.run("UPDATE users SET shares_seq = shares_seq + 1 WHERE id = ?", (uid,))
