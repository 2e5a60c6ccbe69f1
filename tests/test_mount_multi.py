"""Several mounts of one account: propagation between two concurrent mounts,
conflict copies, and recovery after the mount daemon is SIGKILLed."""
from __future__ import annotations

import errno
import os
import re
import socket
import time

import pytest

from harness import Machine
from mount_helpers import Mounts, mounts, sha256_file, wait_until  # noqa: F401 (fixture)
from netem import NetemProxy


WATCHDOG_SECONDS = 120   # the mounts fixture kills hung daemons after this


def second_machine(mounts: Mounts, first: Machine, server) -> Machine:
    """Another installation logged into the same account."""
    other = mounts.machine(server, register=False)
    other.login(first.username, first.password)
    return other


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.mark.backends
def test_two_mounts_see_each_others_changes(shared_server, mounts):
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a, b = mounts.mount(a_machine), mounts.mount(b_machine)
    assert listing(a.path) == listing(b.path) == []

    # A new file, with its content, shows up on the other side within a few seconds.
    t0 = time.monotonic()
    (a.path / "from a.txt").write_bytes(b"written in A\n")
    wait_until(lambda: (b.path / "from a.txt").read_bytes() == b"written in A\n", 4, what="A's file in B")
    assert time.monotonic() - t0 < 4

    # Rename (into a new folder) and delete, both directions.
    (a.path / "folder").mkdir()
    os.rename(a.path / "from a.txt", a.path / "folder" / "renamed.txt")
    wait_until(lambda: not (b.path / "from a.txt").exists()
               and (b.path / "folder" / "renamed.txt").read_bytes() == b"written in A\n", 4,
               what="A's rename in B")
    (b.path / "folder" / "from b.bin").write_bytes(os.urandom(10) * 200_000)
    expected = (b.path / "folder" / "from b.bin").read_bytes()
    wait_until(lambda: (a.path / "folder" / "from b.bin").read_bytes() == expected, 4, what="B's file in A")
    os.unlink(b.path / "folder" / "renamed.txt")
    wait_until(lambda: listing(a.path / "folder") == ["from b.bin"], 4, what="B's delete in A")

    # A changed file is read fresh by the other mount (close-to-open).
    with open(a.path / "folder" / "from b.bin", "r+b") as f:
        f.seek(1_000_000)
        f.write(b"EDITED BY A")
    edited = bytearray(expected)
    edited[1_000_000:1_000_011] = b"EDITED BY A"
    wait_until(lambda: (b.path / "folder" / "from b.bin").read_bytes() == edited, 4, what="A's edit in B")
    (b.path / "folder" / "from b.bin").unlink()
    os.rmdir(b.path / "folder")
    wait_until(lambda: listing(a.path) == [], 4, what="B's rmdir in A")


def test_listing_read_ahead_yields_to_the_change_feed(shared_server, mounts):
    """Listing a folder makes a mount read its subfolders' listings ahead; one
    that another mount changes meanwhile is dropped, not shown stale."""
    a_machine = mounts.machine(shared_server)
    a = mounts.mount(a_machine)
    (a.path / "top" / "sub").mkdir(parents=True)
    (a.path / "top" / "sub" / "old.txt").write_text("old")
    b = mounts.mount(second_machine(mounts, a_machine, shared_server))
    assert listing(b.path / "top") == ["sub"]         # B now reads "sub" ahead
    time.sleep(0.5)
    (a.path / "top" / "sub" / "new.txt").write_text("new")
    (a.path / "top" / "marker").write_text("")
    # Once B shows the later change, its change feed has passed the earlier one.
    wait_until(lambda: listing(b.path / "top") == ["marker", "sub"], 4, what="A's marker in B")
    assert listing(b.path / "top" / "sub") == ["new.txt", "old.txt"]


def test_mount_follows_a_rotate_key_run_elsewhere(shared_server, mounts, tmp_path):
    """rotate-key on another machine re-wraps every file key under a new master key
    and deletes the old one. A running mount keeps reading files it had not opened
    yet (their keys now name a generation it did not have) and publishes new files
    under the new generation (the old one is gone: the server would refuse it)."""
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a = mounts.mount(a_machine)
    src = tmp_path / "from-b.txt"
    src.write_text("uploaded by B before the rotation\n")
    b_machine.run("upload", str(src))
    wait_until(lambda: "from-b.txt" in listing(a.path), 4, what="B's upload in A")

    b_machine.run("rotate-key", "--password-stdin", input=b_machine.password + "\n")
    # A never opened this file: its key is wrapped under generation 2 only.
    assert (a.path / "from-b.txt").read_text() == "uploaded by B before the rotation\n"
    (a.path / "after-1.txt").write_text("A, after the first rotation\n")

    b_machine.run("rotate-key", "--password-stdin", input=b_machine.password + "\n")
    # Without reading anything first: A learns generation 3 from the change feed.
    wait_until(lambda: "master key generation 2 -> 3" in a.log(), 4, what="the new generation in A's log")
    (a.path / "after-2.txt").write_text("A, after the second rotation\n")

    # Nothing is left under an old generation (rotate-key deletes them), and
    # a fresh machine reads everything.
    b_machine.run("rotate-key", "--password-stdin", input=b_machine.password + "\n")
    fresh = mounts.mount(second_machine(mounts, a_machine, shared_server))
    assert (fresh.path / "after-1.txt").read_text() == "A, after the first rotation\n"
    assert (fresh.path / "after-2.txt").read_text() == "A, after the second rotation\n"
    assert (fresh.path / "from-b.txt").read_text() == "uploaded by B before the rotation\n"


def test_written_back_rename_refused_by_the_server(shared_server, mounts):
    """A rename goes to the server through the journal. If another mount deletes the
    file before it arrives (here: A is cut off meanwhile), the server refuses the
    rename: the mount logs it and shows the server's names again (the delete wins,
    as if it had come first)."""
    with NetemProxy(int(shared_server.url.rsplit(":", 1)[1])) as link:
        first = mounts.machine(shared_server)
        a_machine = Machine(first.home, link.url)          # the same account, through the link
        a_machine.login(first.username, first.password)
        b_machine = second_machine(mounts, first, shared_server)
        a, b = mounts.mount(a_machine, "--retry-seconds", "3"), mounts.mount(b_machine)
        (a.path / "doomed.txt").write_text("x")
        (a.path / "kept.txt").write_text("kept")
        wait_until(lambda: listing(b.path) == ["doomed.txt", "kept.txt"], 4, what="A's files in B")
        link.set_down(True)
        os.rename(a.path / "doomed.txt", a.path / "renamed.txt")
        os.unlink(b.path / "doomed.txt")                 # reaches the server first
        b.settle()
        link.set_down(False)
        wait_until(lambda: "rename doomed.txt -> renamed.txt could not be saved on the server"
                   in a.log(), 10, what="the refused rename in A's log")
        wait_until(lambda: listing(a.path) == ["kept.txt"], 4, what="the server's names in A")
        assert listing(b.path) == ["kept.txt"]
        a.unmount()


@pytest.mark.backends
def test_concurrent_edits_of_one_file_keep_both_versions(shared_server, mounts):
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a, b = mounts.mount(a_machine), mounts.mount(b_machine)
    (a.path / "doc.txt").write_bytes(b"the base version\n")
    wait_until(lambda: (b.path / "doc.txt").read_bytes() == b"the base version\n", 4, what="base in B")

    mine, theirs = b"version written by A\n", b"B's version, written at the same time\n"
    fa = os.open(a.path / "doc.txt", os.O_RDWR)
    fb = os.open(b.path / "doc.txt", os.O_RDWR)
    try:
        os.pwrite(fa, mine, 0)
        os.ftruncate(fa, len(mine))
        os.pwrite(fb, theirs, 0)
        os.ftruncate(fb, len(theirs))
    finally:
        os.close(fa)              # A commits first ...
        a.settle()
        os.close(fb)              # ... so B's commit is the one that finds the conflict

    host = re.escape(socket.gethostname())
    pattern = re.compile(rf"^doc \(conflict \S+ \S+ {host} [0-9a-f]{{4}}\)\.txt$")

    def both_versions(root):
        names = listing(root)
        copies = [n for n in names if pattern.match(n)]
        if len(names) != 2 or len(copies) != 1 or "doc.txt" not in names:
            return None
        return (root / "doc.txt").read_bytes(), (root / copies[0]).read_bytes()

    for m in (b, a):
        got = wait_until(lambda: both_versions(m.path), 5, what=f"both versions in {m.path}")
        assert got == (mine, theirs), (listing(m.path), got)
    assert "conflict" in b.log()

    # Both mounts go on working with the file normally afterwards.
    (b.path / "doc.txt").write_bytes(b"settled\n")
    wait_until(lambda: (a.path / "doc.txt").read_bytes() == b"settled\n", 4, what="later edit in A")
    assert len(listing(a.path)) == 2


def test_a_descriptor_held_open_does_not_hide_newer_versions(shared_server, mounts):
    """Close-to-open holds while some process keeps the file open: a new open (and
    stat) in A sees B's newer version, and an append in A extends it (no conflict)."""
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a, b = mounts.mount(a_machine), mounts.mount(b_machine)
    (a.path / "f").write_bytes(b"version one\n")
    wait_until(lambda: (b.path / "f").read_bytes() == b"version one\n", 4, what="version one in B")
    two = b"version two, longer\n"
    held = os.open(a.path / "f", os.O_RDONLY)
    try:
        (b.path / "f").write_bytes(two)
        wait_until(lambda: (a.path / "f").read_bytes() == two, 4, what="version two in A")
        assert os.stat(a.path / "f").st_size == len(two)
        with open(a.path / "f", "ab") as f:
            f.write(b"appended in A\n")
    finally:
        os.close(held)
    wait_until(lambda: (b.path / "f").read_bytes() == two + b"appended in A\n", 4, what="A's append in B")
    assert listing(a.path) == ["f"]


def test_appends_through_a_held_descriptor_stay_at_its_files_end(shared_server, mounts):
    """Another mount replaces the file by rename while A appends through a descriptor
    held open: A's appends extend A's file (kept as a conflict copy), never land at
    the offset of the new file's size (libfuse2 shares one kernel inode per path)."""
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a, b = mounts.mount(a_machine), mounts.mount(b_machine)
    start = b"0123456789abcdefghi\n"
    (a.path / "log").write_bytes(start)
    wait_until(lambda: (b.path / "log").exists(), 4, what="log in B")
    with open(a.path / "log", "ab") as f:
        f.write(b"APPEND-1\n")
        f.flush()
        os.fsync(f.fileno())
        (b.path / "tmp").write_bytes(b"x\n")
        os.rename(b.path / "tmp", b.path / "log")
        wait_until(lambda: os.stat(a.path / "log").st_size == 2, 5, what="B's log in A")
        f.write(b"APPEND-2\n")
        f.flush()
        os.fsync(f.fileno())
    expected = start + b"APPEND-1\nAPPEND-2\n"
    wait_until(lambda: sorted(p.read_bytes() for p in a.path.iterdir()) == sorted([b"x\n", expected]), 5,
               what="B's log and A's appended file (a conflict copy)")


def test_reading_a_file_deleted_or_replaced_elsewhere_is_estale_not_tampering(shared_server, mounts):
    """Chunks another client's delete or rewrite removed are not an integrity
    failure: the open file's reader gets ESTALE, and the log keeps its tampering
    alarms for tampering."""
    a_machine = mounts.machine(shared_server)
    b_machine = second_machine(mounts, a_machine, shared_server)
    a, b = mounts.mount(a_machine), mounts.mount(b_machine)
    mib = 1 << 20
    for how in ("deleted", "replaced"):
        name = f"{how}.bin"
        (b.path / name).write_bytes(os.urandom(12 * mib))    # (not in A's page cache)
        wait_until(lambda: (a.path / name).exists(), 4, what=f"{name} in A")
        fd = os.open(a.path / name, os.O_RDONLY)
        try:
            assert len(os.pread(fd, 4096, 0)) == 4096
            if how == "deleted":
                os.unlink(b.path / name)
            else:
                (b.path / name).write_bytes(b"all new")
            b.settle()
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, 11 * mib)          # a chunk A has not fetched
            assert ei.value.errno == errno.ESTALE, how
        finally:
            os.close(fd)
    assert "integrity" not in a.log(), a.log()
    assert a.is_mounted()


def test_a_crash_after_a_save_by_rename_leaves_old_or_new_never_nothing(shared_server, mounts, tmp_path):
    """Saves by rename over the old file, killed before the writer's close: a
    source still being written is published before it replaces the target, and
    an open target's removal travels with the rename. Either version may be on
    the server after the crash, never an empty or missing file."""
    machine = mounts.machine(shared_server)
    m = mounts.mount(machine)
    (m.path / "target").write_bytes(b"OLD target\n")
    (m.path / "cfg").write_bytes(b"OLD cfg\n")
    new = os.urandom(5 << 20)
    writing = os.open(m.path / ".target.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(writing, new)
    os.replace(m.path / ".target.tmp", m.path / "target")     # not closed yet
    (m.path / ".cfg.tmp").write_bytes(b"NEW cfg\n")
    held = os.open(m.path / "cfg", os.O_RDONLY)
    os.replace(m.path / ".cfg.tmp", m.path / "cfg")           # its open target moved aside
    m.kill()
    for fd in (writing, held):
        try:
            os.close(fd)
        except OSError:
            pass                        # the mount is dead
    other = second_machine(mounts, machine, shared_server)

    def check(name, versions):
        out = tmp_path / name
        other.run("download", f"/{name}", "-o", str(out))
        assert out.read_bytes() in versions, (name, out.stat().st_size)
    check("cfg", (b"OLD cfg\n", b"NEW cfg\n"))
    check("target", (b"OLD target\n", new))

    # Both at once: a source still being written replaces a target held open, and the
    # crash comes after the written-back batch went out.
    m.unmount()
    m = mounts.mount(machine, path=m.path)
    (m.path / "doc").write_bytes(b"OLD doc\n")
    held = os.open(m.path / "doc", os.O_RDONLY)
    writing = os.open(m.path / ".doc.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(writing, new)
    os.replace(m.path / ".doc.tmp", m.path / "doc")
    time.sleep(1.5)
    m.kill()
    for fd in (writing, held):
        try:
            os.close(fd)
        except OSError:
            pass
    check("doc", (b"OLD doc\n", new))
    m.unmount()


def test_sigkilled_mount_keeps_closed_files_and_unmount_cleans_up(shared_server, mounts, tmp_path):
    machine = mounts.machine(shared_server)
    m = mounts.mount(machine)
    (m.path / "dir" / "sub").mkdir(parents=True)
    files = {"small.txt": b"small\n", "dir/big.bin": os.urandom(3 * (1 << 20) + 99),
             "dir/sub/empty": b"", "dir/edited.bin": os.urandom(2 << 20)}
    for rel, data in files.items():
        (m.path / rel).write_bytes(data)
    with open(m.path / "dir/edited.bin", "r+b") as f:        # an edit, closed before the kill
        f.seek(1 << 20)
        f.write(b"EDIT")
        os.fchmod(f.fileno(), 0o600)                         # committed with the close
    edited = bytearray(files["dir/edited.bin"])
    edited[1 << 20: (1 << 20) + 4] = b"EDIT"
    files["dir/edited.bin"] = bytes(edited)
    digests = {rel: sha256_file(m.path / rel) for rel in files}
    os.symlink("dir/big.bin", m.path / "link")

    m.kill()
    assert m.is_mounted()                     # the kernel still has the (dead) mount
    with pytest.raises(OSError) as ei:
        os.listdir(m.path)
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    # mount.py --unmount cleans the dead mount up; a fresh mount on the same path sends
    # what the killed one had journaled before it serves anything.
    m.unmount()
    assert not m.is_mounted()
    again = mounts.mount(machine, path=m.path)
    assert again.is_mounted() and again.pid != m.pid
    for rel, digest in digests.items():
        assert sha256_file(again.path / rel) == digest, rel

    # Everything closed before the kill is on the server: another machine downloads it.
    other = second_machine(mounts, machine, shared_server)
    out = tmp_path / "downloaded.bin"
    other.run("download", "/dir/big.bin", "-o", str(out))
    assert out.read_bytes() == files["dir/big.bin"]
    assert os.readlink(again.path / "link") == "dir/big.bin"
    assert os.stat(again.path / "dir/edited.bin").st_mode & 0o777 == 0o600
    (again.path / "after restart.txt").write_bytes(b"works")
    assert (again.path / "after restart.txt").read_bytes() == b"works"
    again.unmount()
    assert not again.is_mounted()
