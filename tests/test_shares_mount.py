"""Shared folders through real FUSE mounts: a member's mount shows the folder under
/Shared/<owner>/<folder>/ and it behaves like the member's own files (reads,
writes, renames and hard links inside it, the change feed both ways, conflict
copies; moving in or out is EXDEV, so mv copies); a read-only member gets EACCES;
after unshare the folder leaves the removed member's mount within seconds, and
what the others write afterwards opens with no key the removed member held."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket

import pytest

from clitools import assert_ok, ls_names
from mount_helpers import Mounts, mounts, wait_until  # noqa: F401 (fixture)
from sharetools import assert_nothing_opens, member_keys, stored_tokens

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


WATCHDOG_SECONDS = 150   # the mounts fixture kills hung daemons after this


def _errno(fn) -> int:
    with pytest.raises(OSError) as exc:
        fn()
    return exc.value.errno


def _shared_projects(server, mounts: Mounts, tmp_path, *members: tuple[str, bool]):
    """alice with a /Projects folder shared with new users (name, read-only?)."""
    alice = mounts.machine(server)
    src = tmp_path / "Projects"
    (src / "sub").mkdir(parents=True)
    (src / "plan.txt").write_bytes(b"the plan\n")
    (src / "sub" / "data.bin").write_bytes(os.urandom(2_500_000))
    assert_ok(alice.run("upload", "-r", str(src)))
    people = []
    for _name, read_only in members:
        m = mounts.machine(server)
        assert_ok(alice.run("share", "/Projects", m.username, *(["--read-only"] if read_only else [])))
        people.append(m)
    return alice, src, people


def test_a_members_mount_works_like_its_own_files(server, mounts, tmp_path):
    alice, src, (bob, dave) = _shared_projects(server, mounts, tmp_path, ("bob", False), ("dave", True))
    a, b, d = mounts.mount(alice), mounts.mount(bob), mounts.mount(dave)
    mine = a.path / "Projects"
    theirs = b.path / "Shared" / alice.username / "Projects"
    assert sorted(os.listdir(b.path)) == ["Shared"]
    assert sorted(os.listdir(b.path / "Shared")) == [alice.username]
    assert sorted(os.listdir(theirs)) == ["plan.txt", "sub"]
    assert (theirs / "sub" / "data.bin").read_bytes() == (src / "sub" / "data.bin").read_bytes()

    # writes and renames, each way, seen by the other within seconds (the change feed)
    (theirs / "from-bob.txt").write_bytes(b"bob wrote this\n")
    wait_until(lambda: (mine / "from-bob.txt").read_bytes() == b"bob wrote this\n", 6, what="bob's file at alice's")
    (mine / "from-alice.txt").write_bytes(b"alice wrote this\n")
    wait_until(lambda: (theirs / "from-alice.txt").read_bytes() == b"alice wrote this\n", 6,
               what="alice's file at bob's")
    os.rename(theirs / "plan.txt", theirs / "sub" / "plan.txt")
    wait_until(lambda: sorted(os.listdir(mine / "sub")) == ["data.bin", "plan.txt"], 6, what="bob's rename")
    with open(theirs / "sub" / "data.bin", "r+b") as f:          # an edit in place
        f.seek(1_000_000)
        f.write(b"EDITED BY BOB")
    wait_until(lambda: b"EDITED BY BOB" in (mine / "sub" / "data.bin").read_bytes(), 6, what="bob's edit")

    # hard links inside it; nothing moves in or out (EXDEV: mv copies instead)
    os.link(theirs / "sub" / "plan.txt", theirs / "plan-link.txt")
    assert os.stat(theirs / "plan-link.txt").st_nlink == 2
    wait_until(lambda: (mine / "plan-link.txt").read_bytes() == b"the plan\n", 6, what="the link")
    assert _errno(lambda: os.rename(theirs / "from-bob.txt", b.path / "out.txt")) == errno.EXDEV
    assert _errno(lambda: os.link(theirs / "from-bob.txt", b.path / "out.txt")) == errno.EXDEV
    (b.path / "own.txt").write_bytes(b"bob's own\n")
    shutil.move(b.path / "own.txt", theirs / "own.txt")          # copied over, then removed
    assert not (b.path / "own.txt").exists()
    wait_until(lambda: (mine / "own.txt").read_bytes() == b"bob's own\n", 6, what="bob's moved file")
    assert _errno(lambda: os.mkdir(b.path / "Shared" / "mine")) == errno.EACCES
    assert _errno(lambda: os.rename(theirs, b.path / "Projects")) in (errno.EACCES, errno.EXDEV)

    # conflict copies, as between two mounts of one account
    wait_until(lambda: (mine / "from-alice.txt").read_bytes() == (theirs / "from-alice.txt").read_bytes(), 6)
    fa = os.open(mine / "from-alice.txt", os.O_RDWR)
    fb = os.open(theirs / "from-alice.txt", os.O_RDWR)
    try:
        os.pwrite(fa, b"alice's edit\n", 0)
        os.ftruncate(fa, 13)
        os.pwrite(fb, b"bob's concurrent edit\n", 0)
        os.ftruncate(fb, 22)
    finally:
        os.close(fa)
        os.close(fb)
    pattern = re.compile(rf"^from-alice \(conflict \S+ \S+ {re.escape(socket.gethostname())} [0-9a-f]{{4}}\)\.txt$")

    def copies(root):
        found = [n for n in os.listdir(root) if pattern.match(n)]
        return found and ((root / "from-alice.txt").read_bytes(), (root / found[0]).read_bytes())
    for root in (theirs, mine):
        got = wait_until(lambda: copies(root), 8, what=f"the conflict copy in {root}")
        # whichever reached the server first keeps the name, the other is the copy
        assert sorted(got) == [b"alice's edit\n", b"bob's concurrent edit\n"]

    # dave reads, and may not write: EACCES from his mount (the server refuses too: test_shares.py)
    seen = d.path / "Shared" / alice.username / "Projects"
    wait_until(lambda: (seen / "own.txt").read_bytes() == b"bob's own\n", 6, what="dave reads")
    assert _errno(lambda: open(seen / "own.txt", "wb")) == errno.EACCES
    assert _errno(lambda: (seen / "new.txt").write_bytes(b"x")) == errno.EACCES
    assert _errno(lambda: os.mkdir(seen / "d")) == errno.EACCES
    assert _errno(lambda: os.rename(seen / "own.txt", seen / "o.txt")) == errno.EACCES
    assert _errno(lambda: os.chmod(seen / "own.txt", 0o600)) == errno.EACCES
    assert _errno(lambda: os.unlink(seen / "own.txt")) == errno.EACCES


def test_unshare_takes_the_folder_out_of_the_members_mount_within_seconds(server, mounts, tmp_path):
    alice, _src, (bob, carol) = _shared_projects(server, mounts, tmp_path, ("bob", False), ("carol", False))
    a, b, c = mounts.mount(alice), mounts.mount(bob), mounts.mount(carol)
    theirs = b.path / "Shared" / alice.username / "Projects"
    assert (theirs / "plan.txt").read_bytes() == b"the plan\n"
    old = member_keys(bob)
    before = stored_tokens(server)

    assert_ok(alice.run("unshare", "/Projects", bob.username))
    wait_until(lambda: not (b.path / "Shared").exists(), 6, what="the folder gone from bob's mount")
    assert os.listdir(b.path) == []

    # alice (through her mount, which follows the new generation) and carol go on
    mine = a.path / "Projects"
    with open(mine / "sub" / "data.bin", "r+b") as f:           # a new version of an old file
        f.write(b"AFTER")
    (mine / "new.txt").write_bytes(b"after the unshare\n")
    seen = c.path / "Shared" / alice.username / "Projects"
    wait_until(lambda: (seen / "new.txt").read_bytes() == b"after the unshare\n", 6, what="carol sees it")
    assert (seen / "sub" / "data.bin").read_bytes()[:5] == b"AFTER"
    (seen / "carol.txt").write_bytes(b"carol after\n")
    os.rename(seen / "plan.txt", seen / "plan-2.txt")
    wait_until(lambda: (mine / "carol.txt").read_bytes() == b"carol after\n", 6, what="alice sees carol's")
    a.unmount()
    c.unmount()
    assert_nothing_opens(stored_tokens(server) - before, old)


def test_a_members_offline_changes_reach_the_share_after_a_killed_mount(server, mounts, tmp_path):
    """bob changes alice's shared folder with the server away, his mount is
    SIGKILLed, the server comes back, his mount restarts: it sends the changes it
    journaled into the share, sealed under the share's keys, before serving."""
    alice, src, (bob,) = _shared_projects(server, mounts, tmp_path, ("bob", False))
    b = mounts.mount(bob, "--retry-seconds", "3")
    theirs = b.path / "Shared" / alice.username / "Projects"
    assert (theirs / "plan.txt").read_bytes() == b"the plan\n"
    assert (theirs / "sub" / "data.bin").read_bytes() == (src / "sub" / "data.bin").read_bytes()   # its key known
    server.stop()
    try:
        (theirs / "offline.txt").write_bytes(b"written with the server away\n")
        os.mkdir(theirs / "made offline")
        os.rename(theirs / "plan.txt", theirs / "made offline" / "plan.txt")
        with open(theirs / "sub" / "data.bin", "r+b") as f:
            f.write(b"OFFLINE EDIT")
        b.kill()
    finally:
        server.start()
    b.unmount()                                   # the dead mount goes; its journal stays
    b = mounts.mount(bob, "--retry-seconds", "30", path=b.path)      # replays before serving
    assert "everything is on the server" in b.status()
    assert ls_names(alice, "/Projects") == ["made offline/", "offline.txt", "sub/"]
    got = tmp_path / "got"
    assert_ok(alice.run("download", "/Projects/offline.txt", "-o", str(got)))
    assert got.read_bytes() == b"written with the server away\n"
    assert_ok(alice.run("download", "/Projects/made offline/plan.txt", "-o", str(got)))
    assert got.read_bytes() == b"the plan\n"
    assert_ok(alice.run("download", "/Projects/sub/data.bin", "-o", str(got)))
    assert got.read_bytes()[:12] == b"OFFLINE EDIT" and got.read_bytes()[12:] == (src / "sub" / "data.bin").read_bytes()[12:]
    assert "cannot be saved" not in b.log() and "refuses" not in b.log(), b.log()


def test_a_members_offline_edit_that_conflicts_becomes_a_copy_in_the_share(server, mounts, tmp_path):
    """bob edits a file of alice's shared folder with the server away; alice saves
    another version meanwhile. When bob's mount sends its journal, the server
    refuses his version and the mount saves it as a conflict copy: in the share,
    beside alice's (the copy's records are made by the uploader, not by a call)."""
    alice, src, (bob,) = _shared_projects(server, mounts, tmp_path, ("bob", False))
    b = mounts.mount(bob, "--retry-seconds", "3")
    theirs = b.path / "Shared" / alice.username / "Projects"
    assert (theirs / "plan.txt").read_bytes() == b"the plan\n"
    server.stop()
    try:
        (theirs / "plan.txt").write_bytes(b"bob's plan, written offline\n")
        b.kill()
    finally:
        server.start()
    b.unmount()                                   # the dead mount goes; its journal stays
    mine = tmp_path / "alice" / "plan.txt"
    mine.parent.mkdir()
    mine.write_bytes(b"alice's plan\n")
    assert_ok(alice.run("upload", str(mine), "--to", "/Projects"))
    b = mounts.mount(bob, "--retry-seconds", "30", path=b.path)      # replays before serving
    names = ls_names(alice, "/Projects")
    copies = [n for n in names if re.fullmatch(r"plan \(conflict .*\)\.txt", n)]
    assert len(copies) == 1 and "plan.txt" in names, (names, b.log()[-3000:])
    got = tmp_path / "got"
    assert_ok(alice.run("download", "/Projects/plan.txt", "-o", str(got)))
    assert got.read_bytes() == b"alice's plan\n"
    assert_ok(alice.run("download", f"/Projects/{copies[0]}", "-o", str(got)))
    assert got.read_bytes() == b"bob's plan, written offline\n"
    assert sorted(os.listdir(theirs)) == sorted(n.rstrip("/") for n in names)
