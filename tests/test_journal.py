"""The write-back journal and its uploader without FUSE and without a server
(pure logic; the end-to-end tests are tests/test_mount_journal.py).

The uploader is driven through an in-memory stand-in of the vault: it records
the batches it is sent and can be told to be away or to refuse an op."""
from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from zkfs import crypto
from zkfs.errors import ServerError, Unreachable
from zkfs.mount import records
from zkfs.mount.journal import Journal, JournalError, KeyWrap, Record
from zkfs.mount.uploader import Uploader
from zkfs.ops import Op, Plan

ROOT = uuid.uuid4()


class Keyring:
    def __init__(self):
        self.current_gen = 1
        self.masters = {1: crypto.random_key()}


def journal(tmp_path: Path, keyring: Keyring | None = None) -> Journal:
    return Journal(tmp_path / "journal", KeyWrap(keyring or Keyring(), ROOT))


def link_body(name: str) -> dict:
    return records.link(uuid.uuid4(), ROOT, name, 1)


# ---------------------------------------------------------------- the journal on disk
def test_records_come_back_after_a_crash_until_settled(tmp_path):
    keys = Keyring()
    j = journal(tmp_path, keys)
    seqs = [j.append(link_body(f"n{i}")) for i in range(5)]
    j.settle(seqs[:2], seqs[1])
    j.settle([seqs[3]], seqs[1])
    j.close()
    again = journal(tmp_path, keys)
    left = again.unsent()
    assert [r.seq for r in left] == [seqs[2], seqs[4]]
    assert [r.body["name"] for r in left] == ["n2", "n4"]
    assert again.last > seqs[-1]                 # numbering goes on
    again.close()


def test_nothing_in_plaintext_and_a_foreign_key_is_refused(tmp_path):
    j = journal(tmp_path)
    j.append(link_body("secret-name.txt"))
    j.close()
    assert b"secret-name" not in (tmp_path / "journal" / "log").read_bytes()
    with pytest.raises(JournalError, match="does not open"):
        journal(tmp_path, Keyring())              # another account's keys


def test_a_cut_tail_is_dropped_and_anything_else_is_tampering(tmp_path):
    keys = Keyring()
    j = journal(tmp_path, keys)
    for i in range(3):
        j.append(link_body(f"n{i}"))
    j.close()
    log = tmp_path / "journal" / "log"
    whole = log.read_bytes()
    log.write_bytes(whole[:-7])                   # a crash in the middle of the last write
    cut = journal(tmp_path, keys)
    assert [r.body["name"] for r in cut.unsent()] == ["n0", "n1"]
    cut.close()
    data = bytearray(log.read_bytes())
    data[10] ^= 1
    log.write_bytes(bytes(data))
    with pytest.raises(JournalError, match="tampered"):
        journal(tmp_path, keys)


def test_records_replayed_in_another_order_are_refused(tmp_path):
    keys = Keyring()
    j = journal(tmp_path, keys)
    a, b = (j._encode(1, link_body("a")), j._encode(2, link_body("b")))
    j.close()
    (tmp_path / "journal" / "log").write_bytes(b + a)
    with pytest.raises(JournalError, match="out of order"):
        journal(tmp_path, keys)


def test_group_commit_many_waiters_one_journal(tmp_path):
    j = journal(tmp_path)
    seqs: list[int] = []
    lock = threading.Lock()

    def writer():
        for _ in range(50):
            s = j.append(link_body("x"))
            with lock:
                seqs.append(s)
    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 401))
    j.close()


# ---------------------------------------------------------------- the uploader
class FakeVault:
    """Builds an op per record and answers batches as told (in memory)."""

    def __init__(self):
        self.sent: list[tuple[uuid.UUID, list[str]]] = []
        self.away = False
        self.refuse: str | None = None            # a name whose op the server refuses
        self.answers: dict[uuid.UUID, list] = {}
        self.no_room: set[str] = set()            # names of ops the server has no room for
        self.found_no_room = threading.Event()
        self.sending = threading.Event()          # set while a send is held (``hold``)
        self.hold = threading.Event()             # cleared: the next send waits for it
        self.hold.set()

    def op_link(self, inode, parent, name, *, at_ns=None) -> Op:
        return Op({"op": "link", "name": name})

    def op_create(self, parent, name, inode, attrs, file_key=None, *, at_ns=None) -> Op:
        return Op({"op": "create", "name": name})

    def op_unlink(self, parent, name, inode, *, keep_orphan=False, at_ns=None) -> Op:
        return Op({"op": "unlink", "name": name})

    def op_commit(self, inode, base, attrs, manifest, inline, *, token) -> Op:
        return Op({"op": "commit", "name": f"commit {inode}"})

    def plan_batch(self, ops: list[Op]) -> Plan:
        return Plan([op.wire for op in ops], [])

    def folder_changed_meanwhile(self, plan, exc) -> bool:
        return False

    def send(self, plan: Plan, batch_id: uuid.UUID) -> list[dict]:
        if self.away:
            raise Unreachable("the server is away")
        if not self.hold.is_set():
            self.sending.set()
            assert self.hold.wait(10)
        names = [w["name"] for w in plan.wires]
        if self.no_room & set(names):
            self.found_no_room.set()
            raise ServerError(507, "no_space", "server storage is full")
        if self.refuse in names:
            raise ServerError(409, "exists", "taken", op_index=names.index(self.refuse))
        if batch_id in self.answers:              # the server applies a batch id once
            return self.answers[batch_id]
        self.sent.append((batch_id, names))
        self.answers[batch_id] = [{} for _ in names]
        return self.answers[batch_id]


class RecordingPolicy:
    def __init__(self):
        self.refusals: list[str] = []
        self.done = 0

    def refused(self, record: Record, exc: ServerError) -> list[dict]:
        self.refusals.append(record.body["name"])
        return [link_body(record.body["name"] + " (conflict)")]

    def settled(self, done: int) -> None:
        self.done = done

    def queued(self) -> None:
        pass


def feed(j: Journal, up: Uploader, names: list[str]) -> int:
    seq = 0
    for name in names:
        body = link_body(name)
        seq = j.append_nowait(body)
        up.push(Record(seq, body))
    return seq


def test_many_records_one_request_in_order(tmp_path):
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    up = Uploader(vault, j, policy)
    last = feed(j, up, [f"n{i}" for i in range(900)])
    up.start()
    assert up.wait(last, 30)
    up.stop()
    names = [n for _, batch in vault.sent for n in batch]
    assert names == [f"n{i}" for i in range(900)]
    assert len(vault.sent) <= 3                   # hundreds per request
    assert policy.done >= last and up.drained()
    j.close()


def test_away_then_back_and_a_refused_record_is_settled_by_the_policy(tmp_path):
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    vault.away = True
    up = Uploader(vault, j, policy)
    up.start()
    last = feed(j, up, ["a", "b", "taken", "c"])
    assert not up.wait(last, 1.0)
    assert not up.snapshot().online and up.snapshot().pending == 4
    vault.refuse = "taken"
    vault.away = False
    assert up.wait(j.last_change, 30)
    up.stop()
    assert policy.refusals == ["taken"]
    names = [n for _, batch in vault.sent for n in batch]
    assert names == ["a", "b", "taken (conflict)", "c"]        # in the place of the refused one
    j.close()


def test_a_batch_whose_answer_was_lost_is_sent_again_as_it_was(tmp_path):
    """The mount dies after the batch went out, before its answer was settled:
    the next start sends the same batch id, which the server applies once."""
    keys = Keyring()
    j, vault = journal(tmp_path, keys), FakeVault()
    up = Uploader(vault, j, RecordingPolicy())
    feed(j, up, ["a", "b"])
    up._batch = up._plan_next()                   # planned and written to the journal...
    vault.send(up._batch.plan, up._batch.id)      # ...and applied, its answer lost: a crash
    first_id = up._batch.id
    j.close()
    j2, policy = journal(tmp_path, keys), RecordingPolicy()
    up2 = Uploader(vault, j2, policy)
    up2.load(j2.unsent())
    up2.start()
    assert up2.wait(j2.last_change, 30)
    up2.stop()
    assert [batch_id for batch_id, _ in vault.sent] == [first_id]     # applied once
    j2.close()
    j3 = journal(tmp_path, keys)
    assert j3.unsent() == []
    j3.close()


def test_a_file_removed_while_its_batch_is_planned_is_not_cancelled_under_it(tmp_path):
    """A removal may cancel a new file's queued records, but not while they are being
    planned into a batch: that batch sends them (then the removal must be sent too),
    and the queue loses nothing else (it lost records, and mount.py --wait hung)."""
    from zkfs.vault import new_attrs
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    planning, go = threading.Event(), threading.Event()
    plan = vault.plan_batch

    def slow_plan(ops):
        planning.set()
        go.wait(5)
        return plan(ops)
    vault.plan_batch = slow_plan
    up = Uploader(vault, j, policy)
    inode = uuid.uuid4()
    body = records.create(ROOT, "tmp", inode, new_attrs(0o100644), None, 1)
    seq = j.append_nowait(body)
    up.push(Record(seq, body))
    last = feed(j, up, ["a", "b"])
    up.start()
    assert planning.wait(5)
    assert up.cancel_new(inode) is False          # in the batch being planned: it goes
    go.set()
    assert up.wait(last, 30)
    up.stop()
    assert [n for _, batch in vault.sent for n in batch] == ["tmp", "a", "b"]
    j.close()


def test_waiting_for_a_refused_record_waits_for_its_conflict_copy(tmp_path):
    """An unmount or `mount.py --wait` waits for the last change; when the server
    refuses it, the copy that replaces it comes later in the journal and must be on
    the server too before the wait ends (else the unmount left it in the journal)."""
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    vault.refuse = "taken"
    sent = vault.send

    def slow_copies(plan, batch_id):
        if any("(conflict)" in w["name"] for w in plan.wires):
            time.sleep(0.5)
        return sent(plan, batch_id)

    vault.send = slow_copies
    up = Uploader(vault, j, policy)
    up.start()
    assert up.wait(feed(j, up, ["a"]), 30)
    assert up.wait(feed(j, up, ["taken"]), 30)
    names = [n for _, batch in vault.sent for n in batch]
    up.stop()
    assert names == ["a", "taken (conflict)"]
    j.close()


def test_a_file_removed_while_its_version_finds_no_room_does_not_hold_up_what_follows(tmp_path):
    # rm of a file whose upload the full server is refusing, made while that upload is
    # in flight: its version must not stay queued before the removals that make room
    # (the mount then kept retrying it for ever, and `rm` freed nothing).
    import stat

    from zkfs.format import Attrs, Manifest
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    huge = uuid.uuid4()
    vault.no_room = {f"commit {huge}"}
    vault.hold.clear()
    up = Uploader(vault, j, policy)
    up.start()
    version = records.commit(huge, 1, Attrs(mode=stat.S_IFREG | 0o644, version=2), Manifest(huge), {}, b"token")
    up.push(Record(j.append_nowait(version), version))
    assert vault.sending.wait(10)                 # its batch is out
    assert not up.cancel_new(huge)                # (so the removal is sent)
    removal = records.unlink(ROOT, "huge.bin", huge, False, 1)
    up.push(Record(j.append_nowait(removal), removal))
    last = feed(j, up, ["after"])
    vault.hold.set()
    assert up.wait(last, 10), "the removal and what came after it wait behind a version with no room"
    up.stop()
    assert [n for _, batch in vault.sent for n in batch] == ["huge.bin", "after"]
    j.close()


def test_removing_a_file_the_full_server_refused_sends_the_removals_at_once(tmp_path, monkeypatch):
    # After "no room", the uploader waits before trying again (up to 30 s); the rm
    # that takes the refused file out of the line must not wait for that pause (a
    # --sync create behind it gave ENOSPC after 10 s, the room freed just after).
    import stat

    from zkfs.format import Attrs, Manifest
    from zkfs.mount import uploader as uploader_module
    monkeypatch.setattr(uploader_module, "_PAUSES", (30,))
    j, vault, policy = journal(tmp_path), FakeVault(), RecordingPolicy()
    huge = uuid.uuid4()
    vault.no_room = {f"commit {huge}"}
    up = Uploader(vault, j, policy)
    up.start()
    version = records.commit(huge, 1, Attrs(mode=stat.S_IFREG | 0o644, version=2), Manifest(huge), {}, b"token")
    up.push(Record(j.append_nowait(version), version))
    assert vault.found_no_room.wait(10)
    time.sleep(0.2)                               # in its pause now
    assert not up.cancel_new(huge)
    removal = records.unlink(ROOT, "huge.bin", huge, False, 1)
    up.push(Record(j.append_nowait(removal), removal))
    assert up.wait(j.last_change, 5), "the removal waited for the pause after the refusal"
    up.stop()
    assert [n for _, batch in vault.sent for n in batch] == ["huge.bin"]
    j.close()


# ---------------------------------------------------------------- the write-back front
class SealedFile:
    """An open file whose content is all journaled already (what a release finds
    after close() returned)."""
    sealed = True

    def settle_uploads(self) -> None:
        pass


def test_a_release_with_nothing_to_journal_does_not_wait_for_the_namespace_lock(tmp_path):
    # A utimens holds the namespace lock and waits for the file's lock, which the
    # release holds: a release that then waited for the namespace lock deadlocked.
    from types import SimpleNamespace

    from zkfs.mount.writeback import WriteBack
    ns_lock = threading.RLock()
    j = journal(tmp_path)
    wb = WriteBack(FakeVault(), SimpleNamespace(), None, ns_lock, "host", j)
    held, done = threading.Event(), threading.Event()

    def utimens_holding_the_namespace_lock():
        with ns_lock:
            held.set()
            done.wait(30)

    other = threading.Thread(target=utimens_holding_the_namespace_lock)
    other.start()
    assert held.wait(10)
    answer: list[int] = []
    release = threading.Thread(target=lambda: answer.append(wb.seal(SealedFile())), daemon=True)
    release.start()
    release.join(5)
    finished = not release.is_alive()
    done.set()
    other.join()
    j.close()
    assert finished and answer == [0]
