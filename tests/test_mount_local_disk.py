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

from conftest import REPO
from mount_helpers import one_mount, run
from zkfs.format import MAX_FILE_SIZE

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    with one_mount(tmp_path_factory, "zkfs-disk-server") as ctx:
        yield ctx


@pytest.fixture(autouse=True)
def watchdog(ctx):
    with ctx.watched(180):
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


@pytest.mark.slow
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


def test_attribute_changes_during_commits_keep_every_version_readable(d, ctx):
    """chmod racing with the commits of a file's content (found by the syscall storm):
    an attribute change that landed while a commit was in flight was kept on top of
    the attributes of the version before it, manifest digest included, so the next
    setmeta sealed the old digest over the new content: EIO ever after."""
    import threading
    f = d / "f"
    f.write_bytes(b"start")
    stop = threading.Event()

    def chmods():
        while not stop.is_set():
            for mode in (0o600, 0o644):
                os.chmod(f, mode)

    t = threading.Thread(target=chmods)
    t.start()
    try:
        for i in range(150):
            with open(f, "ab") as fh:
                fh.write(b"%d\n" % i)
    finally:
        stop.set()
        t.join()
    want = b"start" + b"".join(b"%d\n" % i for i in range(150))
    assert f.read_bytes() == want
    time.sleep(0.7)
    other = ctx.mounts.mount(ctx.machine)
    assert (other.path / d.name / "f").read_bytes() == want
    assert "integrity check failed" not in ctx.m.log()


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


def test_a_file_renamed_over_takes_its_unsent_attributes_along(d, ctx):
    """pjdfstest rename/09: chown a file, then rename another over it before the
    chown is written back: the chown goes with the replaced file (it used to be
    sent after the rename that deleted its inode, and logged as lost)."""
    (d / "src").write_text("src")
    (d / "dst").write_text("dst")
    time.sleep(0.6)                     # both on the server
    os.chown(d / "dst", 65534, 65534)
    os.chown(d / "src", 65533, 65533)
    os.rename(d / "src", d / "dst")
    time.sleep(0.7)
    other = ctx.mounts.mount(ctx.machine)
    st = os.stat(other.path / d.name / "dst")
    assert (st.st_uid, (other.path / d.name / "dst").read_text()) == (65533, "src")
    assert "lost" not in ctx.m.log()


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


def test_the_largest_file_is_a_sparse_file_the_server_takes(d, ctx):
    """MAX_FILE_SIZE is EFBIG's edge: a sparse file of exactly that size commits
    (its manifest fits what the server accepts) and reads back as zeros."""
    f = d / "big"
    f.write_bytes(b"start")
    os.truncate(f, MAX_FILE_SIZE)
    with pytest.raises(OSError) as ei:
        os.truncate(f, MAX_FILE_SIZE + 1)
    assert ei.value.errno == errno.EFBIG
    ctx.m.settle()
    other = ctx.mounts.mount(ctx.machine)
    g = other.path / d.name / "big"
    assert os.stat(g).st_size == MAX_FILE_SIZE
    with open(g, "rb") as fh:
        assert fh.read(5) == b"start"
        fh.seek(MAX_FILE_SIZE - 3)
        assert fh.read() == bytes(3)
# ---------------------------------------------------------------- directory times
def dir_times(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, _files in os.walk(root):
        for name in dirs + ["."]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_nlink)
    return out


@pytest.mark.slow
def test_directory_mtimes_survive_a_remount(ctx):
    """Finding 4: after rsync -a and git clone, a remount showed other directory
    mtimes (the server's clock), so rsync saw every folder as changed."""
    src = Path(ctx.m.path).parent / "dirtimes-src"
    if src.exists():
        run("rm", "-rf", src)
    for sub in ("a", "a/b", "a/b/c", "d"):
        (src / sub).mkdir(parents=True)
        (src / sub / "file.txt").write_text(sub)
    for i, sub in enumerate(("a/b/c", "a/b", "a", "d", ".")):
        os.utime(src / sub, ns=(10**18 + i, 10**18 + i * 7))
    top = ctx.m.path / "dirtimes"
    top.mkdir()
    run("rsync", "-a", f"{src}/", top / "rsynced")
    run("git", "clone", "-q", REPO, top / "clone", timeout=300)
    before = dir_times(top)
    assert before["rsynced/a/b"][0] == 10**18 + 7 * 1
    time.sleep(1.1)
    ctx.remount()
    after = dir_times(ctx.m.path / "dirtimes")
    assert after == before
    # and rsync agrees: nothing to do for any folder
    out = run("rsync", "-ai", "--dry-run", f"{src}/", ctx.m.path / "dirtimes" / "rsynced").stdout
    assert out.strip() == "", out


def test_directory_mtime_follows_entry_changes_and_touch(d, ctx):
    sub = d / "sub"
    sub.mkdir()
    os.utime(sub, ns=(10**15, 10**15))
    assert os.stat(sub).st_mtime_ns == 10**15
    (sub / "x").write_text("x")
    t_create = os.stat(sub).st_mtime_ns
    assert t_create > 10**15
    os.utime(sub, ns=(2 * 10**15, 2 * 10**15))
    other = ctx.mounts.mount(ctx.machine)
    assert os.stat(other.path / d.name / "sub").st_mtime_ns == 2 * 10**15


# ---------------------------------------------------------------- ctime
@pytest.mark.parametrize("action", ["link", "unlink", "rename_over"])
def test_ctime_follows_link_unlink_and_rename_over(d, ctx, action):
    """Finding 5 (pjdfstest link/00, unlink/00, rename/23): a file's ctime moves when one
    of its names is linked, unlinked or renamed over, seen through every name."""
    f = d / "f"
    f.write_text("data")
    os.link(f, d / "f2")
    (d / "other").write_text("other")
    before = os.stat(f).st_ctime_ns
    time.sleep(1.1)
    if action == "link":
        os.link(f, d / "f3")
    elif action == "unlink":
        os.unlink(d / "f2")
    else:
        os.rename(d / "other", d / "f2")
    after = os.stat(f).st_ctime_ns
    assert after > before
    time.sleep(0.7)                  # written back: a fresh mount sees it too
    other = ctx.mounts.mount(ctx.machine)
    assert os.stat(other.path / d.name / "f").st_ctime_ns == after


# ---------------------------------------------------------------- rename flags
def test_rename_noreplace(d):
    (d / "a").write_text("a")
    (d / "b").write_text("b")
    with pytest.raises(OSError) as ei:
        renameat2(d / "a", d / "b", RENAME_NOREPLACE)
    assert ei.value.errno == errno.EEXIST
    assert (d / "a").read_text() == "a" and (d / "b").read_text() == "b"
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(d)) == ["b", "c"]


def test_rename_noreplace_onto_an_open_file(d, ctx):
    """libfuse moves an open target aside before it hands us the rename: a
    RENAME_NOREPLACE onto it must still fail, and the target keep its name."""
    (d / "new").write_text("new")
    (d / "held").write_text("held")
    fd = os.open(d / "held", os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            renameat2(d / "new", d / "held", RENAME_NOREPLACE)
        assert ei.value.errno == errno.EEXIST
        assert (d / "held").read_text() == "held"
        os.pwrite(fd, b"HELD", 0)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["held", "new"]
    assert (d / "held").read_text() == "HELD"
    time.sleep(0.7)
    other = ctx.mounts.mount(ctx.machine)
    assert (other.path / d.name / "held").read_text() == "HELD"
    assert sorted(os.listdir(other.path / d.name)) == ["held", "new"]


def test_rename_exchange(d, ctx):
    (d / "file").write_text("file content")
    (d / "dir").mkdir()
    (d / "dir" / "inner").write_text("inner")
    renameat2(d / "file", d / "dir", RENAME_EXCHANGE)
    assert (d / "dir").read_text() == "file content"
    assert (d / "file" / "inner").read_text() == "inner"
    with pytest.raises(OSError) as ei:
        renameat2(d / "file", d / "missing", RENAME_EXCHANGE)
    assert ei.value.errno == errno.ENOENT
    other = ctx.mounts.mount(ctx.machine)
    assert (other.path / d.name / "dir").read_text() == "file content"
    assert (other.path / d.name / "file" / "inner").read_text() == "inner"
