"""Chunk I/O for the mount: cached, deduplicated, read-ahead and bounded write-behind."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from uuid import UUID, uuid4

from ..crypto import BinaryFernet
from ..format import HOLE_REF, ChunkRef, Manifest, seal_chunk
from ..vault import Vault, any_nonzero
from .cache import CiphertextCache, PlainCache
from .journal import Journal


class BlockStore:
    def __init__(self, vault: Vault, tokens: CiphertextCache, plain: PlainCache, journal: Journal,
                 workers: int = 4, max_uploads_in_flight: int = 8):
        self.vault = vault
        self.tokens = tokens
        self.plain = plain
        self.journal = journal      # chunk tokens sealed here that the server does not have yet
        self._readers = ThreadPoolExecutor(workers, thread_name_prefix="zkfs-read")
        self._writers = ThreadPoolExecutor(workers, thread_name_prefix="zkfs-write")
        self._upload_slots = threading.BoundedSemaphore(max_uploads_in_flight)
        self._inflight: dict[UUID, Future] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._writers.shutdown(wait=True)

    # ------------------------------------------------------------ reads
    def read(self, inode: UUID, manifest: Manifest, index: int, *, keep_token: bool = True) -> bytes:
        """A chunk's plaintext. ``keep_token``: also keep the ciphertext in the disk
        cache (not for read-ahead: a streaming read should not write the file to
        disk a second time)."""
        ref = manifest.chunks[index]
        if ref.is_hole:
            return bytes(manifest.chunk_length(index))
        data = self.plain.get(ref.blob_id)
        if data is not None:
            return data
        fut = self._claim(ref.blob_id)
        if fut is None:                      # another thread is loading it
            return self._inflight_result(ref.blob_id, manifest, inode, index, keep_token)
        return self._fill(fut, inode, manifest, index, keep_token)

    def read_part(self, inode: UUID, manifest: Manifest, index: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of a chunk for a random read: from the whole chunk if it is
        cached or already coming, else only the segments that cover them (not cached:
        the kernel's page cache keeps what was read)."""
        ref = manifest.chunks[index]
        if ref.is_hole:
            return bytes(hi - lo)
        with self._lock:
            loading = ref.blob_id in self._inflight
        if loading or self.plain.get(ref.blob_id) is not None or ref.blob_id in self.tokens \
                or self.journal.blob_path(ref.blob_id).exists():
            return self.read(inode, manifest, index)[lo:hi]
        return self.vault.read_chunk_range(inode, manifest, index, lo, hi)

    def _claim(self, blob: UUID) -> Future | None:
        """Register a load of ``blob``; None if one is already in flight."""
        with self._lock:
            if blob in self._inflight:
                return None
            fut = self._inflight[blob] = Future()
            return fut

    def _inflight_result(self, blob: UUID, manifest: Manifest, inode: UUID, index: int,
                         keep_token: bool) -> bytes:
        with self._lock:
            fut = self._inflight.get(blob)
        if fut is None:                      # finished in between: cached, or failed
            return self.read(inode, manifest, index, keep_token=keep_token)
        return fut.result()

    def _fill(self, fut: Future, inode: UUID, manifest: Manifest, index: int, keep_token: bool) -> bytes:
        ref = manifest.chunks[index]
        try:
            data = self._load(inode, manifest, index, ref, keep_token)
            fut.set_result(data)
            return data
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(ref.blob_id, None)

    def _load(self, inode: UUID, manifest: Manifest, index: int, ref: ChunkRef, keep_token: bool) -> bytes:
        token = self.tokens.get(ref.blob_id) or self.journal.blob(ref.blob_id)
        fetched = token is None
        if fetched:
            self.vault.urls_ahead(inode, manifest, index)
            token = self.vault.fetch_chunk_token(inode, ref)
        data = self.vault.open_chunk(inode, manifest, index, token)   # verifies before caching
        if fetched and keep_token:
            self.tokens.put(ref.blob_id, token)
        self.plain.put(ref.blob_id, data)
        return data

    def prefetch(self, inode: UUID, manifest: Manifest, indices) -> None:
        """Start loading chunks in the background. A chunk is claimed before it is
        queued: the kernel asks for every 128 KiB of a sequential read, and queueing
        the same chunks again left the workers waiting on each other's loads."""
        for i in indices:
            ref = manifest.chunks[i]
            if ref.is_hole or self.plain.get(ref.blob_id) is not None:
                continue
            fut = self._claim(ref.blob_id)
            if fut is not None:
                self._readers.submit(self._quiet_fill, fut, inode, manifest, i)

    def _quiet_fill(self, fut: Future, inode: UUID, manifest: Manifest, index: int) -> None:
        try:
            self._fill(fut, inode, manifest, index, keep_token=False)
        except Exception:
            pass    # the foreground read will raise and log it

    # ------------------------------------------------------------ writes
    def upload(self, inode: UUID, cipher: BinaryFernet, plain: bytes) -> ChunkRef:
        # Only the (bounded, in-memory) plaintext cache learns of written chunks:
        # writing every token to the disk cache too would double the disk writes.
        ref, token = self.vault.upload_chunk_token(inode, cipher, plain)
        if not ref.is_hole:
            self.plain.put(ref.blob_id, plain)
            # Until the version naming it is on the server, a copy here: if another
            # machine's version wins meanwhile, ours is rebuilt from it as a conflict copy.
            if token is not None:
                self.journal.put_copy(ref.blob_id, token)
        return ref

    def keep_local(self, inode: UUID, cipher: BinaryFernet, plain: bytes) -> ChunkRef:
        """Seal a chunk into the journal (durable before the record naming it); the
        journal's uploader sends it with that record. All zeros: a hole."""
        if not any_nonzero(plain):
            return HOLE_REF
        token, ref = seal_chunk(cipher, plain, uuid4())
        self.journal.put_blob(ref.blob_id, token)
        self.plain.put(ref.blob_id, plain)
        return ref

    def keep_inline(self, ref: ChunkRef, token: bytes, plain: bytes) -> None:
        """A chunk that travels inside its commit record: readable from the journal
        until the server has it (the record, not this copy, is what survives a crash)."""
        self.journal.put_blob(ref.blob_id, token, durable=False)
        self.plain.put(ref.blob_id, plain)

    def upload_async(self, inode: UUID, cipher: BinaryFernet, plain: bytes) -> Future:
        """Start an upload; blocks while too many are in flight (bounded memory)."""
        self._upload_slots.acquire()
        try:
            fut = self._writers.submit(self.upload, inode, cipher, plain)
        except BaseException:
            self._upload_slots.release()
            raise
        fut.add_done_callback(lambda _: self._upload_slots.release())
        return fut
