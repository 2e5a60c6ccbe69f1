"""The FUSE filesystem (libfuse3 via binding.py): translates POSIX calls into
vault operations; it holds no cryptography and no wire format.

``ZkfsOperations`` is put together from one class per family of operations
(ops_files.py, ops_namespace.py, ops_attrs.py) and per concern (conflicts.py,
orphans.py); the state they share is set up here: the metadata cache
(namespace.py), the open-file table (handles.py), the write-back queue
(writeback.py, journal.py, uploader.py) and the block store (blocks.py)."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from uuid import UUID

from ..errors import ZkfsError
from ..format import NameTooLong, encode_name
from ..vault import Node, Vault
from .binding import Operations, configure
from .blocks import BlockStore
from .cache import CiphertextCache, EncryptedSpool, PlainCache
from .conflicts import ConflictCopies
from .guard import FsError
from .handles import OpenFileTable
from .journal import Journal, KeyWrap
from .namespace import MetaCache
from .openfile import MemoryBudget, OpenFile
from .ops_attrs import AttrOps
from .ops_files import FileOps
from .ops_namespace import NamespaceOps
from .orphans import Orphans
from .shared import SharedFeeds, SharedOps
from .writeback import WriteBack

log = logging.getLogger(__name__)


class ZkfsOperations(FileOps, NamespaceOps, AttrOps, ConflictCopies, Orphans, SharedOps, Operations):
    use_ns = True

    def __init__(self, vault: Vault, cache_dir: Path, cache_bytes: int, *, read_only: bool = False,
                 write_buffer_bytes: int = 64 << 20, poll_interval: float = 1.0, sync: bool = False,
                 retry_seconds: float = 60.0, status_path: Path | None = None):
        self.vault = vault
        self.read_only = read_only
        self.sync = sync                      # close() waits for the server (--sync)
        self.retry_seconds = retry_seconds    # how long fsync/--sync/--wait wait for an absent server
        self.status_path = status_path
        self.journal = Journal(cache_dir / "journal", KeyWrap(vault.keyring, vault.root))
        self.meta = MetaCache(vault)
        self.blocks = BlockStore(vault, CiphertextCache(cache_dir / "chunks", cache_bytes),
                                 PlainCache(16 << 20), self.journal)
        self.spool = EncryptedSpool(cache_dir)
        self.budget = MemoryBudget(write_buffer_bytes)
        self.poll_interval = poll_interval
        self.hostname = socket.gethostname()
        self.ns_lock = threading.RLock()
        self.table = OpenFileTable()
        self.writeback = WriteBack(vault, self.meta, self.table, self.ns_lock, self.hostname, self.journal)
        self.writeback.conflicts = self
        self.writeback.uploader.keep_sent = self.blocks.tokens.put
        vault.on_dir_change = self.meta.put_node       # folders our own changes sealed
        self.meta.after_poll = SharedFeeds(self.meta).poll
        self.hidden: dict[str, Node] = {}               # libfuse's names for unlinked open files
        self.hidden_names: dict[tuple[UUID, str], str] = {}   # (parent, name) -> its hidden path
        self._statfs: dict | None = None                # the server's last answer (for offline)
        self._stop = threading.Event()

    # ------------------------------------------------------------ lifecycle
    def replay(self) -> int:
        """Send what a crashed or stopped mount left in the journal, before serving
        anything (its names are not in the cache's overlay). Returns how many
        changes it sent; raises ZkfsError if the server does not take them within
        ``retry_seconds`` (they stay in the journal for the next start)."""
        left = self.journal.unsent()
        uploader = self.writeback.uploader
        uploader.load(left)
        uploader.start()
        if left:
            log.info("journal: sending %d change(s) the last mount left", len(left))
            if not uploader.wait(self.journal.last_change, self.retry_seconds):
                raise ZkfsError(f"the server did not take the {uploader.snapshot().pending} change(s) the last "
                                f"mount left within {self.retry_seconds:.0f} s; they stay in the journal "
                                f"({self.journal.dir}) for the next mount")
        self.journal.forget_blobs()         # chunk copies of records now all settled
        self.write_status()
        return len(left)

    def init_with_config(self, conn, config):
        configure(conn, config)
        try:
            self.meta.poll_changes()
            self._statfs = self.vault.api.statfs()      # what df shows if the server goes away
        except ZkfsError as exc:
            log.warning("change feed: %s", exc)
        self.meta.start_poller(self.poll_interval, self._stop)
        self.meta.start_read_ahead(self._stop)
        threading.Thread(target=self._background, name="zkfs-status", daemon=True).start()

    def _background(self) -> None:
        """Saves the versions reads have seen, and the journal's status for
        ``mount.py --status`` / ``--wait``."""
        while not self._stop.wait(0.5):
            try:
                self.vault.ledger.flush()
                self.write_status()
            except Exception:   # noqa: BLE001 - a status file must not stop the mount
                log.exception("saving the mount's status failed")

    def status(self) -> dict:
        s = self.writeback.uploader.snapshot()
        return {"pid": os.getpid(), "pending": s.pending, "pending_bytes": s.pending_bytes, "online": s.online,
                "last_error": s.last_error, "oldest": s.oldest, "done": s.done, "last": s.last,
                "sent_records": s.sent_records, "sent_batches": s.sent_batches, "at": time.time()}

    def write_status(self) -> None:
        if self.status_path is None:
            return
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        os.replace(tmp, self.status_path)

    def destroy(self, path):
        """Unmount: what open files hold goes to the journal; the journal drains to
        the server unless the mount keeps it for the next start (--keep-pending or
        the server away past retry_seconds: nothing is lost either way)."""
        self._stop.set()
        for of in self.table.files():
            try:
                with of.lock:
                    self.writeback.seal(of)
            except (ZkfsError, OSError) as exc:
                log.error("unmount: inode %s could not be journaled: %s", of.id, exc)
        try:
            with self.ns_lock:
                last = self.writeback.record()
            self.journal.wait_durable(last or self.journal.last)
            keep = self.keep_pending_flag is not None and self.keep_pending_flag.exists()
            if not keep and not self.writeback.uploader.wait(self.journal.last_change, self.retry_seconds):
                log.error("unmount: the server did not take %d change(s) within %.0f s; they stay in the "
                          "journal for the next mount", self.writeback.uploader.snapshot().pending,
                          self.retry_seconds)
        finally:
            self.writeback.uploader.stop()
            self.write_status()
            self.blocks.close()
            self.spool.close()
            self.journal.close()
            self.vault.ledger.close()

    keep_pending_flag: Path | None = None     # exists: mount.py --unmount --keep-pending

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
