"""FUSE operations on names: mkdir, rmdir, mknod, symlink, readlink, link,
unlink, rename (with RENAME_NOREPLACE and RENAME_EXCHANGE) and readdir (mixed
into ZkfsOperations).

Every change is a journal record first (writeback.py), shown by this mount's
cache at once; on the server, every change of a folder's entries lands in one
transaction with the folder's new sealed attributes (zkfs/ops.py). A file's ctime
moves when one of its names is linked, unlinked or renamed over."""
from __future__ import annotations

import dataclasses
import errno
import stat
import time
from pathlib import Path
from uuid import UUID, uuid4

from .. import crypto
from ..entryset import EntrySet
from ..format import MAX_SYMLINK_BYTES, Attrs
from ..vault import Node, new_attrs
from . import records
from .binding import fuse_get_context
from .guard import FsError, guarded
from .handles import DirHandle
from .namespace import inode_number
from .orphans import HIDDEN_PREFIX

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _no_change(attrs: Attrs) -> None:
    """(An attribute change that changes nothing but ctime.)"""


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is under ``folder`` (paths as FUSE gives them: canonical)."""
    return path.startswith(folder.rstrip("/") + "/")


class NamespaceOps:
    @guarded
    def mkdir(self, path, mode):
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, stat.S_IFDIR | stat.S_IMODE(mode))
            attrs.entries = EntrySet()
            at = attrs.ctime_ns
            self.writeback.record(records.create(parent.id, name, inode, attrs, None, at))
            self.meta.set_entry(parent.id, name, Node(inode, True, 1, 2, attrs))
            self.meta.new_dir(inode)
            self._touched_dir(parent, at, subdirs=1)

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
            if self.meta.listdir(node.id) or any(of.pending is not None and of.pending.parent == node.id
                                                 and not of.unlinked for of in self.table.files()):
                raise FsError(errno.ENOTEMPTY)
            at = time.time_ns()
            self.writeback.record(records.rmdir(parent.id, name, node.id, at))
            self.meta.set_entry(parent.id, name, None)
            self.meta.forget(node.id)
            self._touched_dir(parent, at, subdirs=-1)

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
            if self.meta.lookup(parent.id, name) is not None:
                raise FsError(errno.EEXIST)
            self._change_attrs(node, _no_change)           # ctime: one more name
            at = time.time_ns()
            self.writeback.record(records.link(node.id, parent.id, name, at))
            node = self._resolve(source)
            linked = Node(node.id, False, node.version, node.nlink + 1, node.attrs)
            self.meta.set_entry(parent.id, name, linked)
            self.meta.put_local(linked)                    # one link more
            self._touched_dir(parent, at)

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
            if node.nlink <= 1 and (of is None or of.handles == 0) and self.writeback.uploader.cancel_new(node.id):
                pass                               # created, changed and gone before the server saw it
            elif of is None or of.pending is None:   # (a new file never reached the server: nothing to send)
                if node.nlink > 1:
                    self._change_attrs(node, _no_change)   # ctime: a name less, others left
                # Kept as an orphan only while open: a closed file's state (its version
                # still on the way to the server) needs nothing more from the server.
                self.writeback.record(records.unlink(parent.id, name, node.id, of is not None and of.handles > 0, at))
            self._touched_dir(parent, at)
            self._name_gone(parent, name, node)
            if of is not None and node.nlink <= 1:
                of.unlinked = True

    def _name_gone(self, parent: Node, name: str, node: Node) -> None:
        """(Under the namespace lock.) The cache after ``node`` lost the name
        ``parent/name``: its other names stay, with one link less."""
        self.meta.set_entry(parent.id, name, None)
        self._one_link_less(node)

    def _one_link_less(self, node: Node) -> None:
        """(Under the namespace lock.) ``node`` lost one of its names."""
        if not node.is_dir and node.nlink > 1:
            current = self.meta.node(node.id)
            self.meta.put_local(dataclasses.replace(current, nlink=node.nlink - 1))
        else:
            self.meta.forget(node.id)

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
        self._seal_before_replacing(old, new)
        with self.ns_lock:
            self._rename(old, new, noreplace)

    def _rename(self, old: str, new: str, noreplace: bool) -> None:
        """(Under the namespace lock.)"""
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
        self._check_rename(old, new, node, target)
        target_of = self.table.get(target.id) if target is not None else None
        at = time.time_ns()
        self._change_attrs(node, _no_change)           # ctime of the renamed inode
        if target is not None and not target.is_dir and target.nlink > 1:
            self._change_attrs(target, _no_change)     # ctime: renamed over, other names left
        self.writeback.record(records.rename(node, src_parent.id, src_name, dst_parent.id, dst_name, target,
                                             target_of is not None and target_of.handles > 0, at))
        moved_dir = int(node.is_dir) * (src_parent.id != dst_parent.id)
        self._touched_dir(src_parent, at, subdirs=-moved_dir)
        if dst_parent.id != src_parent.id:
            self._touched_dir(self.meta.node(dst_parent.id), at,
                              subdirs=moved_dir - int(target is not None and target.is_dir))
        elif target is not None and target.is_dir:
            self._touched_dir(self.meta.node(src_parent.id), at, subdirs=-1)
        self.meta.set_entry(src_parent.id, src_name, None)
        self.meta.set_entry(dst_parent.id, dst_name, node)
        self._moved({old: new}, node)
        if target is not None:
            self._one_link_less(target)
            if target_of is not None and target.nlink <= 1:
                target_of.unlinked = True

    def _check_rename(self, old: str, new: str, node: Node, target: Node | None) -> None:
        """rename(2)'s refusals that depend on the two inodes and where it goes."""
        if target is not None:
            if node.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and self.meta.listdir(target.id):
                raise FsError(errno.ENOTEMPTY)
        if node.is_dir and _within(new, old):
            raise FsError(errno.EINVAL)                # into itself or a folder under it

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
            if (a.is_dir and _within(new, old)) or (b.is_dir and _within(old, new)):
                raise FsError(errno.EINVAL)
            for n in (a, b):
                self._change_attrs(n, _no_change)
            at = time.time_ns()
            self.writeback.record(records.exchange(a, a_parent.id, a_name, b, b_parent.id, b_name, at))
            if a_parent.id != b_parent.id and a.is_dir != b.is_dir:
                moved = 1 if a.is_dir else -1               # a's folder gets b, b's gets a
                self._touched_dir(a_parent, at, subdirs=-moved)
                self._touched_dir(self.meta.node(b_parent.id), at, subdirs=moved)
            else:
                self._touched_dir(a_parent, at)
                if b_parent.id != a_parent.id:
                    self._touched_dir(self.meta.node(b_parent.id), at)
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

    def _seal_before_replacing(self, old: str, new: str) -> None:
        """A file still being written, renamed over an existing one (a save without
        fsync): its content goes into the journal before the rename, as ext4 does,
        so a crash cannot leave the name with an empty new version instead of the
        old one."""
        of = self.table.get(self._resolve(old).id)
        if of is None or of.clean:
            return
        try:
            self._resolve(new)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # libfuse may have just hidden an open target.
            parent, name = self.meta.resolve_parent(new)
            if (parent.id, name) not in self.hidden_names:
                return                 # nothing to replace: nothing to lose
        self._commit(of, old)

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
            file_key = self.vault.new_file_key(inode, parent.id)[1] if stat.S_ISREG(mode) else None
            if file_key is not None:
                attrs.key_id = crypto.key_id(file_key)
            self.writeback.record(records.create(parent.id, name, inode, attrs, file_key, attrs.ctime_ns))
            node = Node(inode, False, 1, 1, attrs)
            self.meta.set_entry(parent.id, name, node)
            self._touched_dir(parent, attrs.ctime_ns)
            return node

    def _touched_dir(self, d: Node, at_ns: int, *, subdirs: int = 0) -> None:
        """An entry change of folder ``d`` (``subdirs``: folders it gains or loses): its
        times and link count show at once; the batch that sends the change seals
        these same times."""
        attrs = d.attrs.evolve(mtime_ns=at_ns, ctime_ns=max(d.attrs.ctime_ns, at_ns))
        if subdirs and attrs.entries is not None:
            attrs.entries = dataclasses.replace(attrs.entries, subdirs=max(0, attrs.entries.subdirs + subdirs))
        self.meta.put_local(Node(d.id, True, d.version, d.nlink + subdirs, attrs))
