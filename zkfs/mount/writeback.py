"""The front of the write-back journal: every change a call makes becomes a
journal record (journal.py) before the call returns, and this mount's cache shows
it at once; the uploader (uploader.py) sends the records to the server, many per
request, in the order they were made. A close and an fsync wait for the record
to be on disk (group commit), an fsync also for the server to have it; the other
calls return once their record is written (it outlives a killed mount).

Each inode's unsent changes have one holder here: its ``OpenFile`` while it has
one (open, or a version still in the journal); the cache's node otherwise, with
the version the journal will give it.

``Policy`` settles what the server refuses: a file another machine changed since
this mount saw it keeps theirs under its name and ours as a conflict copy beside
it; a name another machine took gets ours under a conflict name; a rename or
removal another machine made impossible is logged and dropped (their names
stand).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol
from uuid import UUID

from ..errors import ServerError
from ..format import Attrs
from ..vault import Node, Vault
from . import records
from .conflicts import conflict_name
from .handles import OpenFileTable
from .journal import Journal, Record
from .shared import check_record, stamp_record
from .namespace import MetaCache
from .openfile import OpenFile
from .uploader import Uploader

log = logging.getLogger(__name__)


class WriteBack:
    def __init__(self, vault: Vault, meta: MetaCache, table: OpenFileTable, lock: threading.RLock,
                 hostname: str, journal: Journal):
        self.vault, self.meta, self.table, self.lock = vault, meta, table, lock
        self.hostname = hostname
        self.journal = journal
        self.uploader = Uploader(vault, journal, self)
        self.conflicts: ConflictSaver | None = None       # set by the mount (conflicts.py)
        self._to_show: list[tuple[UUID, str, Node]] = []
        meta.journal_last = lambda: journal.last_change

    # ------------------------------------------------------------ recording
    def record(self, *bodies: dict) -> int:
        """(Under the lock.) Write ``bodies`` to the journal after the creates of new
        files the server has not seen yet (any record may name them); returns the
        last sequence number. Written, not yet on disk: ``wait`` for that."""
        for body in bodies:
            check_record(self.vault, body)       # /Shared, a read-only share, across a share's edge
        seq = 0
        for body in [*self._publish_creates(), *bodies]:
            stamp_record(self.vault, body)
            seq = self.journal.append_nowait(body)
            self.uploader.push(Record(seq, body))
        return seq

    def _publish_creates(self) -> list[dict]:
        out = []
        for of in self.table.creating():
            p = of.pending
            out.append(records.create(p.parent, p.name, of.id, of.attrs.evolve(size=0, manifest_digest=None),
                                      p.file_key, p.at_ns))
            of.created()
        return out

    def seal(self, of: OpenFile) -> int:
        """(Under ``of.lock``.) Journal what an open file holds that the server does not
        have; returns the record's sequence number (0: nothing to journal)."""
        of.settle_uploads()
        if of.sealed:
            # Nothing to journal: do not wait for the namespace lock while holding the
            # file's (a utimens under the namespace lock may be waiting for the file's:
            # a release arriving after close() returned deadlocked against it).
            return 0
        with self.lock:
            bodies = of.seal()
            if not bodies:
                return 0
            if of.last_path:
                # Where a conflict copy of this version goes, should the server refuse
                # it after a restart (no open-file state then knows the name).
                for body in bodies:
                    if body["t"] == "commit":
                        body["path"] = of.last_path
            seq = self.record(*bodies)
            of.journaled_seq = seq
            self.meta.put_local(dataclasses.replace(of.base_node, nlink=self.meta.nlink(of.id)))
            return seq

    def wait(self, seq: int, *, server: bool = False, timeout: float | None = None) -> bool:
        """Until record ``seq`` is on disk (and on the server too, with ``server``)."""
        self.journal.wait_durable(seq)
        return not server or self.uploader.wait(seq, timeout)

    def change_attrs(self, node: Node, change) -> Node:
        """(Under the lock.) An attribute change of an inode whose open-file state, if
        any, holds nothing the journal does not: a record now, and the node on the
        version the record makes (the cache's from now on)."""
        attrs = node.attrs.evolve()
        change(attrs)
        attrs.ctime_ns = time.time_ns()
        if node.is_dir:
            self.record(records.attrs(node.id, None, attrs, attrs.ctime_ns))
            new = Node(node.id, True, node.version, node.nlink, attrs)
        else:
            attrs.version = node.version + 1
            self.record(records.attrs(node.id, node.version, attrs, attrs.ctime_ns))
            new = Node(node.id, False, attrs.version, node.nlink, attrs)
        self.meta.put_local(new)
        return new

    def flush(self, timeout: float | None = None) -> bool:
        """Everything journaled so far is on the server (False: it stayed away)."""
        with self.lock:
            seq = self.record()
        return self.uploader.wait(seq or self.journal.last_change, timeout)

    # ------------------------------------------------------------ Policy (uploader)
    def show_when_queued(self, parent: UUID, name: str, node: Node) -> None:
        """(While settling a refusal.) An entry the records being returned make: shown
        by the cache's overlay once they are in the journal (``queued``), so that it
        stays until the server has them."""
        self._to_show.append((parent, name, node))

    def queued(self) -> None:
        with self.lock:
            for parent, name, node in self._to_show:
                self.meta.set_entry(parent, name, node)
            self._to_show.clear()

    def settled(self, done: int) -> None:
        """(The uploader's thread.) Every record up to ``done`` is on the server (or
        settled): the cache's overlay of them goes, and so do the states of closed
        files whose last version they were."""
        self.meta.settled(done)
        with self.lock:
            for of in self.table.files():
                if of.journaled_seq and of.journaled_seq <= done:
                    of.sent_upto = max(of.sent_upto, of.journaled_seq)
                    if of.handles == 0 and of.clean:
                        self.table.drop(of)

    def refused(self, record: Record, exc: ServerError) -> list[dict]:
        out = self._settle_refusal(record, exc)
        for body in out:
            check_record(self.vault, body)       # a conflict copy is in its folder's share...
            stamp_record(self.vault, body)       # ...and says so after a restart too
        return out

    def _settle_refusal(self, record: Record, exc: ServerError) -> list[dict]:
        body = record.body
        t = body["t"]
        with self.lock:
            if t == "create" and exc.code == "exists":
                return [self._created_elsewhere(body)]
            for inode in records.inodes_of(body):
                self.meta.drop_local_node(inode)       # this mount's unsent state of it was refused
            if t in ("commit", "attrs") and exc.code in ("conflict", "not_found"):
                return self._changed_elsewhere(body, exc)
            if t == "delete":
                # An orphan that got a name again (another machine linked it) or is gone
                # already: the server keeps or has dropped it, as it should.
                log.info("%s: the server keeps it (%s)", records.describe(body), exc)
                return []
            # A rename, link or removal another machine made impossible: theirs stands.
            log.error("%s could not be saved on the server: %s; the server's names stand", records.describe(body), exc)
            for key in ("parent", "sp", "dp", "ap", "bp"):
                if key in body:
                    self.meta.forget(UUID(body[key]))
            for inode in records.inodes_of(body):
                self.meta.forget(inode)
            return []

    def _created_elsewhere(self, body: dict) -> dict:
        """Another machine created the same name first: theirs keeps it, ours is saved
        beside it (later records naming ours by that name are refused, not applied
        to theirs: every removal and rename says which inode it means)."""
        parent, taken = UUID(body["parent"]), body["name"]
        renamed = conflict_name(taken, self.hostname)
        log.warning("conflict: %s was created elsewhere too; this one was saved as %s", taken, renamed)
        self.meta.drop_local(parent, taken)
        inode = UUID(body["inode"])
        attrs = Attrs.from_doc(body["attrs"])
        self.show_when_queued(parent, renamed, self.meta.node(inode) if self.meta.has_local(inode)
                              else Node(inode, attrs.is_dir, 1, 2 if attrs.is_dir else 1, attrs))
        of = self.table.get(inode)
        if of is not None and of.last_path:
            of.last_path = of.last_path.rsplit("/", 1)[0] + "/" + renamed
        return body | {"name": renamed}

    def _changed_elsewhere(self, body: dict, exc: ServerError) -> list[dict]:
        """A file changed (or deleted) elsewhere since this mount saw it: theirs keeps
        the name, and this mount's latest unsent version of it (this one, or a later
        one still queued, which replaces it) is saved beside it as a conflict copy."""
        inode = UUID(body["inode"])
        of = self.table.get(inode)
        if body["t"] == "attrs":
            return self._attrs_on_theirs(body, inode, exc)
        latest = self.uploader.take_latest(inode) or body
        path = (of.last_path if of is not None else None) or latest.get("path")
        out = self.conflicts.save_copy(latest, path, exc) if self.conflicts else []
        if of is not None and of.handles == 0 and of.sealed:
            try:
                of.rebase(self.vault.get(inode))     # follows theirs from now on
            except ServerError:
                of.unlinked = True                   # deleted elsewhere: ours lives on in the copy
            of.sent_upto = of.journaled_seq
        elif of is not None:
            # Still being written, on our version: its next one is refused in turn and
            # copied too, and may reuse chunks of this one.
            self.uploader.keep_chunks_of.add(str(inode))
        return out

    def _attrs_on_theirs(self, body: dict, inode: UUID, exc: ServerError) -> list[dict]:
        """Attribute changes of a closed file changed elsewhere: made again on theirs."""
        try:
            node = self.meta.node(inode, fresh=True)
        except ServerError:
            log.error("attribute change of inode %s lost: %s", inode, exc)
            return []
        ours = Attrs.from_doc(body["attrs"])
        attrs = node.attrs.evolve(mode=ours.mode, uid=ours.uid, gid=ours.gid, atime_ns=ours.atime_ns,
                                  mtime_ns=ours.mtime_ns, ctime_ns=ours.ctime_ns)
        attrs.xattrs = dict(ours.xattrs)
        attrs.version = node.version + 1
        self.meta.put_node(Node(inode, False, attrs.version, node.nlink, attrs))
        return [records.attrs(inode, node.version, attrs, body.get("at", attrs.ctime_ns))]


class ConflictSaver(Protocol):
    """(conflicts.py) Saves a refused version as a conflict copy."""

    def save_copy(self, body: dict, path: str | None, exc: ServerError) -> list[dict]:
        """The records that create the copy of the version in commit record ``body``."""
