"""FUSE operations (fusepy, libfuse2 high-level API). Translates POSIX calls into
vault operations; it holds no cryptography and no wire format."""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import fuse

from .. import crypto
from ..errors import ServerError, TamperedError, ZkfsError
from ..format import MAX_NAME_BYTES, MAX_SYMLINK_BYTES, Attrs, Manifest, NameTooLong, encode_name
from ..vault import Node, Vault, new_attrs
from .blocks import BlockStore
from .cache import CiphertextCache, EncryptedSpool, PlainCache
from .namespace import FsError, MetaCache
from .openfile import ConflictError, MemoryBudget, OpenFile, PendingCreate

log = logging.getLogger(__name__)

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE, XATTR_REPLACE = 1, 2
MAX_XATTR_VALUE = 64 * 1024
_UNSET_ID = (-1, 0xFFFFFFFF)
WRITEBACK_DELAY = 0.5


@dataclass
class PendingAttrs:
    node: Node                 # as last seen on the server (CAS base)
    attrs: Attrs               # what we want
    changes: list              # the changes, to replay on a newer version after a conflict
    since: float


@dataclass
class PendingRename:
    op: dict
    what: str                  # "rename OLD -> NEW", for the log if the server refuses it
    parents: tuple[UUID, UUID]
    since: float
    frees: tuple[UUID, str] | None = None    # (parent, name) an unlink of an open file frees


def _errors(method):
    """Every operation: server/crypto failures become the right errno and a log line."""
    @functools.wraps(method)
    def wrapper(self, path, *args):
        try:
            return method(self, path, *args)
        except OSError:
            raise
        except TamperedError as exc:
            log.error("%s %s: integrity check failed: %s", method.__name__, path, exc)
            raise FsError(errno.EIO) from None
        except ServerError as exc:
            if exc.errno == errno.EIO or exc.code == "no_space":
                log.error("%s %s: server: %s", method.__name__, path, exc)
            raise FsError(exc.errno) from None
        except ZkfsError as exc:
            log.error("%s %s: %s", method.__name__, path, exc)
            raise FsError(exc.errno) from None
        except Exception:
            log.exception("%s %s failed", method.__name__, path)
            raise FsError(errno.EIO) from None
    return wrapper


def _process_of(tid: int) -> int | None:
    """The process (thread group id) of the thread FUSE names in a request."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def ino(inode: UUID) -> int:
    return (inode.int & 0x7FFF_FFFF_FFFF_FFFF) | 2


_pinned = threading.local()
_pins = threading.BoundedSemaphore(32)


class ZkfsOperations(fuse.Operations):
    use_ns = True

    def __call__(self, op, *args):
        # libfuse's worker threads call in through ctypes, which makes a Python
        # thread state for each call and destroys it after: a quarter of the
        # mount's time in `ls -lR`. One extra PyGILState_Ensure, never released,
        # keeps a worker's state for its lifetime. That state leaks when the worker
        # exits, and under parallel load libfuse starts and ends workers by the
        # hundred, so only the first 32 workers are pinned (the long-lived ones that
        # serve a single busy reader); the rest pay the per-call cost.
        if not getattr(_pinned, "done", False):
            _pinned.done = True
            if _pins.acquire(blocking=False):
                ctypes.pythonapi.PyGILState_Ensure()
        return super().__call__(op, *args)

    def __init__(self, vault: Vault, cache_dir: Path, cache_bytes: int, *, read_only: bool = False,
                 write_buffer_bytes: int = 64 << 20, poll_interval: float = 1.0):
        self.vault = vault
        self.read_only = read_only
        self.meta = MetaCache(vault)
        self.blocks = BlockStore(vault, CiphertextCache(cache_dir / "chunks", cache_bytes),
                                 PlainCache(16 << 20))
        self.spool = EncryptedSpool(cache_dir)
        self.budget = MemoryBudget(write_buffer_bytes)
        self.poll_interval = poll_interval
        self.ns_lock = threading.RLock()
        self.open_files: dict[UUID, OpenFile] = {}
        self.handles: dict[int, OpenFile] = {}
        self.openers: dict[int, int | None] = {}     # fh -> process (thread group) that opened it
        # Handles opened with O_APPEND: they write at their file's end. The kernel's
        # idea of it comes from the path, which another mount may have replaced.
        self.appending: set[int] = set()
        # Attribute changes of closed files not yet sent: they ride on the next
        # batch, or go out within WRITEBACK_DELAY (rsync's chown+chmod+utimens+rename
        # become one request).
        self.pending_attrs: dict[UUID, PendingAttrs] = {}
        # Renames of closed files (and unlinks of open ones, see _hide), written back
        # the same way, in order (rsync's temp-file rename rides on the next file's
        # commit). Any listing fetched from the server is preceded by sending them,
        # so the cache never loses one.
        self.pending_renames: list[PendingRename] = []
        self.meta.before_fetch = self._send_pending_renames
        self.meta.unsent_changes = lambda: bool(self.pending_renames)
        # libfuse renames a file that is unlinked while open to .fuse_hidden*, so
        # fstat/fchmod/ftruncate keep a path. Here that name is local only: on the
        # server the file is an orphan (no name) until its last close.
        self.hidden: dict[str, Node] = {}
        self._next_fh = 1
        self._stop = threading.Event()
        self._hostname = socket.gethostname()

    # ------------------------------------------------------------ lifecycle
    def init(self, path):
        self.meta.poll_changes()
        self.meta.start_poller(self.poll_interval, self._stop)
        self.meta.start_read_ahead(self._stop)
        threading.Thread(target=self._writeback, name="zkfs-writeback", daemon=True).start()

    def _writeback(self) -> None:
        """Sends attribute changes that waited WRITEBACK_DELAY, and retries closed
        files whose commit failed (server down, disk full): their data stays here
        until the server takes it, never a silent loss."""
        next_retry = next_ledger = 0.0
        while not self._stop.wait(0.1):
            if time.monotonic() >= next_ledger:      # versions seen by reads
                next_ledger = time.monotonic() + 1.0
                self.vault.ledger.flush()
            try:
                oldest = min([p.since for p in list(self.pending_attrs.values())]
                             + [r.since for r in self.pending_renames[:1]], default=None)
                if oldest is not None and time.monotonic() - oldest >= WRITEBACK_DELAY:
                    with self.ns_lock:
                        self._apply([])
            except Exception as exc:
                log.warning("attribute write-back failed (will retry): %s", exc)
            if time.monotonic() < next_retry:
                continue
            for of in [f for f in list(self.open_files.values()) if f.handles == 0]:
                try:
                    self._commit(of, None, background=True)
                except OSError:
                    next_retry = time.monotonic() + 5
                    continue
                with self.ns_lock:
                    if of.handles == 0 and not (of.meta_dirty or of.content_dirty or of.pending) \
                            and self.open_files.get(of.id) is of:    # not a newer open's state
                        del self.open_files[of.id]

    def destroy(self, path):
        self._stop.set()
        try:
            with self.ns_lock:
                self._apply([])
        except Exception as exc:
            log.error("unmount: could not save attribute changes: %s", exc)
        for of in list(self.open_files.values()):
            try:
                self._commit(of, None)
            except OSError:
                log.error("unmount: could not commit inode %s", of.id)
        self.blocks.close()
        self.spool.close()
        self.vault.ledger.close()

    # ------------------------------------------------------------ helpers
    def _resolve(self, path: str) -> Node:
        hidden = self.hidden.get(path)
        if hidden is not None:
            return hidden
        for of in list(self.open_files.values()):
            # An open (or not yet published) file's path resolves here: the kernel's
            # getxattr before each write must not depend on the server, and a new
            # file whose first commit failed must not vanish when a listing is refreshed.
            if (of.last_path == path and (of.handles or of.pending) and not of.clean
                    and not of.unlinked and self._still_named(of, path)):
                return Node(of.id, False, of.base_version, self.meta.nlink(of.id), of.attrs)
        return self.meta.resolve(path)

    def _still_named(self, of: OpenFile, path: str) -> bool:
        """Whether ``path`` still names this open file: an unlinked link, a renamed
        folder or a file renamed over it (here or elsewhere) frees the path, and
        writing there must not land in the open file."""
        if of.pending is not None:
            return True          # unknown to the server: only our own ops move it
        known, inode = self.meta.cached_inode(path)
        if not known:
            try:
                inode = self.meta.resolve(path).id
            except OSError:
                return False
            except ZkfsError:
                return True      # the server cannot say now: the open file answers for itself
        return inode == of.id

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    def _stat(self, node: Node) -> dict:
        of = self.open_files.get(node.id)
        if of is not None and of.outdated_by(node):
            of = None                  # changed elsewhere: the next open() follows it
        pending = self.pending_attrs.get(node.id)
        if of is not None:
            a, size = of.attrs, of.size
            atime, mtime, ctime = a.atime_ns, a.mtime_ns, a.ctime_ns
        elif pending is not None:
            a, size = pending.attrs, pending.attrs.size
            atime, mtime, ctime = a.atime_ns, a.mtime_ns, a.ctime_ns
        else:
            a, size = node.attrs, node.attrs.size
            atime, mtime, ctime = node.times
        return {
            "st_mode": a.mode, "st_ino": ino(node.id),
            "st_nlink": 0 if of is not None and of.unlinked else max(node.nlink, 1),
            "st_uid": a.uid, "st_gid": a.gid, "st_rdev": a.rdev, "st_size": size,
            "st_atime": atime, "st_mtime": mtime, "st_ctime": ctime,
            "st_blocks": (size + 511) // 512, "st_blksize": 128 * 1024,
        }

    def _check_name(self, name: str) -> None:
        try:
            encode_name(name)
        except NameTooLong:
            raise FsError(errno.ENAMETOOLONG) from None
        except ValueError:
            raise FsError(errno.EINVAL) from None

    def _apply(self, ops: list[dict], touched_dirs: list[Node] = (),
               nlink_delta: dict[UUID, int] | None = None) -> list[dict]:
        """Apply ops in one transaction, preceded by everything waiting: creates of
        new open files and pending attribute changes. Mirrors the effect on the
        touched directories in the cache (the server keeps directory mtimes)."""
        with self.ns_lock:
            creating = [of for of in self.open_files.values() if of.pending is not None and not of.unlinked]
            waiting = list(self.pending_attrs.items())
            moving = list(self.pending_renames)
            # Renames first: a file created since may reuse a name one of them frees
            # (git's config.lock), and none of them can depend on a pending create
            # (renames onto an open file are not deferred).
            prefix = [r.op for r in moving]
            prefix += [of.create_op() for of in creating]
            prefix += [self.vault.op_setmeta(i, p.node.version, p.attrs.evolve()) for i, p in waiting]
            if not prefix:
                results = self.vault.apply(ops) if ops else []
            else:
                try:
                    results = self.vault.apply(prefix + ops)
                except ServerError:
                    if not ops:
                        self._flush_one_by_one(creating, waiting, moving)
                        return []
                    # Which op failed is unknown: settle the prefix on its own (it
                    # resolves its conflicts), then let the caller's ops fail or not.
                    self._flush_one_by_one(creating, waiting, moving)
                    results = self.vault.apply(ops)
                else:
                    del self.pending_renames[:len(moving)]
                    self._prefix_done(creating, waiting, results[len(moving):len(prefix)])
                    results = results[len(prefix):]
            for d in {d.id: d for d in touched_dirs}.values():
                self._touched_dir(d, (nlink_delta or {}).get(d.id, 0))
            return results

    def _create_or_rename(self, of: OpenFile) -> None:
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
            of.pending.name = self._conflict_name(taken)
            self.vault.apply([of.create_op()])
            log.warning("conflict: %s was created elsewhere too; this one was saved as %s",
                        taken, of.pending.name)
        self._published(of)

    def _published(self, of: OpenFile) -> None:
        """A new file's create went through: the cache learns its entry."""
        parent, name = of.pending.parent, of.pending.name
        of.created()
        self.meta.set_entry(parent, name, Node(of.id, False, 1, 1, of.attrs.evolve(size=0, manifest_digest=None)))

    def _prefix_done(self, creating: list[OpenFile], waiting: list, results: list[dict]) -> None:
        for of in creating:
            self._published(of)
        for (inode, p), res in zip(waiting, results[len(creating):]):
            if self.pending_attrs.get(inode) is p:
                del self.pending_attrs[inode]
            self.meta.put_node(Node(inode, p.node.is_dir, res["version"], p.node.nlink,
                                    p.attrs.evolve(version=res["version"])))
            of = self.open_files.get(inode)
            if of is not None and of.base_version == p.node.version:
                of.base_version = res["version"]

    def _send_pending_renames(self) -> None:
        if self.pending_renames:
            with self.ns_lock:
                self._apply([])

    def _flush_one_by_one(self, creating: list[OpenFile], waiting: list, moving: list[PendingRename]) -> None:
        for r in moving:
            try:
                self.vault.apply([r.op])
            except ServerError as exc:
                # Refused (changed elsewhere meanwhile): the server's names stand.
                log.error("%s could not be saved on the server: %s", r.what, exc)
                for d in r.parents:
                    self.meta.forget(d)
            self.pending_renames.remove(r)
        for of in creating:
            if of.pending is not None:
                self._create_or_rename(of)
        for inode, p in waiting:
            for attempt in range(3):
                try:
                    res = self.vault.apply([self.vault.op_setmeta(inode, p.node.version, p.attrs.evolve())])[0]
                except ServerError as exc:
                    if exc.code == "conflict" and attempt < 2:
                        # Changed elsewhere meanwhile: replay our changes on theirs.
                        p.node = self.meta.node(inode, fresh=True)
                        p.attrs = p.node.attrs.evolve()
                        for change in p.changes:
                            change(p.attrs)
                        continue
                    log.error("attribute change of inode %s lost: %s", inode, exc)
                    self.pending_attrs.pop(inode, None)
                    self.meta.forget(inode)
                    break
                self._prefix_done([], [(inode, p)], [res])
                break

    def _open_file(self, node: Node) -> OpenFile:
        """(Under the namespace lock.) The one state of this file on this mount."""
        of = self.open_files.get(node.id)
        if of is None:
            of = OpenFile(self.vault, self.blocks, self.spool, self.budget, node,
                          self.vault.file_cipher(node.id, node.attrs.key_id), None)
            p = self.pending_attrs.pop(node.id, None)
            if p is not None:                 # the open file carries them from now on
                of.take_over_attrs(p.node.version, p.attrs, p.changes)
            self.open_files[node.id] = of
        elif of.outdated_by(node):
            of.rebase(node)        # close-to-open, also while other handles hold it
        return of

    def _new_handle(self, of: OpenFile, path: str) -> int:
        of.last_path = path
        opener = _process_of(fuse.fuse_get_context()[2])
        with self.ns_lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = of
            self.openers[fh] = opener
            of.handles += 1
            return fh

    def _commit(self, of: OpenFile, path: str | None, *, durable: bool = False,
                background: bool = False) -> None:
        if of.unlinked:
            return                       # nobody can see it any more: nothing to publish
        if of.write_failed:
            # A write() already failed: publishing the rest would make a torn version
            # visible. The previous version stays; close() and fsync() say so too.
            if of.handles > 0:
                raise FsError(errno.EIO)
            log.error("%s: a write failed, so these changes are not published", path or of.last_path)
            if of.pending is not None:      # never reached the server: the new file goes
                self.meta.set_entry(of.pending.parent, of.pending.name, None)
                of.unlinked = True
            else:                           # back to what the server has, refetched
                self.meta.forget(of.id)
                of.rebase(self.meta.node(of.id))
            of.write_failed = False
            return
        path = of.last_path = path or of.last_path
        if not durable:
            with of.lock:
                if not (of.content_dirty or of.pending):
                    if of.meta_dirty:
                        self._defer_attrs(of)
                    return
        try:
            with of.lock:     # the conflict copy is a snapshot of exactly what failed to commit
                try:
                    node = of.commit(self._apply, only_if_closed=background)
                except ConflictError:
                    self._save_conflict_copy(of, path)
                    return
        except ZkfsError as exc:
            log.error("commit of %s failed (data kept for retry): %s", path or of.id, exc)
            raise FsError(errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO) from None
        if node is not None:
            node.nlink = self.meta.nlink(node.id)
            self.meta.put_node(node)

    def _conflict_name(self, name: str) -> str:
        """NAME (conflict DATE TIME HOST XXXX).EXT: clear to a person, unique
        across mounts of one host within the same second."""
        stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
        tag = f" (conflict {time.strftime('%Y-%m-%d %H%M%S')} {self._hostname} {os.urandom(2).hex()})"
        budget = MAX_NAME_BYTES - len((tag + dot + ext).encode())
        stem = stem.encode()[:max(budget, 1)].decode(errors="ignore")
        return f"{stem}{tag}{dot}{ext}"

    def _save_conflict_copy(self, of: OpenFile, path: str | None) -> None:
        """Someone else committed this file first: keep both. Theirs stays under the
        name; ours becomes a clearly named sibling, created atomically with its content."""
        try:
            parent, name = self.meta.resolve_parent(path) if path else (self.meta.node(self.vault.root), str(of.id))
        except OSError:
            parent, name = self.meta.node(self.vault.root), Path(path or str(of.id)).name
        copy_name = self._conflict_name(name)
        new_id = uuid4()
        cipher, file_key = self.vault.new_file_key(new_id)
        attrs = of.attrs.evolve(size=0, manifest_digest=None)
        copy = OpenFile(self.vault, self.blocks, self.spool, self.budget, Node(new_id, False, 0, 1, attrs),
                        cipher, Manifest(new_id), PendingCreate(parent.id, copy_name, file_key))
        offset = 0
        for chunk in of.snapshot_chunks():
            copy.write(offset, chunk)
            offset += len(chunk)
        copy.attrs = of.attrs.evolve(size=offset, key_id=crypto.key_id(file_key))
        with self.ns_lock:
            self.open_files[new_id] = copy
        try:
            copy.commit(self._apply)
        finally:
            with self.ns_lock:
                self.open_files.pop(new_id, None)
        self.meta.forget(parent.id)
        log.warning("conflict: %s changed elsewhere; this version was saved as %s", path or of.id, copy_name)
        try:
            of.rebase(self.vault.get(of.id))
        except ServerError:
            of.unlinked = True           # deleted elsewhere: our version lives on in the copy

    def _defer_attrs(self, of: OpenFile) -> None:
        """(Under ``of.lock``.) Attribute changes are all that is left to send: once no
        handle is left, the file's state hands them to the write-back, like a closed
        file's chmod, and leaves. While a handle is open they stay with the file (its
        last close carries them): one holder of an inode's changes, never two."""
        with self.ns_lock:
            if of.handles > 0 or self.open_files.get(of.id) is not of:
                return
            base_version, attrs, changes = of.take_attr_changes()
            del self.open_files[of.id]
            self.pending_attrs[of.id] = PendingAttrs(
                Node(of.id, False, base_version, self.meta.nlink(of.id), attrs), attrs, changes, time.monotonic())

    def _setattr(self, path: str, change, fh: int | None = None) -> None:
        """Attribute changes are written back: an open file commits them with its
        content; a closed node's go out with the next batch or within WRITEBACK_DELAY."""
        self._writable()
        with self.ns_lock:
            of = self.handles.get(fh) if fh else None
            node = None if of else self._resolve(path)
            of = of or self.open_files.get(node.id)
            if of is not None:
                of.touch_attrs(change)
                return
            p = self.pending_attrs.get(node.id)
            if p is None:
                p = self.pending_attrs[node.id] = PendingAttrs(node, node.attrs.evolve(), [], time.monotonic())
            change(p.attrs)
            p.attrs.ctime_ns = time.time_ns()
            p.changes.append(change)

    # ------------------------------------------------------------ attributes
    @_errors
    def getattr(self, path, fh=None):
        of = self.handles.get(fh) if fh else None
        if of is not None:
            nlink = 0 if of.unlinked else self.meta.nlink(of.id)
            return self._stat(Node(of.id, False, of.base_version, nlink, of.attrs))
        return self._stat(self._resolve(path))

    @_errors
    def readdir(self, path, fh):
        # A list, not a generator: fusepy iterates outside this wrapper, where
        # an integrity error would surface as EINVAL instead of EIO.
        node = self._resolve(path)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        entries = self.meta.listdir(node.id)
        self.meta.check_listing(node.id)
        listed = {name for name, _ in entries}
        entries += [(of.pending.name, Node(of.id, False, 0, 1, of.attrs)) for of in list(self.open_files.values())
                    if of.pending is not None and of.pending.parent == node.id and of.pending.name not in listed
                    and not of.unlinked]
        return [".", ".."] + [(name, {"st_mode": child.attrs.mode, "st_ino": ino(child.id)}, 0)
                              for name, child in entries]

    @_errors
    def access(self, path, amode):
        node = self._resolve(path)
        if amode == os.F_OK:
            return 0
        uid, gid, _ = fuse.fuse_get_context()
        mode = node.attrs.mode
        if uid == 0:
            if amode & os.X_OK and not node.is_dir and not mode & 0o111:
                raise FsError(errno.EACCES)
            return 0
        shift = 6 if uid == node.attrs.uid else 3 if gid == node.attrs.gid else 0
        if (amode & 7) & ~((mode >> shift) & 7):
            raise FsError(errno.EACCES)
        return 0

    @_errors
    def chmod(self, path, mode):
        def change(a: Attrs):
            a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(mode)
        self._setattr(path, change)

    @_errors
    def chown(self, path, uid, gid):
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
        self._setattr(path, change)

    @_errors
    def utimens(self, path, times=None):
        now = time.time_ns()
        atime, mtime = times if times else (UTIME_NOW, UTIME_NOW)

        def change(a: Attrs):
            if atime != UTIME_OMIT:
                a.atime_ns = now if atime == UTIME_NOW else atime
            if mtime != UTIME_OMIT:
                a.mtime_ns = now if mtime == UTIME_NOW else mtime
        self._setattr(path, change)

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

    @_errors
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

    @_errors
    def getxattr(self, path, name, position=0):
        self._xattr_supported(name)
        value = self._attrs_of(self._resolve(path)).xattrs.get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    @_errors
    def listxattr(self, path):
        return list(self._attrs_of(self._resolve(path)).xattrs)

    @_errors
    def removexattr(self, path, name):
        if name not in self._attrs_of(self._resolve(path)).xattrs:
            raise FsError(errno.ENODATA)
        self._setattr(path, lambda a: a.xattrs.pop(name, None))

    def _attrs_of(self, node: Node) -> Attrs:
        of = self.open_files.get(node.id)
        if of is not None:
            return of.attrs
        pending = self.pending_attrs.get(node.id)
        return pending.attrs if pending is not None else node.attrs

    @_errors
    def statfs(self, path):
        s = self.vault.api.statfs()
        bsize = 4096
        total = (s["used_bytes"] + s["free_bytes"]) // bsize
        free = s["free_bytes"] // bsize
        return {"f_bsize": bsize, "f_frsize": bsize, "f_blocks": total, "f_bfree": free,
                "f_bavail": free, "f_files": 1 << 32, "f_ffree": (1 << 32) - 1,
                "f_favail": (1 << 32) - 1, "f_namemax": MAX_NAME_BYTES}

    # ------------------------------------------------------------ namespace
    @_errors
    def mkdir(self, path, mode):
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, stat.S_IFDIR | stat.S_IMODE(mode))
            self._apply([self.vault.op_create(parent.id, name, inode, attrs)], [parent], {parent.id: 1})
            self.meta.set_entry(parent.id, name, Node(inode, True, 1, 2, attrs))
            self.meta.new_dir(inode)

    def _new_entry(self, path: str, mode: int, **attrs) -> tuple[Node, str, Attrs, UUID]:
        """Parent, checked name, attributes (owned by the caller) and a fresh id for a
        new entry at ``path``."""
        parent, name = self.meta.resolve_parent(path)
        self._check_name(name)
        uid, gid, _ = fuse.fuse_get_context()
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
            self._apply([self.vault.op_create(parent.id, name, inode, attrs, file_key)], [parent])
            node = Node(inode, False, 1, 1, attrs)
            self.meta.set_entry(parent.id, name, node)
            return node

    @_errors
    def create(self, path, mode, fi=None):
        """The file exists here at once; on the server it appears with its first
        commit (close, fsync) or with any earlier batch: one request, not two."""
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, stat.S_IFREG | stat.S_IMODE(mode))
            cipher, file_key = self.vault.new_file_key(inode)
            node = Node(inode, False, 0, 1, attrs)
            of = OpenFile(self.vault, self.blocks, self.spool, self.budget, node, cipher,
                          Manifest(inode), PendingCreate(parent.id, name, file_key))
            self.open_files[inode] = of
            self.meta.set_entry(parent.id, name, node)
            self._touched_dir(parent)
            return self._new_handle(of, path)

    def _touched_dir(self, d: Node, nlink_delta: int = 0) -> None:
        self.meta.put_node(Node(d.id, True, d.version, d.nlink + nlink_delta, d.attrs,
                                entries_mtime_ns=time.time_ns()))

    @_errors
    def mknod(self, path, mode, dev):
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        self._make_node(path, fmt | stat.S_IMODE(mode), rdev=dev)

    @_errors
    def symlink(self, target, source):
        raw = source.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_SYMLINK_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        self._make_node(target, stat.S_IFLNK | 0o777, target=raw)

    @_errors
    def readlink(self, path):
        node = self._resolve(path)
        if not stat.S_ISLNK(node.attrs.mode):
            raise FsError(errno.EINVAL)
        return node.attrs.target.decode("utf-8", "surrogateescape")

    @_errors
    def link(self, target, source):
        self._writable()
        with self.ns_lock:
            node = self._resolve(source)
            if node.is_dir:
                raise FsError(errno.EPERM)
            parent, name = self.meta.resolve_parent(target)
            self._check_name(name)
            self._apply([self.vault.op_link(node.id, parent.id, name)], [parent])
            self.meta.forget(node.id)
            self.meta.set_entry(parent.id, name, self.meta.node(node.id))

    def _hide(self, old: str, new: str) -> None:
        """The unlink of a file that is still open: the name goes on the server
        (the inode stays, nameless, until the last close); ``new`` stays local.
        libfuse also hides a rename's open target this way, just before the rename
        itself: the unlink is written back like a rename, so both reach the server
        in one transaction and the name is never missing there."""
        parent, name = self.meta.resolve_parent(old)
        node = self.meta.lookup(parent.id, name)
        if node is None:
            raise FsError(errno.ENOENT)
        of = self.open_files.get(node.id)
        if of is None or of.pending is None:  # (a new file never reached the server: nothing to send)
            self.pending_renames.append(PendingRename(
                self.vault.op_unlink(parent.id, name, keep_orphan=True, expect=node.id),
                f"unlink of open {old}", (parent.id, parent.id), time.monotonic(), frees=(parent.id, name)))
        self._touched_dir(parent)
        self.meta.set_entry(parent.id, name, None)
        self.meta.forget(node.id)
        node = Node(node.id, node.is_dir, node.version, node.nlink - 1, node.attrs)
        self.hidden[new] = node
        if of is not None and node.nlink <= 0:
            of.unlinked = True

    @_errors
    def unlink(self, path):
        self._writable()
        with self.ns_lock:
            if path in self.hidden:           # libfuse's cleanup after the last close
                node = self.hidden.pop(path)
                if node.nlink <= 0 and node.id not in self.open_files:
                    self._delete_orphan(node.id)
                return
            parent, name = self.meta.resolve_parent(path)
            node = self.meta.lookup(parent.id, name)
            if node is None:
                raise FsError(errno.ENOENT)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            of = self.open_files.get(node.id)
            self._apply([self.vault.op_unlink(parent.id, name, keep_orphan=of is not None, expect=node.id)], [parent])
            self.meta.set_entry(parent.id, name, None)
            self.meta.forget(node.id)
            if of is not None and node.nlink <= 1:
                of.unlinked = True

    @_errors
    def rmdir(self, path):
        self._writable()
        with self.ns_lock:
            parent, name = self.meta.resolve_parent(path)
            node = self.meta.lookup(parent.id, name)
            if node is None:
                raise FsError(errno.ENOENT)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            self._apply([self.vault.op_rmdir(parent.id, name)], [parent], {parent.id: -1})
            self.meta.set_entry(parent.id, name, None)
            self.meta.forget(node.id)

    @_errors
    def rename(self, old, new):
        self._writable()
        self._publish_before_replacing(old, new)
        with self.ns_lock:
            if Path(new).name.startswith(".fuse_hidden") and old not in self.hidden:
                return self._hide(old, new)
            if old in self.hidden:
                raise FsError(errno.ENOENT)
            src_parent, src_name = self.meta.resolve_parent(old)
            dst_parent, dst_name = self.meta.resolve_parent(new)
            self._check_name(dst_name)
            node = self.meta.lookup(src_parent.id, src_name)
            if node is None:
                raise FsError(errno.ENOENT)
            target = self.meta.lookup(dst_parent.id, dst_name)
            if target is not None and target.id == node.id:
                return                   # two names of one inode: POSIX says do nothing
            target_open = target is not None and target.id in self.open_files
            delta = {}
            if node.is_dir and src_parent.id != dst_parent.id:
                delta = {src_parent.id: -1, dst_parent.id: 1}
            if target is not None and target.is_dir:
                delta[dst_parent.id] = delta.get(dst_parent.id, 0) - 1
            op = self.vault.op_rename(node.id, src_parent.id, src_name, dst_parent.id, dst_name,
                                      keep_orphan=target_open)
            if node.is_dir or node.id in self.open_files or target_open or (target is not None and target.is_dir):
                self._apply([op], [src_parent, dst_parent], delta)
            else:
                # A closed file's rename is written back like its attributes.
                self.pending_renames.append(PendingRename(op, f"rename {old} -> {new}", (src_parent.id, dst_parent.id),
                                                          time.monotonic()))
                for d in {src_parent.id: src_parent, dst_parent.id: dst_parent}.values():
                    self._touched_dir(d)
            self.meta.set_entry(src_parent.id, src_name, None)
            self.meta.set_entry(dst_parent.id, dst_name, node)
            if node.id in self.open_files:
                self.open_files[node.id].last_path = new
            if node.is_dir:
                for of in self.open_files.values():
                    if of.last_path and of.last_path.startswith(old + "/"):
                        of.last_path = new + of.last_path[len(old):]
                for hidden in [p for p in self.hidden if p.startswith(old + "/")]:
                    self.hidden[new + hidden[len(old):]] = self.hidden.pop(hidden)
            if target is not None and target.id != node.id:
                self.meta.forget(target.id)
                if target_open and target.nlink <= 1:
                    self.open_files[target.id].unlinked = True

    def _publish_before_replacing(self, old: str, new: str) -> None:
        """A file still being written, renamed over an existing one (a save without
        fsync): its content is committed first, as ext4 does, so a crash cannot leave
        the name with an empty new version instead of the old one."""
        if old in self.hidden or Path(new).name.startswith(".fuse_hidden"):
            return
        of = self.open_files.get(self._resolve(old).id)
        if of is None or of.clean:
            return
        try:
            self._resolve(new)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # libfuse may have just moved an open target aside: its unlink is unsent.
            parent, name = self.meta.resolve_parent(new)
            if (parent.id, name) not in self._freed_names():
                return                 # nothing to replace: nothing to lose
        self._commit(of, old, durable=True)

    def _freed_names(self) -> set[tuple[UUID, str]]:
        with self.ns_lock:
            return {r.frees for r in self.pending_renames if r.frees}

    # ------------------------------------------------------------ files
    @_errors
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._writable()
        with self.ns_lock:
            # The cache is close-to-open fresh: the change feed drops whatever another
            # client changed, within a second.
            node = self._resolve(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            of = self._open_file(node)
            fh = self._new_handle(of, path)
            if flags & os.O_APPEND:
                self.appending.add(fh)
        if flags & os.O_TRUNC:
            # atomic_o_trunc: the old version stays on the server until this
            # handle's first commit replaces it with the new content, whole.
            of.truncate(0)
        return fh

    @_errors
    def read(self, path, size, offset, fh):
        return self.handles[fh].read(offset, size)

    @_errors
    def write(self, path, data, offset, fh):
        of = self.handles[fh]
        try:
            return of.write(offset, data, append=fh in self.appending)
        except OSError as exc:
            if exc.errno != errno.EFBIG:       # EFBIG: refused before anything changed
                of.write_failed = True
            raise
        except BaseException:
            of.write_failed = True    # the writer knows its data is incomplete
            raise

    @_errors
    def truncate(self, path, length, fh=None):
        self._writable()
        of = self.handles.get(fh) if fh else None
        if of is not None:
            of.truncate(length)
            return
        with self.ns_lock:
            node = self._resolve(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            fh = self._new_handle(self._open_file(node), path)
        try:
            self.handles[fh].truncate(length)
            self._commit(self.handles[fh], path)
        finally:
            self.release(path, fh)

    @_errors
    def flush(self, path, fh):
        # Every close(2) of every copy of the descriptor flushes, including a forked
        # child's inherited copy closed at exec: committing then would publish
        # whatever the opener has written so far. Only the opening process's close
        # commits (close-to-open for it); the last close (release) commits anyway.
        if _process_of(fuse.fuse_get_context()[2]) == self.openers.get(fh):
            self._commit(self.handles[fh], path)

    @_errors
    def fsync(self, path, datasync, fh):
        self._commit(self.handles[fh], path, durable=True)
        with self.ns_lock:
            self._apply([])

    @_errors
    def fsyncdir(self, path, datasync, fh):
        with self.ns_lock:
            self._apply([])

    @_errors
    def release(self, path, fh):
        with self.ns_lock:
            of = self.handles.pop(fh)
            self.openers.pop(fh, None)
            self.appending.discard(fh)
            of.handles -= 1
            if of.handles > 0:
                return
        orphan = False
        try:
            self._commit(of, path)
        finally:
            with self.ns_lock:
                if of.handles == 0 and self.open_files.get(of.id) is of:
                    if not (of.meta_dirty or of.content_dirty or of.pending) or of.unlinked:
                        del self.open_files[of.id]
                        orphan = of.unlinked
        if orphan:
            self._drop_orphan(of)

    def _drop_orphan(self, of: OpenFile) -> None:
        on_server = of.pending is None
        of.rebase(Node(of.id, False, of.base_version, 0, of.attrs))
        if on_server:
            self._delete_orphan(of.id)

    def _delete_orphan(self, inode: UUID) -> None:
        try:
            with self.ns_lock:        # after its written-back unlink, in one transaction
                self._apply([self.vault.op_delete_inode(inode)])
        except ServerError as exc:
            if exc.code not in ("in_use", "not_found"):   # in_use: another name appeared
                log.warning("could not delete orphan %s: %s", inode, exc)
