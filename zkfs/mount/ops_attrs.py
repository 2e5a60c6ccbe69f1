"""FUSE operations on attributes: getattr, access, chmod, chown, utimens, the
xattr family and statfs (mixed into ZkfsOperations).

Attribute changes are journaled (writeback.py): an open file's go with its next
version, other inodes' as a record of their own, shown by the cache at once."""
from __future__ import annotations

import dataclasses

import errno
import os
import stat
import time

from ..errors import Unreachable
from ..format import MAX_NAME_BYTES, Attrs
from ..vault import Node
from .binding import fuse_get_context
from .guard import FsError, guarded
from .namespace import inode_number

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE, XATTR_REPLACE = 1, 2
MAX_XATTR_VALUE = 64 * 1024
_UNSET_ID = (-1, 0xFFFFFFFF)


class AttrOps:
    @guarded
    def getattr(self, path, fh=None):
        if fh is not None:
            of = self.table.handle(fh).file
            nlink = 0 if of.unlinked else self.meta.nlink(of.id)
            return self._stat(Node(of.id, False, of.base_version, nlink, of.attrs))
        return self._stat(self._resolve(path))

    @guarded
    def access(self, path, amode):
        node = self._resolve(path)
        if amode == os.F_OK:
            return 0
        uid, gid, _ = fuse_get_context()
        mode = node.attrs.mode
        if uid == 0:
            if amode & os.X_OK and not node.is_dir and not mode & 0o111:
                raise FsError(errno.EACCES)
            return 0
        shift = 6 if uid == node.attrs.uid else 3 if gid == node.attrs.gid else 0
        if (amode & 7) & ~((mode >> shift) & 7):
            raise FsError(errno.EACCES)
        return 0

    @guarded
    def chmod(self, path, mode, fh=None):
        def change(a: Attrs):
            a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(mode)
        self._setattr(path, change, fh)

    @guarded
    def chown(self, path, uid, gid, fh=None):
        def change(a: Attrs):
            if uid not in _UNSET_ID:
                a.uid = uid
            if gid not in _UNSET_ID:
                a.gid = gid
            if not stat.S_ISDIR(a.mode) and (uid not in _UNSET_ID or gid not in _UNSET_ID):
                # Linux clears set-user-ID (and set-group-ID if group-executable) on chown.
                a.mode &= ~stat.S_ISUID
                if a.mode & stat.S_IXGRP:
                    a.mode &= ~stat.S_ISGID
        self._setattr(path, change, fh)

    @guarded
    def utimens(self, path, times=None, fh=None):
        now = time.time_ns()
        atime, mtime = times if times else (UTIME_NOW, UTIME_NOW)

        def change(a: Attrs):
            if atime != UTIME_OMIT:
                a.atime_ns = now if atime == UTIME_NOW else atime
            if mtime != UTIME_OMIT:
                a.mtime_ns = now if mtime == UTIME_NOW else mtime
        self._setattr(path, change, fh)

    @staticmethod
    def _xattr_supported(name: str) -> None:
        # POSIX ACLs arrive as system.posix_acl_* xattrs; storing them opaquely
        # would make cp -a/rsync -A "set" modes that never reach st_mode.
        # Refusing them makes those tools fall back to chmod.
        # SELinux labels: FUSE mounts get theirs from policy, never from stored
        # xattrs. ls -l asks for one per file and, told "not supported" (rather
        # than "no such attribute"), stops asking for the rest of the mount: a
        # third of the upcalls in `ls -lR`.
        if name.startswith("system.") or name == "security.selinux":
            raise FsError(errno.EOPNOTSUPP)

    @guarded
    def setxattr(self, path, name, value, options, position=0):
        self._xattr_supported(name)
        if len(value) > MAX_XATTR_VALUE:
            raise FsError(errno.E2BIG)
        node = self._resolve(path)
        exists = name in self._attrs_of(node).xattrs
        if options & XATTR_CREATE and exists:
            raise FsError(errno.EEXIST)
        if options & XATTR_REPLACE and not exists:
            raise FsError(errno.ENODATA)

        def change(a: Attrs):
            a.xattrs[name] = bytes(value)
        self._setattr(path, change)

    @guarded
    def getxattr(self, path, name, position=0):
        self._xattr_supported(name)
        value = self._attrs_of(self._resolve(path)).xattrs.get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    @guarded
    def listxattr(self, path):
        return list(self._attrs_of(self._resolve(path)).xattrs)

    @guarded
    def removexattr(self, path, name):
        if name not in self._attrs_of(self._resolve(path)).xattrs:
            raise FsError(errno.ENODATA)
        self._setattr(path, lambda a: a.xattrs.pop(name, None))

    @guarded
    def statfs(self, path):
        """The account's quota as the server last said, less what the journal holds
        for it: with the server away, the last answer."""
        try:
            self._statfs = self.vault.api.statfs()
        except Unreachable:
            if self._statfs is None:
                raise
        s = self._statfs
        bsize = 4096
        waiting = self.writeback.uploader.snapshot().pending_bytes
        total = (s["used_bytes"] + s["free_bytes"]) // bsize
        free = max(0, s["free_bytes"] - waiting) // bsize
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": total, "f_bfree": free,
                "f_bavail": free, "f_files": 1 << 32, "f_ffree": (1 << 32) - 1,
                "f_favail": (1 << 32) - 1, "f_namemax": MAX_NAME_BYTES}

    # ------------------------------------------------------------ helpers
    def _stat(self, node: Node) -> dict:
        of = self.table.get(node.id)
        if of is not None and of.outdated_by(node):
            of = None                  # changed elsewhere: the next open() follows it
        if of is not None:
            a, size = of.attrs, of.size
        else:
            a, size = node.attrs, node.attrs.size
        return {
            "st_mode": a.mode, "st_ino": inode_number(node.id),
            "st_nlink": 0 if of is not None and of.unlinked else max(node.link_count, 1),
            "st_uid": a.uid, "st_gid": a.gid, "st_rdev": a.rdev, "st_size": size,
            "st_atime": a.atime_ns, "st_mtime": a.mtime_ns, "st_ctime": a.ctime_ns,
            "st_blocks": (size + 511) // 512, "st_blksize": 128 * 1024,
        }

    def _attrs_of(self, node: Node) -> Attrs:
        of = self.table.get(node.id)
        return of.attrs if of is not None else node.attrs

    def _setattr(self, path: str | None, change, fh: int | None = None) -> None:
        self._writable()
        with self.ns_lock:
            if fh is not None:
                self.table.handle(fh).file.touch_attrs(change)
                return
            node = self._resolve(path)
            self.vault.check_writable(node.id)       # /Shared, a read-only share: EACCES now
            self._change_attrs(node, change)

    def _change_attrs(self, node: Node, change) -> None:
        """(Under the namespace lock.) To whichever holds the inode's unsent changes."""
        of = self.table.get(node.id)
        if of is None:
            self.writeback.change_attrs(node, change)
            return
        if of.handles == 0 and of.sealed:
            # A closed file whose versions are all in the journal: a record of its own,
            # on the latest of them (the cache's node may be older).
            of.rebase(self.writeback.change_attrs(dataclasses.replace(of.base_node, nlink=node.nlink), change))
            return
        if of.outdated_by(node):
            of.rebase(node)              # changed elsewhere: change theirs
        of.touch_attrs(change)
