"""The state of one open regular file, shared by all its handles.

Writes land in per-chunk plaintext buffers. A chunk written through to its end
is encrypted and uploaded at once as a *staged* blob (invisible to everyone
until committed), so a long sequential write streams out while it happens and
memory stays bounded; buffers beyond the memory budget spill to the encrypted
spool. ``seal`` (flush, fsync, last close) turns the rest into the records of
the file's next version (the chunks not uploaded go into the journal): the
uploader later swaps the file to that manifest in one compare-and-swap on the
server, so either the whole new version becomes visible or none of it. The
state stays (and answers reads) until the server has that version.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from uuid import UUID, uuid4

from .. import crypto
from ..crypto import BinaryFernet
from ..format import HOLE_REF, MAX_FILE_SIZE, ChunkRef, Manifest, seal_chunk
from . import records
from ..vault import Node, Vault, any_nonzero
from .blocks import BlockStore
from .cache import EncryptedSpool

log = logging.getLogger(__name__)

INLINE_MAX = 64 * 1024


def _check_size(size: int) -> None:
    if size < 0:
        raise OSError(errno.EINVAL, "negative size")
    if size > MAX_FILE_SIZE:
        raise OSError(errno.EFBIG, "file too large")


class MemoryBudget:
    """Dirty plaintext held in memory across all open files."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.used += n

    def over(self) -> bool:
        return self.used > self.max_bytes


@dataclass
class PendingCreate:
    parent: UUID
    name: str
    file_key: bytes         # wrapped when the create op is built (see Vault.op_create)
    at_ns: int              # when create() was called: the folder's new mtime


class OpenFile:
    def __init__(self, vault: Vault, blocks: BlockStore, spool: EncryptedSpool, budget: MemoryBudget,
                 node: Node, cipher: BinaryFernet, manifest: Manifest | None,
                 pending: PendingCreate | None = None):
        self.vault = vault
        self.blocks = blocks
        self.spool = spool
        self.budget = budget
        self.id = node.id
        self.cipher = cipher
        self.lock = threading.RLock()
        self.handles = 0
        self.last_path: str | None = None    # where to put a conflict copy
        self.write_failed = False            # a write() returned an error: never publish
        self.unlinked = False
        self.pending = pending
        self._reset_base(node, manifest)
        self.attrs = node.attrs.evolve()
        if pending is not None:
            self.attrs.key_id = crypto.key_id(pending.file_key)
        self.meta_dirty = pending is not None
        self._last_read_chunk = -2
        self.journaled_seq = 0               # the journal record of this file's last version
        self.sent_upto = 0                   # ... of which the server has up to this seq

    _confirm_lock = threading.Lock()   # leaf lock, shared: held for a dict operation only

    @property
    def base_node(self) -> Node:
        """The version this state stands on (the server's, or the journal's next)."""
        return self._base_node

    def _reset_base(self, node: Node, manifest: Manifest | None) -> None:
        self._base_node = node
        self.base_version = node.version
        self.base_size = node.attrs.size
        if manifest is None and node.attrs.manifest_digest is None:
            manifest = Manifest(node.id)          # empty: nothing to fetch
        self._base_manifest = manifest
        self.size = node.attrs.size
        self.floor = node.attrs.size          # base bytes at or past floor read as zeros
        self.dirty: dict[int, bytearray] = {}
        self.spilled: dict[int, Path] = {}
        self.staged: dict[int, Future] = {}
        # Plaintext of staged chunks whose upload has not succeeded yet: a failed
        # upload goes back to ``dirty`` instead of being lost. Guarded by its own
        # leaf lock: upload threads must never wait for ``self.lock``, which a
        # commit holds while it waits for them.
        self._unconfirmed: dict[int, tuple[Future, bytes]] = {}
        self._upload_failed = False

    # ------------------------------------------------------------ helpers
    @property
    def cs(self) -> int:
        return self.base_manifest.chunk_size

    @property
    def base_manifest(self) -> Manifest:
        if self._base_manifest is None:
            self._base_manifest = self.vault.manifest(self._base_node)
        return self._base_manifest

    @property
    def content_dirty(self) -> bool:
        return bool(self.dirty or self.spilled or self.staged) or self.size != self.floor \
            or self.floor != self.base_size

    @property
    def clean(self) -> bool:
        """Nothing here that the server does not have: another client's newer
        version can replace the base without losing anything."""
        return self.pending is None and not (self.meta_dirty or self.content_dirty or self.write_failed
                                             or self.unsent)

    @property
    def sealed(self) -> bool:
        """Everything here is in the journal (or on the server): nothing left to seal."""
        return self.pending is None and not (self.meta_dirty or self.content_dirty or self.write_failed)

    def outdated_by(self, node: Node) -> bool:
        """``node`` (this file as the namespace has it now) is a newer version that
        this open file, holding nothing unpublished, should follow."""
        return self.clean and node.version > self.base_version

    def chunk_len(self, i: int) -> int:
        return max(0, min(self.cs, self.size - i * self.cs))

    def _base_view(self, i: int) -> bytes:
        """Chunk i as the base version has it, cut at ``floor``, sized for ``size``."""
        n = self.chunk_len(i)
        base = self.base_manifest
        start = i * self.cs
        if i >= len(base.chunks) or start >= self.floor:
            return bytes(n)
        data = self.blocks.read(self.id, base, i)
        keep = min(len(data), self.floor - start, n)
        return data[:keep] + bytes(n - keep) if keep < len(data) or keep < n else data

    def _settle(self, i: int) -> ChunkRef | None:
        """Wait for chunk i's upload. On failure its plaintext returns to ``dirty``."""
        fut = self.staged[i]
        # exception(), not result(): raised here, the error's traceback would hold this
        # frame and with it the future that holds the error (a cycle, see drop_frames).
        if fut.exception() is not None:
            log.warning("upload of chunk %d of inode %s failed; kept for retry", i, self.id)
            del self.staged[i]
            with self._confirm_lock:
                plain = self._unconfirmed.pop(i)[1]
            self.dirty[i] = bytearray(plain)
            self.budget.add(len(plain))
            self._upload_failed = True
            return None
        self._forget_plain(i, fut)
        return fut.result()

    def _forget_plain(self, i: int, fut: Future) -> None:
        with self._confirm_lock:
            held = self._unconfirmed.get(i)
            if held is not None and held[0] is fut:
                del self._unconfirmed[i]

    def _staged_view(self, i: int) -> bytes:
        ref = self._settle(i)
        if ref is None:
            return bytes(self.dirty[i])
        m = Manifest(self.id, size=(i + 1) * self.cs, chunk_size=self.cs, chunks=[ref] * (i + 1))
        return self.blocks.read(self.id, m, i)

    def _take_buffer(self, i: int) -> bytearray:
        """A writable buffer for chunk i, materialised from wherever it lives now."""
        buf = self.dirty.get(i)
        if buf is not None:
            return buf
        if i in self.spilled:
            buf = self.spool.take(self.spilled.pop(i))
        elif i in self.staged:
            data = self._staged_view(i)
            if i in self.dirty:                 # its upload had failed
                return self.dirty[i]
            buf = bytearray(data)
            del self.staged[i]
        else:
            buf = bytearray(self._base_view(i))
        self.dirty[i] = buf
        self.budget.add(len(buf))
        return buf

    def _drop_buffer(self, i: int) -> None:
        buf = self.dirty.pop(i, None)
        if buf is not None:
            self.budget.add(-len(buf))
        path = self.spilled.pop(i, None)
        if path is not None:
            self.spool.discard(path)
        self.staged.pop(i, None)
        with self._confirm_lock:
            self._unconfirmed.pop(i, None)

    def _view(self, i: int) -> bytes:
        """Current plaintext of chunk i, sized to chunk_len(i)."""
        n = self.chunk_len(i)
        if i in self.dirty:
            buf = self.dirty[i]
            return bytes(buf[:n]) + bytes(max(0, n - len(buf)))
        if i in self.spilled:
            buf = self._take_buffer(i)
            return bytes(buf[:n]) + bytes(max(0, n - len(buf)))
        if i in self.staged:
            data = self._staged_view(i)
            return data[:n] + bytes(max(0, n - len(data)))
        return self._base_view(i)

    # ------------------------------------------------------------ I/O
    def read(self, offset: int, length: int) -> bytes:
        """Local state is copied under the lock; chunks of the base version are
        fetched after it is released, so the kernel's parallel read-ahead requests
        are served in parallel."""
        with self.lock:
            end = min(self.size, offset + length)
            if offset >= end:
                return b""
            first, last = offset // self.cs, (end - 1) // self.cs
            # A sequential reader gets whole chunks and read-ahead; a random one only
            # the 64 KiB segments its read covers.
            sequential = offset == 0 or first in (self._last_read_chunk, self._last_read_chunk + 1)
            if sequential and (offset == 0 or last != self._last_read_chunk):    # once per chunk
                self._readahead(last + 1)
            self._last_read_chunk = last
            plan: list[bytes | tuple[int, int, int]] = []
            for i in range(first, last + 1):
                lo = max(offset, i * self.cs) - i * self.cs
                hi = min(end, (i + 1) * self.cs) - i * self.cs
                if i in self.dirty or i in self.spilled or i in self.staged:
                    plan.append(self._view(i)[lo:hi])
                else:
                    plan.append((i, lo, hi))
            base, floor = self.base_manifest, self.floor
        return b"".join(p if isinstance(p, bytes) else self._base_slice(base, floor, sequential, *p)
                        for p in plan)

    def _base_slice(self, base: Manifest, floor: int, whole: bool, i: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of chunk i as the base version has them, zeros past ``floor``;
        ``whole``: load (and cache) the whole chunk rather than just what covers them."""
        start = i * base.chunk_size
        valid = 0 if i >= len(base.chunks) else max(0, min(floor - start, base.chunk_length(i)))
        if lo >= valid:
            return bytes(hi - lo)
        top = min(hi, valid)
        data = self.blocks.read(self.id, base, i)[lo:top] if whole else \
            self.blocks.read_part(self.id, base, i, lo, top)
        return data if top == hi else data + bytes(hi - top)

    def _readahead(self, start: int) -> None:
        base = self.base_manifest
        wanted = [i for i in range(start, min(start + 8, len(base.chunks)))
                  if i * self.cs < self.floor and i not in self.dirty and i not in self.staged]
        if wanted:
            self.blocks.prefetch(self.id, base, wanted)

    def write(self, offset: int, data: bytes, *, append: bool = False) -> int:
        with self.lock:
            if append:            # O_APPEND: this file's end, whatever the kernel's size says
                offset = self.size
            end = offset + len(data)
            _check_size(end)
            self.size = max(self.size, end)   # a partial old last chunk is zero-padded by _base_view
            pos = offset
            while pos < end:
                i = pos // self.cs
                lo = pos - i * self.cs
                hi = min(self.cs, end - i * self.cs)
                buf = self._take_buffer(i)
                if len(buf) < hi:
                    self.budget.add(hi - len(buf))
                    buf.extend(bytes(hi - len(buf)))
                buf[lo:hi] = data[pos - offset: pos - offset + hi - lo]
                if hi == self.cs and len(buf) == self.cs:
                    self._stage(i)
                pos += hi - lo
            now = time.time_ns()
            self.attrs.mtime_ns = self.attrs.ctime_ns = now
            self.meta_dirty = True
            self._spill_if_needed()
            return len(data)

    def truncate(self, length: int) -> None:
        _check_size(length)
        with self.lock:
            if length < self.size:
                last = length // self.cs
                for i in [i for i in (*self.dirty, *self.spilled, *self.staged) if i * self.cs >= length]:
                    self._drop_buffer(i)
                if length % self.cs and last in (*self.dirty, *self.spilled, *self.staged):
                    buf = self._take_buffer(last)
                    keep = length - last * self.cs
                    self.budget.add(-(len(buf) - min(len(buf), keep)))
                    del buf[keep:]
                self.floor = min(self.floor, length)
            self.size = length
            self.attrs.mtime_ns = self.attrs.ctime_ns = time.time_ns()
            self.meta_dirty = True

    def _stage(self, i: int) -> None:
        """Upload chunk i now (write-behind), unless uploads are failing: then it
        stays dirty (and may spill) until a commit can succeed."""
        if self._upload_failed:
            return
        plain = bytes(self.dirty.pop(i))
        self.budget.add(-len(plain))
        self._upload(i, plain)

    def _upload(self, i: int, plain: bytes) -> None:
        fut = self.blocks.upload_async(self.id, self.cipher, plain)
        with self._confirm_lock:
            self._unconfirmed[i] = (fut, plain)
        self.staged[i] = fut
        fut.add_done_callback(lambda f, i=i: self._confirmed(i, f))

    def _confirmed(self, i: int, fut: Future) -> None:
        # Runs on the upload thread: once the server has the chunk, stop holding it.
        if fut.exception() is None:
            self._forget_plain(i, fut)

    def _spill_if_needed(self) -> None:
        while self.budget.over() and self.dirty:
            i = next(iter(self.dirty))
            buf = self.dirty.pop(i)
            self.budget.add(-len(buf))
            self.spilled[i] = self.spool.put(buf)

    # ------------------------------------------------------------ commit
    def touch_attrs(self, change) -> None:
        """Apply an attribute change (chmod, utimens...), sent with the file's next
        version. Lock-free on purpose: callers hold the namespace lock, and the lock
        order is file lock -> namespace lock (``seal`` runs under both)."""
        change(self.attrs)
        self.attrs.ctime_ns = time.time_ns()
        self.meta_dirty = True

    def created(self) -> None:
        self.pending = None
        self.base_version = 1

    @property
    def unsent(self) -> bool:
        """This file's last version is in the journal, not yet on the server."""
        return self.sent_upto < self.journaled_seq

    def settle_uploads(self) -> None:
        """(Under ``self.lock``.) Wait for the chunks being uploaded, so that ``seal``
        (under the namespace lock too) never waits for the network."""
        for i in list(self.staged):
            self._settle(i)

    def seal(self) -> list[dict]:
        """The journal records that make the current content and attributes this
        file's next version (after its create, for a new file); from now on this
        state stands on that version, as if the server had it. Its chunks are on the
        server (staged while they were written) or in the journal. [] if there is
        nothing to send."""
        with self.lock:
            if not (self.meta_dirty or self.pending or self.content_dirty):
                return []
            out = []
            base_version = self.base_version
            if self.pending is not None:
                p = self.pending
                out.append(records.create(p.parent, p.name, self.id, self.attrs.evolve(size=0, manifest_digest=None),
                                          p.file_key, p.at_ns))
                base_version = 1
            attrs = self.attrs.evolve()
            attrs.version = base_version + 1
            if self.content_dirty or self.pending:
                manifest, inline = self._build_manifest()
                token = manifest.encrypt(self.cipher)     # sealed now: this mount reads it until sent
                attrs.size = manifest.size
                attrs.manifest_digest = crypto.digest(token)
                out.append(records.commit(self.id, base_version, attrs, manifest, inline, token))
            else:
                manifest, token = self.base_manifest, self._base_node.manifest_token
                out.append(records.attrs(self.id, base_version, attrs, attrs.ctime_ns))
            for i in {*self.dirty, *self.spilled, *self.staged}:
                self._drop_buffer(i)
            base = Node(self.id, False, attrs.version, 1, attrs, manifest_token=token)
            self.vault.remember_manifest(base, manifest)
            self._reset_base(base, manifest)
            self.pending = None
            self.attrs = attrs.evolve()
            self.meta_dirty = False
            return out

    def _build_manifest(self) -> tuple[Manifest, dict[UUID, bytes]]:
        base = self.base_manifest
        count = -(-self.size // self.cs)
        refs: list[ChunkRef | None] = [None] * count
        # The chunks to store, read one at a time below: all of a big file's at once
        # would hold it whole in memory (and fragment the heap, offline above all).
        uploads: dict[int, Callable[[int], bytes]] = {}
        for i in range(count):
            if i in self.staged or i in self.dirty or i in self.spilled:
                continue
            if i >= len(base.chunks) or i * self.cs >= self.floor:
                refs[i] = HOLE_REF                # never written: a hole, nothing stored
            elif base.chunk_length(i) == self.chunk_len(i) and i * self.cs + base.chunk_length(i) <= self.floor:
                refs[i] = base.chunks[i]          # unchanged: not uploaded again
            else:
                uploads[i] = self._base_view      # cut by a truncate or padded by growth
        for i in [*self.dirty, *self.spilled]:
            if i < count:
                uploads[i] = self._view
        inline: dict[UUID, bytes] = {}
        if len(uploads) == 1 and not self.staged and self.chunk_len(next(iter(uploads))) <= INLINE_MAX:
            (i, view), = uploads.items()
            refs[i], token = self._seal_inline(view(i))
            if token is not None:
                inline[refs[i].blob_id] = token
        else:
            for i, view in uploads.items():
                refs[i] = self.blocks.keep_local(self.id, self.cipher, view(i))
        for i in list(self.staged):
            ref = self._settle(i)
            if ref is None:                    # its upload failed (server away): the journal keeps it
                ref = self.blocks.keep_local(self.id, self.cipher, bytes(self.dirty[i]))
            if i < count:
                refs[i] = ref
        self._upload_failed = False
        return Manifest(self.id, size=self.size, chunk_size=self.cs, chunks=refs), inline

    def _seal_inline(self, plain: bytes) -> tuple[ChunkRef, bytes | None]:
        if not any_nonzero(plain):
            return HOLE_REF, None
        token, ref = seal_chunk(self.cipher, plain, uuid4())
        self.blocks.keep_inline(ref, token, plain)
        return ref, token

    def snapshot_chunks(self):
        """Yield this handle's current content chunk by chunk (for a conflict copy)."""
        with self.lock:
            for i in range(-(-self.size // self.cs)):
                yield self._view(i)

    def rebase(self, node: Node) -> None:
        """Drop our changes (saved elsewhere, e.g. as a conflict copy) and follow ``node``
        (under its file key: a rotate-key --full may have replaced it)."""
        with self.lock:
            for i in {*self.dirty, *self.spilled, *self.staged}:
                self._drop_buffer(i)
            if node.attrs.key_id is not None and node.attrs.key_id != self.attrs.key_id:
                self.cipher = self.vault.file_cipher(self.id, node.attrs.key_id)
            self._reset_base(node, None)
            self.attrs = node.attrs.evolve()
            self.pending = None
            self.meta_dirty = False
