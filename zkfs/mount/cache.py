"""Block caches of the mount (S3QL keeps its block cache apart from the rest too).

- ``CiphertextCache``: bounded on-disk LRU of chunk *tokens* keyed by blob id.
  Blobs are immutable and never reused, so an entry can never be stale, and the
  disk only ever holds what the server holds: ciphertext.
- ``PlainCache``: small in-memory LRU of decrypted chunks, so that 128 KiB FUSE
  reads inside one 1 MiB chunk decrypt it once.
- ``EncryptedSpool``: dirty write buffers that outgrow memory, encrypted with a
  key that exists only in this process.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from uuid import UUID

from ..crypto import BinaryFernet, random_key


class CiphertextCache:
    def __init__(self, directory: Path, max_bytes: int):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[UUID, int] = OrderedDict()
        self._bytes = 0
        entries = []
        for p in self.dir.iterdir():
            try:
                st = p.stat()
                entries.append((st.st_atime, UUID(p.name), st.st_size))
            except (ValueError, OSError):
                p.unlink(missing_ok=True)        # temp files of an earlier crash
        for _, blob, size in sorted(entries):
            self._index[blob] = size
            self._bytes += size
        self._evict()

    def __contains__(self, blob: UUID) -> bool:
        with self._lock:
            return blob in self._index

    def get(self, blob: UUID) -> bytes | None:
        with self._lock:
            if blob not in self._index:
                return None
            self._index.move_to_end(blob)
        try:
            return (self.dir / str(blob)).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._bytes -= self._index.pop(blob, 0)
            return None

    def put(self, blob: UUID, token: bytes) -> None:
        if len(token) > self.max_bytes:
            return
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(token)
        os.replace(tmp, self.dir / str(blob))
        with self._lock:
            self._bytes += len(token) - self._index.pop(blob, 0)
            self._index[blob] = len(token)
            self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._index:
            blob, size = self._index.popitem(last=False)
            self._bytes -= size
            (self.dir / str(blob)).unlink(missing_ok=True)


class PlainCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[UUID, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, blob: UUID) -> bytes | None:
        with self._lock:
            data = self._items.get(blob)
            if data is not None:
                self._items.move_to_end(blob)
            return data

    def put(self, blob: UUID, data: bytes) -> None:
        with self._lock:
            old = self._items.pop(blob, None)
            self._bytes += len(data) - (len(old) if old else 0)
            self._items[blob] = data
            while self._bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


class EncryptedSpool:
    """One file per spilled chunk under a private directory, removed on close."""

    def __init__(self, parent: Path):
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob("spool-*"):      # their key died with their process
            shutil.rmtree(stale, ignore_errors=True)
        self.dir = Path(tempfile.mkdtemp(prefix="spool-", dir=parent))
        self._cipher = BinaryFernet(random_key())
        self._seq = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> Path:
        with self._lock:
            self._seq += 1
            path = self.dir / str(self._seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self._cipher.encrypt(bytes(data)))
        return path

    def take(self, path: Path) -> bytearray:
        data = bytearray(self._cipher.decrypt(path.read_bytes()))
        path.unlink()
        return data

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
