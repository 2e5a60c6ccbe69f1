"""Files unlinked while open. libfuse renames such a file to ``.fuse_hidden*``
(so fstat, fchmod and fgetxattr keep a path) and also does that to a rename's
open target just before the rename itself. Here that name is local only: on the
server the unlink is written back like a rename (so an unlink and the rename
that caused it land in one transaction, and the name is never missing there),
and the inode lives on nameless, readable and writable through its descriptors,
until the last close deletes it. The server also deletes orphans a crashed mount
left behind, once they are old."""
from __future__ import annotations

import errno
import logging
import time
from uuid import UUID

from ..errors import ServerError
from ..vault import Node
from .guard import FsError
from .openfile import OpenFile

log = logging.getLogger("zkfs.mount.fs")

HIDDEN_PREFIX = ".fuse_hidden"


class Orphans:
    """(Mixed into ZkfsOperations; ``self.hidden``: hidden path -> node.)"""

    def _hide(self, old: str, new: str) -> None:
        """(Under the namespace lock.) libfuse hides open file ``old`` as ``new``."""
        parent, name = self.meta.resolve_parent(old)
        node = self.meta.lookup(parent.id, name)
        if node is None:
            raise FsError(errno.ENOENT)
        of = self.table.get(node.id)
        at = time.time_ns()
        if of is None or of.pending is None:  # (a new file never reached the server: nothing to send)
            self.writeback.defer_rename(
                self.vault.op_unlink(parent.id, name, node.id, keep_orphan=True, at_ns=at),
                f"unlink of open {old}", (parent.id, parent.id), frees=(parent.id, name))
            if node.nlink > 1:
                self._change_attrs(node, lambda a: None)       # ctime: a name less, others left
        self._touched_dir(parent, at)
        self.meta.set_entry(parent.id, name, None)
        self.meta.forget(node.id)
        node = Node(node.id, node.is_dir, node.version, node.nlink - 1, node.attrs)
        self.hidden[new] = node
        if of is not None and node.nlink <= 0:
            of.unlinked = True

    def _unhide(self, parent: Node, name: str) -> bool:
        """(Under the namespace lock.) Undo the hiding of ``parent/name`` that libfuse
        did for a rename(RENAME_NOREPLACE) onto that open file, which must fail: the
        name stays. False if that name was not just hidden."""
        freeing = self.writeback.freed(parent.id, name)
        if freeing is None:
            return False
        self.writeback.renames.remove(freeing)
        inode = UUID(freeing.op.wire["expect_inode"])
        for path, node in self.hidden.items():
            if node.id == inode:
                # libfuse keeps the descriptors under the hidden name: it stays an alias.
                self.hidden[path] = node = Node(node.id, node.is_dir, node.version, node.nlink + 1, node.attrs)
                self.meta.set_entry(parent.id, name, node)
                of = self.table.get(inode)
                if of is not None:
                    of.unlinked = False
                break
        return True

    def _unlink_hidden(self, path: str) -> None:
        """libfuse's cleanup of a hidden name after the last close."""
        node = self.hidden.pop(path)
        if node.nlink <= 0 and self.table.get(node.id) is None:
            self._delete_orphan(node.id)

    def _drop_orphan(self, of: OpenFile) -> None:
        """The last descriptor of an unlinked file closed."""
        on_server = of.pending is None
        of.rebase(Node(of.id, False, of.base_version, 0, of.attrs))
        if on_server:
            self._delete_orphan(of.id)

    def _delete_orphan(self, inode: UUID) -> None:
        try:
            self.writeback.apply([self.vault.op_delete_inode(inode)])   # after its written-back unlink
        except ServerError as exc:
            if exc.code not in ("in_use", "not_found"):   # in_use: another name appeared
                log.warning("could not delete orphan %s: %s", inode, exc)
