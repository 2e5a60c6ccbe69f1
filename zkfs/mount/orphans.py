"""Files unlinked while open. libfuse renames such a file to ``.fuse_hidden*``
(so fstat, fchmod and fgetxattr keep a path) and also does that to a rename's
open target just before the rename itself. Here that name is local only: on the
server the hiding is an unlink that keeps the inode (journaled before the rename
that caused it, and usually sent in one transaction with it), and the inode
lives on nameless, readable and writable through its descriptors, until the
last close deletes it. The server also deletes orphans a crashed mount
left behind, once they are old."""
from __future__ import annotations

import errno
import logging
import time
from uuid import UUID

from ..vault import Node
from . import records
from .guard import FsError
from .openfile import OpenFile

log = logging.getLogger("zkfs.mount.fs")

HIDDEN_PREFIX = ".fuse_hidden"


class Orphans:
    """(Mixed into ZkfsOperations; ``self.hidden``: hidden path -> node;
    ``self.hidden_names``: (parent, name) a hiding freed -> hidden path.)"""

    def _hide(self, old: str, new: str) -> None:
        """(Under the namespace lock.) libfuse hides open file ``old`` as ``new``."""
        parent, name = self.meta.resolve_parent(old)
        node = self.meta.lookup(parent.id, name)
        if node is None:
            raise FsError(errno.ENOENT)
        of = self.table.get(node.id)
        if of is None or of.handles == 0:
            # libfuse decided to hide it while its last release was on the way (it
            # counts that release only after ours returned) and will not remove the
            # hidden name: nothing holds it open, so this is a plain unlink.
            self.unlink(old)
            return
        at = time.time_ns()
        if of.pending is None:               # (a new file never reached the server: nothing to send)
            if node.nlink > 1:
                self._change_attrs(node, lambda a: None)       # ctime: a name less, others left
            self.writeback.record(records.unlink(parent.id, name, node.id, True, at))
        self._touched_dir(parent, at)
        self._name_gone(parent, name, node)
        node = Node(node.id, node.is_dir, node.version, node.nlink - 1, node.attrs)
        self.hidden[new] = node
        self.hidden_names[(parent.id, name)] = new
        if of is not None and node.nlink <= 0:
            of.unlinked = True

    def _unhide(self, parent: Node, name: str) -> bool:
        """(Under the namespace lock.) Undo the hiding of ``parent/name`` that libfuse
        did for a rename(RENAME_NOREPLACE) onto that open file, which must fail: the
        name stays. False if that name was not just hidden."""
        hidden_path = self.hidden_names.pop((parent.id, name), None)
        node = self.hidden.get(hidden_path) if hidden_path is not None else None
        if node is None or self.meta.lookup(parent.id, name) is not None:
            return False
        of = self.table.get(node.id)
        at = time.time_ns()
        if of is None or of.pending is None:
            self.writeback.record(records.link(node.id, parent.id, name, at))
        # libfuse keeps the descriptors under the hidden name: it stays an alias.
        self.hidden[hidden_path] = node = Node(node.id, node.is_dir, node.version, node.nlink + 1, node.attrs)
        self.meta.set_entry(parent.id, name, node)
        self.meta.put_local(node)                          # one link more
        self._touched_dir(parent, at)
        if of is not None:
            of.unlinked = False
        return True

    def _unlink_hidden(self, path: str) -> None:
        """libfuse's cleanup of a hidden name after the last close."""
        node = self.hidden.pop(path)
        for key in [k for k, p in self.hidden_names.items() if p == path]:
            del self.hidden_names[key]
        of = self.table.get(node.id)
        # Its last close may have come before libfuse hid it (close returns before
        # the kernel's release arrives): then its state waits here for the server.
        if node.nlink <= 0 and (of is None or of.handles == 0):
            if of is not None:
                self.table.drop(of)
            self._delete_orphan(node.id)

    def _drop_orphan(self, of: OpenFile) -> None:
        """The last descriptor of an unlinked file closed."""
        on_server = of.pending is None
        of.rebase(Node(of.id, False, of.base_version, 0, of.attrs))
        # Its hidden names go with it: libfuse removes one only if it saw the hiding
        # finish before this release, which is a race it can lose (then the inode
        # stayed on the server, nameless).
        with self.ns_lock:
            for path in [p for p, n in self.hidden.items() if n.id == of.id]:
                del self.hidden[path]
                for key in [k for k, p in self.hidden_names.items() if p == path]:
                    del self.hidden_names[key]
        if on_server:
            self._delete_orphan(of.id)

    def _delete_orphan(self, inode: UUID) -> None:
        """(After its unlink, in the journal.) The server refuses it if another name
        appeared meanwhile (another machine linked it): then it stays."""
        with self.ns_lock:
            self.writeback.record(records.delete(inode))
