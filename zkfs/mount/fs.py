"""The FUSE filesystem (libfuse3 via binding.py): translates POSIX calls into
vault operations; it holds no cryptography and no wire format.

``ZkfsOperations`` is put together from one class per family of operations
(ops_files.py, ops_namespace.py, ops_attrs.py) and per concern (conflicts.py,
orphans.py); the state they share is set up here: the metadata cache
(namespace.py), the open-file table (handles.py), the write-back queue
(writeback.py) and the block store (blocks.py)."""
from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from pathlib import Path

from ..errors import ZkfsError
from ..format import NameTooLong, encode_name
from ..vault import Node, Vault
from .binding import Operations, configure
from .blocks import BlockStore
from .cache import CiphertextCache, EncryptedSpool, PlainCache
from .conflicts import ConflictCopies
from .guard import FsError
from .handles import OpenFileTable
from .namespace import MetaCache
from .openfile import MemoryBudget, OpenFile
from .ops_attrs import AttrOps
from .ops_files import FileOps
from .ops_namespace import NamespaceOps
from .orphans import Orphans
from .writeback import WriteBack

log = logging.getLogger(__name__)


class ZkfsOperations(FileOps, NamespaceOps, AttrOps, ConflictCopies, Orphans, Operations):
    use_ns = True

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
        self.hostname = socket.gethostname()
        self.ns_lock = threading.RLock()
        self.table = OpenFileTable()
        self.writeback = WriteBack(vault, self.meta, self.table, self.ns_lock, self.hostname)
        vault.on_dir_change = self.meta.put_node       # folders our own changes sealed
        self.hidden: dict[str, Node] = {}               # libfuse's names for unlinked open files
        self._stop = threading.Event()

    # ------------------------------------------------------------ lifecycle
    def init_with_config(self, conn, config):
        configure(conn, config)
        self.meta.poll_changes()
        self.meta.start_poller(self.poll_interval, self._stop)
        self.meta.start_read_ahead(self._stop)
        threading.Thread(target=self._background, name="zkfs-writeback", daemon=True).start()

    def _background(self) -> None:
        """Sends written-back changes once due, retries closed files whose commit
        failed, and saves the versions reads have seen."""
        next_retry = next_ledger = 0.0
        while not self._stop.wait(0.1):
            if time.monotonic() >= next_ledger:
                next_ledger = time.monotonic() + 1.0
                self.vault.ledger.flush()
            try:
                if self.writeback.due():
                    self.writeback.flush()
            except Exception as exc:
                log.warning("attribute write-back failed (will retry): %s", exc)
            if time.monotonic() >= next_retry and not self._retry_closed_files():
                next_retry = time.monotonic() + 5

    def destroy(self, path):
        self._stop.set()
        try:
            self.writeback.flush()
        except Exception as exc:
            log.error("unmount: could not save attribute changes: %s", exc)
        for of in self.table.files():
            try:
                self._commit(of, None)
            except OSError:
                log.error("unmount: could not commit inode %s", of.id)
        self.blocks.close()
        self.spool.close()
        self.vault.ledger.close()

    # ------------------------------------------------------------ shared helpers
    def _resolve(self, path: str) -> Node:
        hidden = self.hidden.get(path)
        if hidden is not None:
            return hidden
        for of in self.table.files():
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

    def describe(self, path: str | None, args: tuple) -> str | None:
        """What a failed call was about, for the log: its path, or for a call on a
        file handle (which comes without one) the open file's path."""
        if path is not None or not args or not isinstance(args[-1], int):
            return path
        try:
            return self.table.handle(args[-1]).file.last_path
        except KeyError:
            pass
        try:
            return self.table.dir(args[-1]).path
        except KeyError:
            return None

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    @staticmethod
    def _check_name(name: str) -> None:
        try:
            encode_name(name)
        except NameTooLong:
            raise FsError(errno.ENAMETOOLONG) from None
        except ValueError:
            raise FsError(errno.EINVAL) from None
