"""The version ledger (pure logic): rollback detection that tells a read which
crossed one of our own commits from a server serving an older version."""
from __future__ import annotations

from uuid import uuid4

import pytest

from zkfs.errors import TamperedError
from zkfs.state import VersionLedger


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
        with pytest.raises(TamperedError):
            led.check(inode, 6, led.epoch())
        assert led.check(inode, 7) is True
    finally:
        led.close()
