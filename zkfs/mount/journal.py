"""The mount's write-back journal: every change a call made, durable on local disk
before the call returns, sent to the server later (uploader.py) and forgotten
once the server has it.

On disk, in the mount's cache folder (``journal/``):

* ``key``: the journal key, wrapped under the account's master key (context
  ``"journal" ‖ root id``), so that a restarted mount can read what a crashed
  one left, and nothing else can.
* ``log``: records, each ``length (4 bytes, big endian) ‖ BinaryFernet(journal key,
  seq (8 bytes) ‖ JSON)``. Records carry strictly increasing sequence numbers; a
  ``{"settled": [seq...], "done": seq}`` record says the server has (or a conflict
  settled) those records and everything up to ``done``. A record
  cut short at the very end is a write a crash interrupted (its call never
  returned) and is dropped; any other record that does not open is tampering:
  the journal is refused whole, never replayed in part.
* ``blobs/``: chunk tokens not yet on the server (ciphertext under their file's
  key, as the server will hold them).

A record is written at once (it outlives a killed process); calls that must
outlive a power cut too (close, fsync) wait for an fsync, which many of them
share (group commit). When every record is done the log starts afresh.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from .. import crypto
from ..crypto import BinaryFernet, IntegrityError
from ..errors import ZkfsError

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
MAX_RECORD = 64 << 20


class JournalError(ZkfsError):
    """The journal on disk cannot be used (tampered with, or under a key we lack)."""


@dataclass(frozen=True)
class Record:
    seq: int
    body: dict[str, Any]


def journal_context(root: UUID) -> bytes:
    return b"journal" + root.bytes


class Journal:
    def __init__(self, directory: Path, wrap: "KeyWrap"):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs = self.dir / "blobs"
        self.blobs.mkdir(exist_ok=True, mode=0o700)
        self.copies = self.dir / "copies"           # tokens the server has staged already
        self.copies.mkdir(exist_ok=True, mode=0o700)
        self._cipher = BinaryFernet(self._key(wrap))
        self._path = self.dir / "log"
        self._lock = threading.Condition()
        self._wanted = 0                    # highest seq someone waits to see on disk
        self._next = 1                      # next sequence number
        self._durable = 0                   # highest seq on disk and fsynced
        self._last_change = 0               # highest seq of a change (not a "done" record)
        self.done = 0                       # highest seq the server has
        self._syncer: threading.Thread | None = None
        self._closed = False
        self._unsent: list[Record] = self._load()
        self._file = open(self._path, "ab", buffering=0)

    # ------------------------------------------------------------ key
    def _key(self, wrap: "KeyWrap") -> bytes:
        path = self.dir / "key"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            key = crypto.random_key()
            gen, wrapped = wrap.wrap(key)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"gen": gen, "wrapped": wrapped.hex()}))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return key
        except ValueError:
            raise JournalError(f"{path} is not a journal key (corrupt): the journal cannot be read") from None
        try:
            return wrap.unwrap(doc["gen"], bytes.fromhex(doc["wrapped"]))
        except (KeyError, TypeError, ValueError, IntegrityError) as exc:
            raise JournalError(f"the journal key in {path} does not open with this account's keys "
                               f"({exc.__class__.__name__}): refusing to replay it") from None

    # ------------------------------------------------------------ reading back
    def _load(self) -> list[Record]:
        """Records not yet done, after a crash; checks every record."""
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return []
        records: list[Record] = []
        settled: set[int] = set()
        pos, last = 0, 0
        while pos < len(data):
            if pos + _LEN.size > len(data):
                break                                   # a length cut short: the crash's tail
            (n,) = _LEN.unpack_from(data, pos)
            if n > MAX_RECORD:
                raise JournalError(f"{self._path}: a record claims {n} bytes: the journal was tampered with")
            if pos + _LEN.size + n > len(data):
                break                                   # a record cut short: the crash's tail
            token = data[pos + _LEN.size: pos + _LEN.size + n]
            try:
                plain = self._cipher.decrypt(token)
                (seq,) = _SEQ.unpack_from(plain)
                body = json.loads(plain[_SEQ.size:])
            except (IntegrityError, struct.error, ValueError):
                raise JournalError(f"{self._path}: a record at byte {pos} does not verify: "
                                   f"the journal was tampered with, nothing of it is replayed") from None
            if seq <= last:
                raise JournalError(f"{self._path}: records out of order at byte {pos}: the journal was "
                                   f"tampered with, nothing of it is replayed")
            last = seq
            if "done" in body:
                self.done = max(self.done, int(body["done"]))
                settled.update(body.get("settled", ()))
            else:
                records.append(Record(seq, body))
                self._last_change = seq
            pos += _LEN.size + n
        if pos < len(data):
            with open(self._path, "r+b") as f:          # drop the interrupted tail
                f.truncate(pos)
                os.fsync(f.fileno())
        self._durable, self._next = last, last + 1
        return [r for r in records if r.seq > self.done and r.seq not in settled]

    def unsent(self) -> list[Record]:
        """The records a crashed mount left for the server (once, at start)."""
        out, self._unsent = self._unsent, []
        return out

    # ------------------------------------------------------------ writing
    def append(self, body: dict) -> int:
        """Write ``body`` and return its sequence number once it is on disk (fsynced)."""
        seq = self.append_nowait(body)
        self.wait_durable(seq)
        return seq

    def append_nowait(self, body: dict) -> int:
        """Write ``body`` (to the operating system: it outlives this process, not a
        power cut) and return its sequence number; ``wait_durable`` for the rest."""
        with self._lock:
            if self._closed:
                raise JournalError("the journal is closed")
            seq = self._next
            self._next += 1
            self._file.write(self._encode(seq, body))
            if "done" not in body:
                self._last_change = seq
            return seq

    def _encode(self, seq: int, body: dict) -> bytes:
        token = self._cipher.encrypt(_SEQ.pack(seq) + json.dumps(body, separators=(",", ":")).encode())
        return _LEN.pack(len(token)) + token

    def wait_durable(self, seq: int) -> None:
        """Group commit: the first waiter's fsync covers every record written by then."""
        with self._lock:
            self._wanted = max(self._wanted, seq)
            self._start_syncer()
            self._lock.notify_all()
            while self._durable < seq:
                if self._closed:
                    raise JournalError("the journal was closed before the record was on disk")
                self._lock.wait()

    def _start_syncer(self) -> None:
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="zkfs-journal", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        while True:
            with self._lock:
                while self._wanted <= self._durable and not self._closed:
                    self._lock.wait()
                if self._closed and self._wanted <= self._durable:
                    return
                upto = self._next - 1
                fd = self._file.fileno()
            try:
                os.fdatasync(fd)
            except OSError:
                log.exception("the journal could not be written to disk")
                raise
            with self._lock:
                self._durable = max(self._durable, upto)
                if self.done >= self._last_change and self._file.tell() > (1 << 20):
                    self._restart_log()
                self._lock.notify_all()

    def settle(self, seqs: list[int], done: int) -> None:
        """The server has records ``seqs`` (or they were settled otherwise) and every
        record up to ``done`` (written at once, on disk with the next fsync; the log
        starts afresh once it has grown and all is done)."""
        with self._lock:
            self.done = max(self.done, done)
            done = self.done
        self.append_nowait({"settled": [s for s in seqs if s > done], "done": done})

    def _restart_log(self) -> None:
        """(Under the lock, by the syncer.) Everything is on the server: an empty log,
        same numbering."""
        self._file.close()
        tmp = self._path.with_suffix(".new")
        with open(tmp, "wb") as f:
            f.write(self._encode(self._next, {"done": self.done}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        dirfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self._durable = self._next
        self._next += 1
        self._file = open(self._path, "ab", buffering=0)

    @property
    def last(self) -> int:
        """The highest sequence number handed out."""
        with self._lock:
            return self._next - 1

    @property
    def last_change(self) -> int:
        """The highest sequence number of a change (or batch) record: what waiting
        for "everything so far" waits for (settle records are never settled)."""
        with self._lock:
            return self._last_change

    def close(self) -> None:
        with self._lock:
            self._wanted = self._next - 1
            self._start_syncer()
            self._lock.notify_all()
            while self._durable < self._wanted:
                self._lock.wait()
            self._closed = True
            self._lock.notify_all()
            syncer = self._syncer
        syncer.join()
        self._file.close()

    # ------------------------------------------------------------ chunk tokens
    def put_blob(self, blob: UUID, token: bytes, *, durable: bool = True) -> None:
        """A chunk token the server does not have yet, on disk before any record names
        it (``durable=False``: a copy to read from, the record itself carries it)."""
        tmp = self.blobs / f".{blob}.tmp"
        with open(tmp, "wb") as f:
            f.write(token)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.blobs / str(blob))

    def put_copy(self, blob: UUID, token: bytes) -> None:
        """A copy of a chunk token the server has staged (not committed): readable here
        until the version naming it is on the server (a conflict copy needs it)."""
        tmp = self.copies / f".{blob}.tmp"
        tmp.write_bytes(token)
        os.replace(tmp, self.copies / str(blob))

    def blob(self, blob: UUID) -> bytes | None:
        for folder in (self.blobs, self.copies):
            try:
                return (folder / str(blob)).read_bytes()
            except FileNotFoundError:
                pass
        return None

    def blob_path(self, blob: UUID) -> Path:
        return self.blobs / str(blob)

    def drop_blob(self, blob: UUID) -> None:
        (self.blobs / str(blob)).unlink(missing_ok=True)
        (self.copies / str(blob)).unlink(missing_ok=True)

    def forget_blobs(self) -> None:
        """(At start, once every record is settled.) Chunk copies a crash left behind
        after their records were settled."""
        if self.done >= self._last_change:
            for p in [*self.blobs.iterdir(), *self.copies.iterdir()]:
                p.unlink(missing_ok=True)

    def pending_bytes(self) -> int:
        total = 0
        for p in [*self.blobs.iterdir(), *self.copies.iterdir()]:
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total


class KeyWrap:
    """Wraps the journal key under the account's current master key generation."""

    def __init__(self, keyring, root: UUID):
        self.keyring, self.root = keyring, root

    def wrap(self, key: bytes) -> tuple[int, bytes]:
        gen = self.keyring.current_gen
        return gen, crypto.wrap_key(self.keyring.masters[gen], key, journal_context(self.root))

    def unwrap(self, gen: int, wrapped: bytes) -> bytes:
        master = self.keyring.masters.get(gen)
        if master is None:
            raise KeyError(f"generation {gen} is gone")
        return crypto.unwrap_key(master, wrapped, journal_context(self.root))
