"""Write-back of the namespace changes that need not wait for the server:
attribute changes of inodes with no open-file state (chmod, chown, touch,
xattrs, and the ctime that link, unlink and rename give a file) and renames of
closed files. Each rides on the next batch sent to the server (rsync's chown +
chmod + utimens + rename become part of the next file's commit), or goes out
within ``DELAY``. Every batch sends them first, in the order they were made, and
a listing fetched from the server waits for them, so the cache never loses one.

Each inode's unsent changes have exactly one holder: its ``OpenFile`` while it
has one (handles open, or content not yet committed), else its ``PendingAttrs``
here; ``OpenFile.take_over_attrs`` and ``hand_over`` move them between the two.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from uuid import UUID

from ..errors import ServerError
from ..format import Attrs
from ..ops import Op
from ..vault import Node, Vault
from .conflicts import conflict_name
from .handles import OpenFileTable
from .namespace import MetaCache
from .openfile import OpenFile

log = logging.getLogger(__name__)

DELAY = 0.5


@dataclass
class PendingAttrs:
    node: Node                 # as last seen on the server (CAS base)
    attrs: Attrs               # what we want
    changes: list              # the changes, to replay on a newer version after a conflict
    since: float               # monotonic time of the first change
    at_ns: int                 # wall-clock time of the latest change


@dataclass
class PendingRename:
    op: Op
    what: str                  # "rename OLD -> NEW", for the log if the server refuses it
    parents: tuple[UUID, UUID]
    since: float
    frees: tuple[UUID, str] | None = None    # (parent, name) an unlink of an open file frees


class WriteBack:
    def __init__(self, vault: Vault, meta: MetaCache, table: OpenFileTable, lock: threading.RLock,
                 hostname: str):
        self.vault, self.meta, self.table, self.lock = vault, meta, table, lock
        self.hostname = hostname
        self.attrs: dict[UUID, PendingAttrs] = {}
        self.renames: list[PendingRename] = []
        meta.before_fetch = self.send_renames
        meta.unsent_changes = lambda: bool(self.renames)

    # ------------------------------------------------------------ queueing
    def change_attrs(self, node: Node, change) -> None:
        """(Under the lock.) An attribute change of an inode with no open-file state."""
        p = self.attrs.get(node.id)
        if p is None:
            p = self.attrs[node.id] = PendingAttrs(node, node.attrs.evolve(), [], time.monotonic(), 0)
        change(p.attrs)
        p.at_ns = p.attrs.ctime_ns = time.time_ns()
        p.changes.append(change)

    def take_attrs(self, inode: UUID) -> PendingAttrs | None:
        """(Under the lock.) Hand an inode's pending changes to its new open-file state."""
        return self.attrs.pop(inode, None)

    def attrs_of(self, inode: UUID) -> Attrs | None:
        p = self.attrs.get(inode)
        return p.attrs if p is not None else None

    def hand_over(self, of: OpenFile) -> None:
        """(Under ``of.lock``.) Attribute changes are all a file has left to send: once
        no handle is left, its state hands them over and leaves the open-file table.
        While a handle is open they stay with the file (its last close sends them)."""
        with self.lock:
            if of.handles > 0 or self.table.get(of.id) is not of:
                return
            base_version, attrs, changes = of.take_attr_changes()
            self.table.drop(of)
            self.attrs[of.id] = PendingAttrs(Node(of.id, False, base_version, self.meta.nlink(of.id), attrs),
                                             attrs, changes, time.monotonic(), attrs.ctime_ns)

    def defer_rename(self, op: Op, what: str, parents: tuple[UUID, UUID],
                     frees: tuple[UUID, str] | None = None) -> None:
        self.renames.append(PendingRename(op, what, parents, time.monotonic(), frees))

    def freed(self, parent: UUID, name: str) -> PendingRename | None:
        """(Under the lock.) The unsent unlink of an open file that freed this name."""
        return next((r for r in self.renames if r.frees == (parent, name)), None)

    def due(self) -> bool:
        oldest = min([p.since for p in list(self.attrs.values())] + [r.since for r in self.renames[:1]],
                     default=None)
        return oldest is not None and time.monotonic() - oldest >= DELAY

    # ------------------------------------------------------------ sending
    def send_renames(self) -> None:
        if self.renames:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            self.apply([])

    def apply(self, ops: list[Op]) -> list[dict]:
        """Apply ``ops`` in one transaction, preceded by everything waiting: renames,
        creates of new files and attribute changes."""
        with self.lock:
            creating = self.table.creating()
            waiting = list(self.attrs.items())
            moving = list(self.renames)
            # Renames first: a file created since may reuse a name one of them frees
            # (git's config.lock), and none of them can depend on a pending create
            # (renames onto an open file are not deferred).
            prefix = [r.op for r in moving]
            prefix += [of.create_op() for of in creating]
            prefix += [self.vault.op_setmeta(i, p.node.version, p.attrs.evolve(), at_ns=p.at_ns) for i, p in waiting]
            if not prefix:
                return self.vault.apply(ops) if ops else []
            try:
                results = self.vault.apply(prefix + ops)
            except ServerError:
                # Which op failed is unknown: settle the prefix on its own (it
                # resolves its conflicts), then let the caller's ops fail or not.
                self._one_by_one(creating, waiting, moving)
                return self.vault.apply(ops) if ops else []
            del self.renames[:len(moving)]
            self._prefix_done(creating, waiting, results[len(moving):len(prefix)])
            return results[len(prefix):]

    def _prefix_done(self, creating: list[OpenFile], waiting: list, results: list[dict]) -> None:
        for of in creating:
            self.published(of)
        for (inode, p), res in zip(waiting, results[len(creating):]):
            if self.attrs.get(inode) is p:
                del self.attrs[inode]
            if not p.node.is_dir:      # (a directory's sealed state reached the cache from the vault)
                self.meta.put_node(Node(inode, False, res["version"], p.node.nlink,
                                        p.attrs.evolve(version=res["version"])))

    def published(self, of: OpenFile) -> None:
        """A new file's create went through: the cache learns its entry."""
        parent, name = of.pending.parent, of.pending.name
        of.created()
        self.meta.set_entry(parent, name, Node(of.id, False, 1, 1, of.attrs.evolve(size=0, manifest_digest=None)))

    def create_or_rename(self, of: OpenFile) -> None:
        """Publish a new file. If another client took the name meanwhile, theirs
        keeps it and ours becomes a conflict copy beside it: neither is lost."""
        try:
            self.vault.apply([of.create_op()])
        except ServerError as exc:
            if exc.code != "exists":
                log.error("could not create %s on the server: %s", of.last_path or of.id, exc)
                raise
            taken = of.pending.name
            self.meta.set_entry(of.pending.parent, taken, None)
            self.meta.forget(of.pending.parent)
            of.pending.name = conflict_name(taken, self.hostname)
            self.vault.apply([of.create_op()])
            log.warning("conflict: %s was created elsewhere too; this one was saved as %s",
                        taken, of.pending.name)
        self.published(of)

    def _one_by_one(self, creating: list[OpenFile], waiting: list, moving: list[PendingRename]) -> None:
        for r in moving:
            try:
                self.vault.apply([r.op])
            except ServerError as exc:
                # Refused (changed elsewhere meanwhile): the server's names stand.
                log.error("%s could not be saved on the server: %s", r.what, exc)
                for d in r.parents:
                    self.meta.forget(d)
            self.renames.remove(r)
        for of in creating:
            if of.pending is not None:
                self.create_or_rename(of)
        for inode, p in waiting:
            for attempt in range(3):
                try:
                    res = self.vault.apply([self.vault.op_setmeta(inode, p.node.version, p.attrs.evolve(),
                                                                  at_ns=p.at_ns)])[0]
                except ServerError as exc:
                    if exc.code == "conflict" and attempt < 2:
                        # Changed elsewhere meanwhile: replay our changes on theirs.
                        p.node = self.meta.node(inode, fresh=True)
                        p.attrs = p.node.attrs.evolve()
                        for change in p.changes:
                            change(p.attrs)
                        continue
                    log.error("attribute change of inode %s lost: %s", inode, exc)
                    self.attrs.pop(inode, None)
                    self.meta.forget(inode)
                    break
                self._prefix_done([], [(inode, p)], [res])
                break
