"""FUSE operations on file content: create, open, read, write, truncate, flush,
fsync and release (mixed into ZkfsOperations).

The opener's close() returns once the new version is in the write-back journal
on disk (writeback.py); fsync() (and every close with ``--sync``) once the server
has it. Every descriptor of a file on this mount shares its one ``OpenFile``
(handles.py)."""
from __future__ import annotations

import errno
import logging
import os
import stat
import time

from ..errors import ZkfsError
from ..format import Manifest
from ..vault import Node
from .binding import fuse_get_context
from .guard import FsError, guarded
from .openfile import OpenFile, PendingCreate

log = logging.getLogger("zkfs.mount.fs")


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


class FileOps:
    @guarded
    def create(self, path, mode, flags=0):
        """The file exists here at once; on the server it appears with its first
        commit (close, fsync) or with any earlier batch: one request, not two."""
        self._writable()
        with self.ns_lock:
            parent, name, attrs, inode = self._new_entry(path, stat.S_IFREG | stat.S_IMODE(mode))
            cipher, file_key = self.vault.new_file_key(inode, parent.id)
            node = Node(inode, False, 0, 1, attrs)
            at = time.time_ns()
            of = OpenFile(self.vault, self.blocks, self.spool, self.budget, node, cipher,
                          Manifest(inode), PendingCreate(parent.id, name, file_key, at))
            self.table.add(of)
            self.meta.set_entry(parent.id, name, node)
            self._touched_dir(parent, at)
            return self._new_handle(of, path, append=bool(flags & os.O_APPEND))

    @guarded
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._writable()
        with self.ns_lock:
            # The cache is close-to-open fresh: the change feed drops whatever another
            # client changed, within a second.
            node = self._resolve(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if flags & (os.O_WRONLY | os.O_RDWR):
                node = self._before_write(node)
            of = self._open_file(node)
            fh = self._new_handle(of, path, append=bool(flags & os.O_APPEND))
        if flags & os.O_TRUNC:
            # atomic_o_trunc: the old version stays on the server until this
            # handle's first commit replaces it with the new content, whole.
            of.truncate(0)
        return fh

    @guarded
    def read(self, path, size, offset, fh):
        return self.table.handle(fh).file.read(offset, size)

    @guarded
    def write(self, path, data, offset, fh):
        h = self.table.handle(fh)
        try:
            return h.file.write(offset, data, append=h.append)
        except OSError as exc:
            if exc.errno != errno.EFBIG:       # EFBIG: refused before anything changed
                h.file.write_failed = True
            raise
        except BaseException:
            h.file.write_failed = True    # the writer knows its data is incomplete
            raise

    @guarded
    def truncate(self, path, length, fh=None):
        self._writable()
        if fh is not None:
            self.table.handle(fh).file.truncate(length)
            return
        with self.ns_lock:
            node = self._resolve(path)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            fh = self._new_handle(self._open_file(self._before_write(node)), path)
        try:
            of = self.table.handle(fh).file
            of.truncate(length)
            self._commit(of, path)
        finally:
            self.release(path, fh)

    @guarded
    def flush(self, path, fh):
        # Every close(2) of every copy of the descriptor flushes, including a forked
        # child's inherited copy closed at exec: committing then would publish
        # whatever the opener has written so far. Only the opening process's close
        # commits (close-to-open for it); the last close (release) commits anyway.
        h = self.table.handle(fh)
        if _process_of(fuse_get_context()[2]) == h.opener:
            self._commit(h.file, path)

    @guarded
    def fsync(self, path, datasync, fh):
        self._commit(self.table.handle(fh).file, path, durable=True)
        self._flush_namespace()

    @guarded
    def fsyncdir(self, path, datasync, fh):
        self._flush_namespace()

    def _flush_namespace(self) -> None:
        if not self.writeback.flush(self.retry_seconds):
            raise FsError(errno.EIO)          # the server stayed away (the journal keeps it all)

    @guarded
    def release(self, path, fh):
        with self.ns_lock:
            of = self.table.close(fh)
            if of.handles > 0:
                return
        orphan = False
        try:
            self._commit(of, path)
        finally:
            with self.ns_lock:
                if of.handles == 0 and self.table.get(of.id) is of and (of.unlinked or of.clean):
                    self.table.drop(of)
                    orphan = of.unlinked
        if orphan:
            self._drop_orphan(of)

    # ------------------------------------------------------------ helpers
    def _open_file(self, node: Node) -> OpenFile:
        """(Under the namespace lock.) The one state of this file on this mount."""
        of = self.table.get(node.id)
        if of is None:
            of = OpenFile(self.vault, self.blocks, self.spool, self.budget, node,
                          self.vault.file_cipher(node.id, node.attrs.key_id), None)
            self.table.add(of)
        elif of.outdated_by(node):
            of.rebase(node)        # close-to-open, also while other handles hold it
        return of

    def _new_handle(self, of: OpenFile, path: str | None, *, append: bool = False) -> int:
        opener = _process_of(fuse_get_context()[2])
        with self.ns_lock:
            return self.table.open(of, path, opener, append)

    def _commit(self, of: OpenFile, path: str | None, *, durable: bool = False) -> None:
        """Journal what ``of`` holds that the server does not have (on disk when this
        returns); ``durable`` (fsync, or every close with --sync): and wait until the
        server has it."""
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
        of.last_path = path or of.last_path
        try:
            with of.lock:
                seq = self.writeback.seal(of)
        except (ZkfsError, OSError) as exc:
            log.error("%s could not be journaled (data kept here): %s", path or of.id, exc)
            raise FsError(errno.ENOSPC if getattr(exc, "errno", None) == errno.ENOSPC else errno.EIO) from None
        seq = seq or of.journaled_seq
        if not seq:
            return
        if not self.writeback.wait(seq, server=durable or self.sync, timeout=self.retry_seconds):
            full = self.writeback.uploader.status.no_space
            log.error("%s: the server did not take it within %.0f s (%s; kept in the journal)", path or of.id,
                      self.retry_seconds, "it has no room" if full else "unreachable")
            raise FsError(errno.ENOSPC if full else errno.EIO)
