"""The version ledger (pure logic): rollback detection that tells a read which
crossed one of our own commits from a server serving an older version."""
from __future__ import annotations

from uuid import uuid4

import pytest

from zkfs.errors import TamperedError
from zkfs.state import VersionLedger
from zkfs.vault import record_written_versions


@pytest.fixture
def ledger(tmp_path):
    led = VersionLedger(tmp_path / "versions.db")
    yield led
    led.close()


def test_a_read_sent_before_our_commit_is_stale_not_a_rollback(ledger):
    inode = uuid4()
    ledger.check(inode, 3)
    since = ledger.epoch()              # a listing is sent ...
    ledger.check(inode, 4)              # ... our commit is acknowledged ...
    assert ledger.check(inode, 3, since) is False      # ... the listing answers v3: ask again
    with pytest.raises(TamperedError):                  # asked again after the commit: v3 is a lie
        ledger.check(inode, 3, ledger.epoch())


def test_an_answer_older_than_what_was_known_when_asked_is_a_rollback(ledger):
    inode = uuid4()
    ledger.check(inode, 5)
    since = ledger.epoch()
    with pytest.raises(TamperedError):
        ledger.check(inode, 4, since)
    with pytest.raises(TamperedError):
        ledger.check(inode, 4)
    other = uuid4()                     # another inode's rise does not excuse this one
    ledger.check(other, 1)
    with pytest.raises(TamperedError):
        ledger.check(inode, 4, since)


def test_versions_survive_a_restart(tmp_path):
    inode = uuid4()
    led = VersionLedger(tmp_path / "v.db")
    led.check(inode, 7)
    led.close()
    led = VersionLedger(tmp_path / "v.db")
    try:
        # (the first older answer is asked again: another process may have written
        # the version it is held against while it was out; the second is a rollback)
        assert led.check(inode, 6, led.epoch()) is False
        with pytest.raises(TamperedError):
            led.check(inode, 6, led.epoch())
        assert led.check(inode, 7) is True
    finally:
        led.close()


def test_a_version_another_process_recorded_while_a_read_was_out_is_asked_again(tmp_path):
    """Two commands of one machine (two parallel uploads into one folder): one records
    version 5 of the folder while the other's read of it, sent before, brings 4. That
    is stale (ask again), not a rollback; the same answer once more is."""
    inode = uuid4()
    first, second = VersionLedger(tmp_path / "v.db"), VersionLedger(tmp_path / "v.db")
    since = second.epoch()                        # the second's read leaves
    first.check(inode, 5)
    first.flush()                                 # the first records its commit
    assert second.check(inode, 4, since) is False
    with pytest.raises(TamperedError, match="back from version 5 to 4"):
        second.check(inode, 4, second.epoch())


def test_a_batch_sent_again_after_a_crash_is_not_a_rollback(ledger):
    """A mount killed after the server applied a batch (and after its answer was
    recorded here), before the journal marked it done, sends the same batch again
    and gets the first answer: a file created and given content in it holds
    versions 1 and 2, and the ledger already holds 2."""
    inode = str(uuid4())
    wires = [{"op": "create", "inode": inode}, {"op": "commit", "inode": inode, "base_version": 1}]
    results = [{"inode": inode, "version": 1}, {"inode": inode, "version": 2}]
    assert record_written_versions(ledger, wires, results) is None       # the first time
    assert record_written_versions(ledger, wires, results) is None       # again, same answer
    with pytest.raises(TamperedError):                                    # a real rollback still is one
        record_written_versions(ledger, [wires[0]], [results[0]])
