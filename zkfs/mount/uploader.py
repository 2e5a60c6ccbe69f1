"""Sends the journal to the server: consecutive records as one transaction (a
batch), in the order the calls made them, the chunk tokens they need first (in
parallel); several hundred small files a request instead of one round trip each.

A batch is planned (Vault.plan_batch: every folder it changes sealed with it),
written to the journal with its id, then sent: the server applies a batch id once,
so a batch whose answer was lost (a cut connection, a crash of the mount) is sent
again as it was, never applied twice. With the server away the batch waits and
is tried again with growing pauses (the mount works offline meanwhile); a batch
the server refuses is narrowed down to the record it refuses, which the mount's
policy settles (``Policy.refused``: a conflict copy, a logged loss of a rename
another machine made impossible...), and the rest goes on.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol
from uuid import UUID

from ..domains import ShareRefused
from ..errors import ServerError, TamperedError, Unreachable, ZkfsError
from ..format import Attrs
from ..ops import Plan
from ..vault import Vault
from . import records
from .journal import Journal, Record
from .shared import adopt_record

log = logging.getLogger(__name__)

MAX_BATCH_RECORDS = 400
MAX_BATCH_WIRES = 1000              # the server's limit (server/models.py MAX_OPS)
MAX_BATCH_BYTES = 8 << 20           # of JSON: the server takes 16 MiB
UPLOAD_THREADS = 4
GATHER_SECONDS = 0.05
_PAUSES = (0.5, 1, 2, 4, 8, 15, 30)


class Policy(Protocol):
    def refused(self, record: Record, exc: ServerError) -> list[dict]:
        """The server refuses ``record``: settle it; returns records to send instead."""

    def settled(self, done: int) -> None:
        """Every record up to ``done`` is on the server or settled."""

    def queued(self) -> None:
        """The records ``refused`` returned are in the journal and the queue."""


@dataclass
class Status:
    pending: int = 0                 # records not yet on the server
    pending_bytes: int = 0           # chunk bytes waiting in the journal
    online: bool = True
    no_space: bool = False           # the server refuses for want of room (quota, disk)
    last_error: str | None = None
    oldest: float | None = None      # wall time of the oldest pending record
    sent_records: int = 0
    sent_batches: int = 0
    done: int = 0
    last: int = 0


@dataclass
class _Batch:
    id: UUID
    records: list[Record]
    plan: Plan
    blobs: list[UUID] = field(default_factory=list)     # chunk tokens the journal holds for it


class Uploader:
    def __init__(self, vault: Vault, journal: Journal, policy: Policy):
        self.vault, self.journal, self.policy = vault, journal, policy
        self._queue: list[Record] = []
        self._times: dict[int, float] = {}               # pending seq -> wall time it was made
        self._seen = journal.done                        # the highest seq of a change given to us
        self._lock = threading.Condition()
        self._batch: _Batch | None = None                # planned and written, not yet answered
        self._waiters = 0                                # callers of wait(): no gathering then
        self._planning: list[Record] = []                # being planned into the next batch
        self._taken: list[Record] = []                   # versions a conflict copy replaced
        # (refused seq, last seq of the records that settle it): waiting for a record
        # means waiting for what took its place too (a conflict copy is made later).
        self._replaced: list[tuple[int, int]] = []
        self._tampered: TamperedError | None = None      # the last answer failed its check
        # Inodes whose last name went while their records were being sent: their
        # content, if that comes back unsent (no room), is not sent (see cancel_new).
        self._gone_while_busy: set[str] = set()
        self._no_room_for: int | None = None             # the seq of the record a full server refused
        # Inodes whose refused versions' chunks stay: an open file still builds on them.
        self.keep_chunks_of: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="zkfs-journal-upload")
        self.status = Status()
        # Chunk tokens the server now has: kept in the mount's ciphertext cache (set by
        # the mount), so reading what was just written needs no server.
        self.keep_sent: Callable[[UUID, bytes], None] | None = None

    # ------------------------------------------------------------ feeding
    def load(self, left: list[Record]) -> None:
        """What a crashed mount left (the records not settled, in order): its last
        batch is sent again as it was if none of it was settled (it may have been
        applied, its answer lost: the server applies a batch id once); the rest
        are queued."""
        changes = [r for r in left if "batch" not in r.body]
        batches = [r for r in left if "batch" in r.body]
        if batches:
            # Earlier batch records were answered: the next is planned only then.
            batch = self._batch_from(batches[-1].body, changes)
            if len(batch.records) == len(batches[-1].body["seqs"]):
                self._batch = batch
                covered = {r.seq for r in batch.records}
                changes = [r for r in changes if r.seq not in covered]
        with self._lock:
            self._queue = changes + self._queue
            for r in changes + (self._batch.records if self._batch else []):
                self._times.setdefault(r.seq, time.time())
            self._seen = max([self._seen] + [r.seq for r in left])
            self._lock.notify_all()

    def _batch_from(self, body: dict, changes: list[Record]) -> _Batch:
        by_seq = {r.seq: r for r in changes}
        covered = [by_seq[seq] for seq in body["seqs"] if seq in by_seq]      # in the batch's order
        sealed = [(UUID(d), v, Attrs.from_doc(a)) for d, v, a in body["sealed"]]
        plan = Plan(body["wires"], [UUID(d) for d in body["appended"]], sealed,
                    UUID(body["scope"]) if body.get("scope") else None)
        return _Batch(UUID(body["batch"]), covered, plan, [UUID(b) for b in body.get("blobs", [])])

    def push(self, record: Record) -> None:
        with self._lock:
            self._queue.append(record)
            self._times[record.seq] = time.time()
            self._seen = max(self._seen, record.seq)
            self._lock.notify_all()

    def take_latest(self, inode: UUID) -> dict | None:
        """(From the policy, for a conflict copy.) Take the queued versions of ``inode``
        out of the queue (each would be refused in turn); returns the last one, which
        holds everything the earlier ones did. Their chunk copies go with the refused
        record's, once the policy is done (``_refused``)."""
        key = str(inode)
        with self._lock:
            gone = [r for r in self._queue if r.body["t"] == "commit" and r.body["inode"] == key]
            self._queue = [r for r in self._queue if r not in gone]
        if not gone:
            return None
        self._taken.extend(gone)
        self._settled([r.seq for r in gone])
        return gone[-1].body

    def cancel_new(self, inode: UUID) -> bool:
        """The last name of a closed file goes: its queued (not yet sent) new versions
        and attribute changes go with it, unsent; and if its create is queued too and
        nothing else queued names it, so does that, and True says the removal need
        not be sent either (rsync's and editors' temporary files; and a file the
        server has no room for, which must not hold up the removals behind it)."""
        key = str(inode)
        with self._lock:
            busy = (self._batch.records if self._batch is not None else []) + self._planning
            if any(key in records.named_inodes(r.body) for r in busy):
                # Not under a request that may be applied; but should the server have
                # no room for it, its content comes back to the queue, and must not
                # stand there before the removals that would make room.
                self._gone_while_busy.add(key)
                return False
            mine = [r for r in self._queue if key in records.named_inodes(r.body)]
            content = [r for r in mine if r.body["t"] in ("commit", "attrs")]
            whole = bool(mine) and mine[0].body["t"] == "create" and \
                all(r.body["t"] in ("create", "commit", "attrs") for r in mine)
            gone = mine if whole else content
            self._queue = [r for r in self._queue if r not in gone]
        self._drop_blobs(gone)
        self._settled([r.seq for r in gone])
        return whole

    def _drop_content_of_gone(self) -> None:
        """(A batch came back unsent.) The queued versions and attribute changes of
        files whose last name went meanwhile: their removal is queued after them."""
        with self._lock:
            gone_keys, self._gone_while_busy = self._gone_while_busy, set()
            gone = [r for r in self._queue if r.body["t"] in ("commit", "attrs") and r.body["inode"] in gone_keys]
            self._queue = [r for r in self._queue if r not in gone]
        self._drop_blobs(gone)
        self._settled([r.seq for r in gone])

    def _settled(self, seqs: list[int]) -> None:
        """These records are on the server (or settled): the journal's done mark moves
        to just below the oldest one still pending."""
        with self._lock:
            for seq in seqs:
                self._times.pop(seq, None)
            done = min(self._times) - 1 if self._times else self._seen
            if not self._times:
                self._replaced.clear()           # nothing left that a waiter could still need
            self._lock.notify_all()
        self.journal.settle(seqs, done)
        try:
            self.policy.settled(done)
        except Exception:   # noqa: BLE001 - the record is settled: a cache update failing must not undo that
            log.exception("journal: updating the mount after a batch failed")
        with self._lock:
            self._lock.notify_all()

    # ------------------------------------------------------------ waiting
    def wait(self, seq: int, timeout: float | None = None) -> bool:
        """Block until the server has every record up to ``seq``; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._waiters += 1
            self._lock.notify_all()
            try:
                while self.journal.done < (seq := self._with_replacements(seq)):
                    if self._tampered is not None:
                        return False         # the server's answer failed its check: EIO now
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._lock.wait(left if left is not None else 1.0)
            finally:
                self._waiters -= 1
        return True

    def _with_replacements(self, seq: int) -> int:
        """(Under the lock.) ``seq``, or past it the last record that settles a refused
        record up to it (and so on: a copy can be refused in turn)."""
        grown = True
        while grown:
            grown = False
            for refused, last in self._replaced:
                if refused <= seq < last:
                    seq, grown = last, True
        return seq

    def drained(self) -> bool:
        with self._lock:
            return not self._queue and self._batch is None

    def snapshot(self) -> Status:
        with self._lock:
            s = self.status
            s.pending = len(self._queue) + (len(self._batch.records) if self._batch else 0)
            firsts = ([self._batch.records[0].seq] if self._batch and self._batch.records else []) + \
                [r.seq for r in self._queue[:1]]
            s.oldest = min((self._times.get(q, time.time()) for q in firsts), default=None)
            s.done, s.last = self.journal.done, self.journal.last_change
        s.pending_bytes = self.journal.pending_bytes()
        return s

    # ------------------------------------------------------------ running
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zkfs-uploader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        pause = 0
        while not self._stop.is_set():
            with self._lock:
                while self._batch is None and not self._queue and not self._stop.is_set():
                    self._lock.wait(1.0)
                # Let a burst gather (rsync, tar, cp -r close files back to back): one
                # request for many, unless someone waits for the server (fsync, --sync).
                gather_until = time.monotonic() + GATHER_SECONDS
                while (self._batch is None and len(self._queue) < MAX_BATCH_RECORDS and not self._waiters
                       and not self._stop.is_set() and time.monotonic() < gather_until):
                    self._lock.wait(gather_until - time.monotonic())
            if self._stop.is_set():
                return
            try:
                self._step()
                pause = 0
                self.status.online, self.status.last_error = True, None
                self._tampered = None
            except TamperedError as exc:
                # Sent again as it was (same id) until the answer checks out; meanwhile
                # whoever waits for the server is told (EIO), not kept waiting.
                self.status.last_error = f"the server's answer failed verification: {exc}"
                log.error("journal: %s", self.status.last_error)
                with self._lock:
                    self._tampered = exc
                    self._lock.notify_all()
                self._stop.wait(_PAUSES[min(pause, len(_PAUSES) - 1)])
                pause += 1
            except Unreachable as exc:
                self.status.online, self.status.last_error = False, str(exc)
                log.warning("journal: the server is away, %d change(s) wait (%s)", self.snapshot().pending, exc)
                if self._pause(_PAUSES[min(pause, len(_PAUSES) - 1)]):
                    pause += 1
            except Exception as exc:    # noqa: BLE001 - the uploader must outlive any one failure
                self.status.last_error = f"{exc.__class__.__name__}: {exc}"
                log.exception("journal: sending failed (will try again)")
                self._stop.wait(_PAUSES[min(pause, len(_PAUSES) - 1)])
                pause += 1

    def _pause(self, seconds: float) -> bool:
        """Wait before trying again; False if the wait ended early because the record
        a full server refused is no longer first in line (its file was removed: the
        removals behind it may make room, and someone may be waiting for them)."""
        deadline = time.monotonic() + seconds
        with self._lock:
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if self._no_room_for is not None and (not self._queue or self._queue[0].seq != self._no_room_for):
                    self._no_room_for = None
                    return False
                self._lock.wait(left)
        return True

    def _step(self) -> None:
        """Send the pending batch, or plan the next one and send it."""
        if self._batch is None:
            self._batch = self._plan_next()
            if self._batch is None:
                return
        batch = self._batch
        try:
            self._upload_blobs(batch)
            results = self.vault.send(batch.plan, batch.id)
        except ServerError as exc:
            if exc.code == "no_space":
                # Nothing of it was applied: back to the queue, where a later unlink can
                # still cancel a new file that does not fit (see cancel_new), and again later.
                self._batch = None
                self._requeue(batch.records)
                self._drop_content_of_gone()
                self._no_room_for = batch.records[0].seq
                self.status.no_space = True
                raise Unreachable(f"the server has no room for it: {exc}") from None
            if exc.status >= 500 or exc.code in ("throttled", "unavailable"):
                raise Unreachable(f"the server refused for now: {exc}") from None
            self._refused(batch, exc)
            return
        self.status.no_space = False
        self._no_room_for = None
        self._done(batch, results)

    def _plan_next(self) -> _Batch | None:
        with self._lock:
            take = list(self._queue[:MAX_BATCH_RECORDS])
            self._planning = take                # cancel_new keeps off these meanwhile
        try:
            return self._plan(take)
        finally:
            with self._lock:
                self._planning = []

    def _plan(self, take: list[Record]) -> _Batch | None:
        if not take:
            return None
        if self.status.no_space:
            # The server is full: the removals queued before the next new content go
            # alone, so the room they free is there when that content comes.
            cut = next((i for i, r in enumerate(take) if r.body["t"] == "commit"), len(take))
            take = take[:max(cut, 1)]
        while True:
            ops = []
            for r in take:
                adopt_record(self.vault, r.body)
                try:
                    ops.append(records.to_op(self.vault, r.body))
                except ShareRefused as exc:      # a share left, or made read-only, since
                    log.error("journal: %s cannot be saved on the server: %s", records.describe(r.body), exc)
                    with self._lock:
                        self._queue.remove(r)
                    self._drop_blobs([r])
                    self._settled([r.seq])
                    return None
            # One transaction is in one account: a member's own files, or one share.
            same = next((i for i, op in enumerate(ops) if op.scope != ops[0].scope), len(ops))
            take, ops = take[:same], ops[:same]
            plan = self.vault.plan_batch(ops)
            size = len(json.dumps(plan.wires))
            if (len(plan.wires) <= MAX_BATCH_WIRES and size <= MAX_BATCH_BYTES) or len(take) == 1:
                break
            take = take[:max(1, len(take) // 2)]
        blobs = list(dict.fromkeys(b for r in take if r.body["t"] == "commit" for b in self._local_blobs(r.body)))
        batch = _Batch(uuid.uuid4(), take, plan, blobs)
        self._write_batch(batch)
        with self._lock:
            planned = {r.seq for r in take}
            self._queue = [r for r in self._queue if r.seq not in planned]
        return batch

    def _write_batch(self, batch: _Batch) -> None:
        """Written (to disk) before it is sent: after a crash it goes again as it was
        (one id, one plan), so an answer the crash lost cannot make it apply twice."""
        seq = self.journal.append({"batch": str(batch.id), "seqs": [r.seq for r in batch.records],
                                   "wires": batch.plan.wires,
                                   "appended": [str(d) for d in batch.plan.appended],
                                   "sealed": [[str(d), v, a.to_doc()] for d, v, a in batch.plan.sealed],
                                   "scope": str(batch.plan.scope) if batch.plan.scope else None,
                                   "blobs": [str(b) for b in batch.blobs]})
        with self._lock:
            self._seen = max(self._seen, seq)

    def _local_blobs(self, body: dict) -> list[UUID]:
        """The chunk tokens of a commit record that only the journal holds (not the
        inline ones: the record carries those)."""
        inline = records.inline_of(body)
        return [c.blob_id for c in records.manifest_of(body).chunks
                if not c.is_hole and c.blob_id not in inline and self.journal.blob_path(c.blob_id).exists()]

    def _upload_blobs(self, batch: _Batch) -> None:
        """The chunk tokens only the journal holds, before the commits that name them."""
        inode_of = {}
        for r in batch.records:
            if r.body["t"] == "commit":
                for c in records.manifest_of(r.body).chunks:
                    inode_of[c.blob_id] = UUID(r.body["inode"])

        def put(blob: UUID) -> None:
            token = self.journal.blob(blob)
            if token is not None:
                self.vault.api.put_blob(inode_of[blob], blob, token, self.vault.scope_of(inode_of[blob]))

        for fut in [self._pool.submit(put, b) for b in batch.blobs if b in inode_of]:
            fut.result()

    def _drop_blobs(self, recs: list[Record], *, sent: bool = False) -> None:
        """The journal's copies of chunks these (sent or settled) records name;
        ``sent``: the server has them, the ciphertext cache keeps them."""
        for r in recs:
            if r.body["t"] == "commit":
                for c in records.manifest_of(r.body).chunks:
                    if c.is_hole:
                        continue
                    if sent and self.keep_sent is not None:
                        token = self.journal.blob(c.blob_id)
                        if token is not None:
                            self.keep_sent(c.blob_id, token)
                    self.journal.drop_blob(c.blob_id)

    def _done(self, batch: _Batch, results: list[dict]) -> None:
        self._batch = None
        with self._lock:
            self._gone_while_busy.clear()        # what they named went to the server
        self._drop_blobs(batch.records, sent=True)
        self._settled([r.seq for r in batch.records])
        with self._lock:
            self.status.sent_records += len(batch.records)
            self.status.sent_batches += 1

    def _refused(self, batch: _Batch, exc: ServerError) -> None:
        """Nothing of the batch was applied. A folder another client changed meanwhile:
        plan it again. Else settle the record the server refuses, then go on."""
        self._batch = None
        if self.vault.folder_changed_meanwhile(batch.plan, exc):
            self._requeue(batch.records)
            return
        index = exc.op_index if exc.op_index is not None and exc.op_index < len(batch.records) else None
        if index is None:
            if len(batch.records) > 1:            # which one is unknown: one at a time
                log.warning("journal: the server refuses a batch of %d change(s) (%s); sending them one at a time",
                            len(batch.records), exc)
                self._requeue(batch.records, single=True)
                return
            index = 0
        bad = batch.records[index]
        log.warning("journal: the server refuses a change (%s): %s", bad.body["t"], exc)
        try:
            instead = self.policy.refused(bad, exc)
        except ZkfsError as err:
            log.error("journal: a refused change could not be settled, it is dropped: %s", err)
            instead = []
        extra = [Record(self.journal.append_nowait(body), body) for body in instead]
        with self._lock:
            for r in extra:
                self._times[r.seq] = time.time()
                self._seen = max(self._seen, r.seq)
            if extra:
                self._replaced.append((bad.seq, extra[-1].seq))
        # What settles it takes its place: a create under a conflict name must come
        # before the records after it that name the same inode.
        self._requeue(batch.records[:index] + extra + batch.records[index + 1:])
        self.policy.queued()
        taken, self._taken = self._taken, []
        self._drop_blobs([r for r in [bad, *taken] if r.body.get("inode") not in self.keep_chunks_of])
        self._settled([bad.seq])

    def _requeue(self, recs: list[Record], *, single: bool = False) -> None:
        with self._lock:
            self._queue = list(recs) + self._queue
            self._lock.notify_all()
        if single and recs:
            # Send the first alone: the next refusal then names it.
            first = recs[0]
            with self._lock:
                self._planning = [first]
            try:
                ops = [records.to_op(self.vault, first.body)]
                plan = self.vault.plan_batch(ops)
                batch = _Batch(uuid.uuid4(), [first], plan, self._local_blobs(first.body)
                               if first.body["t"] == "commit" else [])
                self._write_batch(batch)
                with self._lock:
                    self._queue = [r for r in self._queue if r.seq != first.seq]
                    self._batch = batch
            finally:
                with self._lock:
                    self._planning = []
