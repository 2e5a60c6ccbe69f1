"""FUSE operations on names: mkdir, rmdir, mknod, symlink, readlink, link,
unlink, rename (with RENAME_NOREPLACE and RENAME_EXCHANGE) and readdir (mixed
into ZkfsOperations).

Every change of a folder's entries reaches the server in one transaction with
the folder's new sealed attributes (zkfs/ops.py); a file's ctime moves when one
of its names is linked, unlinked or renamed over."""
from __future__ import annotations

import errno
import stat
import time
from pathlib import Path
from uuid import UUID, uuid4

from ..errors import ServerError
from ..format import MAX_SYMLINK_BYTES, Attrs
from ..vault import Node, new_attrs
from .binding import fuse_get_context
from .guard import FsError, guarded
from .handles import DirHandle
from .namespace import inode_number
from .orphans import HIDDEN_PREFIX

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_RENAME_RETRIES = 3


def _no_change(attrs: Attrs) -> None:
    """(An attribute change that changes nothing but ctime.)"""


class NamespaceOps:
    @guarded
    def mkdir(self, path, mode):
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, stat.S_IFDIR | stat.S_IMODE(mode))
            self.writeback.apply([self.vault.op_create(parent.id, name, inode, attrs)])
            self.meta.set_entry(parent.id, name, Node(inode, True, 1, 2, attrs))
            self.meta.new_dir(inode)

    @guarded
    def rmdir(self, path):
        self._writable()
        with self.ns_lock:
            parent, name = self.meta.resolve_parent(path)
            node = self.meta.lookup(parent.id, name)
            if node is None:
                raise FsError(errno.ENOENT)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            self.writeback.apply([self.vault.op_rmdir(parent.id, name, node.id)])
            self.meta.set_entry(parent.id, name, None)
            self.meta.forget(node.id)

    @guarded
    def mknod(self, path, mode, dev):
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        self._make_node(path, fmt | stat.S_IMODE(mode), rdev=dev)

    @guarded
    def symlink(self, target, source):
        raw = source.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_SYMLINK_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        self._make_node(target, stat.S_IFLNK | 0o777, target=raw)

    @guarded
    def readlink(self, path):
        node = self._resolve(path)
        if not stat.S_ISLNK(node.attrs.mode):
            raise FsError(errno.EINVAL)
        return node.attrs.target.decode("utf-8", "surrogateescape")

    @guarded
    def link(self, target, source):
        self._writable()
        with self.ns_lock:
            node = self._resolve(source)
            if node.is_dir:
                raise FsError(errno.EPERM)
            parent, name = self.meta.resolve_parent(target)
            self._check_name(name)
            self._change_attrs(node, _no_change)           # ctime: one more name
            self.writeback.apply([self.vault.op_link(node.id, parent.id, name)])
            self.meta.forget(node.id)
            self.meta.set_entry(parent.id, name, self.meta.node(node.id))

    @guarded
    def unlink(self, path):
        self._writable()
        with self.ns_lock:
            if path in self.hidden:
                return self._unlink_hidden(path)
            parent, name = self.meta.resolve_parent(path)
            node = self.meta.lookup(parent.id, name)
            if node is None:
                raise FsError(errno.ENOENT)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            of = self.table.get(node.id)
            at = time.time_ns()
            if of is not None and of.pending is not None:
                self._touched_dir(parent, at)      # never reached the server: nothing to send
            else:
                if node.nlink > 1:
                    self._change_attrs(node, _no_change)   # ctime: a name less, others left
                elif of is None:
                    self.writeback.take_attrs(node.id)     # it goes: so do its unsent changes
                self.writeback.apply([self.vault.op_unlink(parent.id, name, node.id,
                                                           keep_orphan=of is not None, at_ns=at)])
            self.meta.set_entry(parent.id, name, None)
            self.meta.forget(node.id)
            if of is not None and node.nlink <= 1:
                of.unlinked = True

    @guarded
    def rename(self, old, new, flags=0):
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            return self._exchange(old, new)
        noreplace = bool(flags & RENAME_NOREPLACE)
        if Path(new).name.startswith(HIDDEN_PREFIX) and old not in self.hidden:
            with self.ns_lock:
                return self._hide(old, new)
        if old in self.hidden:
            raise FsError(errno.ENOENT)
        self._publish_before_replacing(old, new)
        for attempt in range(_RENAME_RETRIES):
            try:
                return self._rename(old, new, noreplace)
            except ServerError as exc:
                # Another mount changed a folder involved since this mount looked:
                # look again (a target that appeared is replaced, as rename does).
                if exc.code not in ("stale", "exists") or (exc.code == "exists" and noreplace) \
                        or attempt + 1 == _RENAME_RETRIES:
                    raise
                self._forget_parents(old, new)

    def _rename(self, old: str, new: str, noreplace: bool) -> None:
        with self.ns_lock:
            src_parent, src_name = self.meta.resolve_parent(old)
            dst_parent, dst_name = self.meta.resolve_parent(new)
            self._check_name(dst_name)
            node = self.meta.lookup(src_parent.id, src_name)
            if node is None:
                raise FsError(errno.ENOENT)
            target = self.meta.lookup(dst_parent.id, dst_name)
            if noreplace and (target is not None or self._unhide(dst_parent, dst_name)):
                raise FsError(errno.EEXIST)
            if target is not None and target.id == node.id:
                return                   # two names of one inode: POSIX says do nothing
            target_open = target is not None and self.table.get(target.id) is not None
            at = time.time_ns()
            op = self.vault.op_rename(node, src_parent.id, src_name, dst_parent.id, dst_name,
                                      replaces=target, keep_orphan=target_open, at_ns=at)
            self._change_attrs(node, _no_change)           # ctime of the renamed inode
            if target is not None and not target.is_dir and target.nlink > 1:
                self._change_attrs(target, _no_change)     # ctime: renamed over, other names left
            elif target is not None and not target_open:
                self.writeback.take_attrs(target.id)       # it goes with this rename: so do they
            if node.is_dir or self.table.get(node.id) is not None or target_open or \
                    (target is not None and target.is_dir):
                self.writeback.apply([op])
            else:
                # A closed file's rename is written back like its attributes.
                self.writeback.defer_rename(op, f"rename {old} -> {new}", (src_parent.id, dst_parent.id))
                self._touched_dir(src_parent, at)
                if dst_parent.id != src_parent.id:
                    self._touched_dir(dst_parent, at)
            self.meta.set_entry(src_parent.id, src_name, None)
            self.meta.set_entry(dst_parent.id, dst_name, node)
            self._moved({old: new}, node)
            if target is not None:
                self.meta.forget(target.id)
                if target_open and target.nlink <= 1:
                    self.table.get(target.id).unlinked = True

    def _exchange(self, old: str, new: str) -> None:
        """rename(2) with RENAME_EXCHANGE: both names exist and swap their inodes."""
        with self.ns_lock:
            a_parent, a_name = self.meta.resolve_parent(old)
            b_parent, b_name = self.meta.resolve_parent(new)
            self._check_name(b_name)
            a = self.meta.lookup(a_parent.id, a_name)
            b = self.meta.lookup(b_parent.id, b_name)
            if a is None or b is None:
                raise FsError(errno.ENOENT)
            if a.id == b.id:
                return
            for n in (a, b):
                self._change_attrs(n, _no_change)
            self.writeback.apply([self.vault.op_exchange(a, a_parent.id, a_name, b, b_parent.id, b_name)])
            self.meta.set_entry(a_parent.id, a_name, b)
            self.meta.set_entry(b_parent.id, b_name, a)
            self._moved({old: new, new: old}, a, b)

    def _moved(self, moves: dict[str, str], *nodes: Node) -> None:
        """Open files keep answering for their new paths (conflict copies go there),
        hidden ones too."""
        if any(n.is_dir for n in nodes):
            for old, new in moves.items():
                for hidden in [p for p in self.hidden if p.startswith(old + "/")]:
                    self.hidden[new + hidden[len(old):]] = self.hidden.pop(hidden)
        for of in self.table.files():
            for old, new in moves.items():
                p = of.last_path
                if p == old and of.id in {n.id for n in nodes}:
                    of.last_path = new
                    break
                if p and p.startswith(old + "/") and any(n.is_dir for n in nodes):
                    of.last_path = new + p[len(old):]
                    break

    def _forget_parents(self, *paths: str) -> None:
        with self.ns_lock:
            for path in paths:
                try:
                    self.meta.forget(self.meta.resolve_parent(path)[0].id)
                except OSError:
                    pass

    def _publish_before_replacing(self, old: str, new: str) -> None:
        """A file still being written, renamed over an existing one (a save without
        fsync): its content is committed first, as ext4 does, so a crash cannot leave
        the name with an empty new version instead of the old one."""
        of = self.table.get(self._resolve(old).id)
        if of is None or of.clean:
            return
        try:
            self._resolve(new)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # libfuse may have just hidden an open target: its unlink is unsent.
            parent, name = self.meta.resolve_parent(new)
            with self.ns_lock:
                if self.writeback.freed(parent.id, name) is None:
                    return                 # nothing to replace: nothing to lose
        self._commit(of, old, durable=True)

    @guarded
    def opendir(self, path):
        node = self._resolve(path)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        parent = self.meta.resolve_parent(path)[0].id if node.id != self.vault.root else node.id
        with self.ns_lock:
            return self.table.open_dir(DirHandle(node.id, parent, path))

    @guarded
    def releasedir(self, path, fh):
        with self.ns_lock:
            self.table.close_dir(fh)

    @guarded
    def readdir(self, path, fh):
        # A list, not a generator: mfusepy iterates outside this wrapper, where
        # an integrity error would surface as EINVAL instead of EIO.
        handle = self.table.dir(fh)
        folder, parent = handle.inode, handle.parent
        entries = self.meta.listdir(folder)
        self.meta.check_listing(folder)
        listed = {name for name, _ in entries}
        entries += [(of.pending.name, Node(of.id, False, 0, 1, of.attrs)) for of in self.table.files()
                    if of.pending is not None and of.pending.parent == folder and of.pending.name not in listed
                    and not of.unlinked]
        return [(name, {"st_mode": stat.S_IFDIR, "st_ino": inode_number(d)}, 0) for name, d in
                ((".", folder), ("..", parent))] + \
            [(name, {"st_mode": child.attrs.mode, "st_ino": inode_number(child.id)}, 0) for name, child in entries]

    # ------------------------------------------------------------ helpers
    def _new_entry(self, path: str, mode: int, **attrs) -> tuple[Node, str, Attrs, UUID]:
        """Parent, checked name, attributes (owned by the caller) and a fresh id for a
        new entry at ``path``."""
        parent, name = self.meta.resolve_parent(path)
        self._check_name(name)
        uid, gid, _ = fuse_get_context()
        if parent.attrs.mode & stat.S_ISGID:             # BSD group semantics of setgid dirs
            gid = parent.attrs.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return parent, name, new_attrs(mode, uid=uid, gid=gid, **attrs), uuid4()

    def _make_node(self, path: str, mode: int, *, rdev: int = 0, target: bytes = b"") -> Node:
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, mode, rdev=rdev, target=target)
            file_key = self.vault.new_file_key(inode)[1] if stat.S_ISREG(mode) else None
            self.writeback.apply([self.vault.op_create(parent.id, name, inode, attrs, file_key)])
            node = Node(inode, False, 1, 1, attrs)
            self.meta.set_entry(parent.id, name, node)
            return node

    def _touched_dir(self, d: Node, at_ns: int) -> None:
        """An entry change of folder ``d`` not sent yet (a new file, a written-back
        rename): its times show at once; the batch that sends the change seals
        these same times."""
        attrs = d.attrs.evolve(mtime_ns=at_ns, ctime_ns=max(d.attrs.ctime_ns, at_ns))
        self.meta.put_node(Node(d.id, True, d.version, d.nlink, attrs))
