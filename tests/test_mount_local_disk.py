"""One mount behaves like a local disk (issue 12): several processes writing one
file, attribute changes landing in call order, syscall arguments no daemon may
die of.

The module runs its own server and one account; ``ctx.m`` is the current mount,
``ctx.remount()`` replaces it with a fresh one (cold cache)."""
from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ServerProcess
from mount_helpers import Mounts, run

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Ctx:
    def __init__(self, server: ServerProcess, mounts: Mounts):
        self.server = server
        self.mounts = mounts
        self.machine = mounts.machine(server)
        self.m = mounts.mount(self.machine)

    def remount(self):
        self.m.unmount()
        assert not self.m.is_mounted()
        self.m = self.mounts.mount(self.machine)
        return self.m

    def alive(self) -> bool:
        try:
            os.stat(self.m.path / ".")
            return self.m.is_mounted() and self.m.pid is not None and os.path.exists(f"/proc/{self.m.pid}")
        except OSError:
            return False


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("zkfs-disk-server"))
    mounts = Mounts(tmp_path_factory)
    try:
        srv.start()
        yield Ctx(srv, mounts)
    finally:
        mounts.close()
        srv.stop()


@pytest.fixture(autouse=True)
def watchdog(ctx):
    if not ctx.alive():                 # an earlier test killed or hung the daemon
        ctx.m.cleanup()
        ctx.m = ctx.mounts.mount(ctx.machine)
    with ctx.mounts.watchdog(180):
        yield


@pytest.fixture
def d(ctx, request):
    path = ctx.m.path / request.node.name[:100]
    path.mkdir()
    return path


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


# ---------------------------------------------------------------- one file, many writers
APPENDER = 'for i in $(seq {n}); do echo "{tag} line $i" >> {path}; done'


def test_two_processes_appending_to_one_file_lose_nothing(d):
    """Finding 1: two shells appending with >> (O_APPEND) at once, ten runs in a row:
    every line lands in the one file, no conflict copy appears."""
    n = 300
    for run_no in range(10):
        path = d / f"app{run_no}.log"
        procs = [subprocess.Popen(["bash", "-c", APPENDER.format(n=n, tag=tag, path=path)])
                 for tag in ("a", "b")]
        for p in procs:
            assert p.wait(timeout=300) == 0
        lines = path.read_text().splitlines()
        for tag in ("a", "b"):
            assert [ln for ln in lines if ln.startswith(tag + " ")] == [f"{tag} line {i}" for i in range(1, n + 1)], \
                f"run {run_no}: lines of writer {tag} lost or reordered"
        assert len(lines) == 2 * n
    assert sorted(os.listdir(d)) == [f"app{i}.log" for i in range(10)], "no conflict copies on one mount"


def test_descriptors_of_one_file_share_one_state(d, ctx):
    """Writes through one descriptor are seen at once through another (any process),
    and the last close publishes both: a fresh mount sees every byte."""
    path = d / "shared.bin"
    a = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    b = os.open(path, os.O_RDWR)
    try:
        os.pwrite(a, b"A" * 10, 0)
        assert os.pread(b, 10, 0) == b"A" * 10
        os.pwrite(b, b"B" * 5, 10)
        assert os.pread(a, 15, 0) == b"A" * 10 + b"B" * 5
        os.close(os.open(path, os.O_RDONLY))     # a third open and close in between
        out = run("cat", path).stdout            # another process reads it all
        assert out == "A" * 10 + "B" * 5
    finally:
        os.close(a)
        os.close(b)
    other = ctx.mounts.mount(ctx.machine)
    assert (other.path / d.name / "shared.bin").read_bytes() == b"A" * 10 + b"B" * 5


# ---------------------------------------------------------------- order of changes
def test_a_write_after_a_recent_touch_updates_mtime(d):
    """Finding 2: touch -d (written back later) then an append: the append's mtime wins,
    and the appended data is in the file (not in a conflict copy)."""
    f = d / "f"
    f.write_text("hi\n")
    time.sleep(0.6)               # the create is on the server, the touch will wait
    run("touch", "-d", "2001-02-03", f)
    run("sh", "-c", f"printf 'more\\n' >> '{f}'")
    st = os.stat(f)
    assert st.st_mtime > time.time() - 600, "the write's mtime was overwritten by the earlier touch"
    assert f.read_text() == "hi\nmore\n"
    time.sleep(1.2)               # past the write-back delay: still the same on this mount
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns
    assert sorted(os.listdir(d)) == ["f"]


def test_touch_after_a_write_wins(d, ctx):
    """The other order: a write, then touch -d before the close: the touch's time stays,
    also on a fresh mount."""
    f = d / "g"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"data")
        os.utime(f, ns=(981158400 * 10**9, 981158400 * 10**9))
    finally:
        os.close(fd)
    assert os.stat(f).st_mtime == 981158400
    other = ctx.mounts.mount(ctx.machine)
    assert os.stat(other.path / d.name / "g").st_mtime == 981158400


# ---------------------------------------------------------------- hostile arguments
@pytest.mark.parametrize("size", [999999999999999, 2**63 - 1])
def test_huge_truncate_is_efbig_and_the_mount_lives(d, ctx, size):
    """Finding 3: pjdfstest truncate/12 made the daemon exit (ENOTCONN for everyone)."""
    f = d / "f"
    f.write_bytes(b"keep")
    with pytest.raises(OSError) as ei:
        os.truncate(f, size)
    assert ei.value.errno == errno.EFBIG
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, size)
        assert ei.value.errno == errno.EFBIG
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", size - 1)
        assert ei.value.errno == errno.EFBIG
    finally:
        os.close(fd)
    assert f.read_bytes() == b"keep"
    assert ctx.alive()
