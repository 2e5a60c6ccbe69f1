"""POSIX semantics of the FUSE mount: renames, hard links, attributes, symlinks,
FIFOs, xattrs, name limits, unlinked-but-open files.

One server, one account and one mount for the module; each test uses its own folder.
Those marked ``backends`` run again on PostgreSQL + S3 (one more server and mount)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import stat
import threading
import time

import pytest

from mount_helpers import mnt, run, watchdog  # noqa: F401 (fixtures)




@pytest.fixture
def d(mnt, request):
    path = mnt.path / request.node.name[:100]
    path.mkdir()
    return path


def errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno


# ---------------------------------------------------------------- renames
@pytest.mark.backends
def test_rename_over_existing_file(d):
    (d / "a").write_bytes(b"new content")
    (d / "b").write_bytes(b"old content that is longer")
    os.rename(d / "a", d / "b")
    assert sorted(os.listdir(d)) == ["b"]
    assert (d / "b").read_bytes() == b"new content"
    assert os.stat(d / "b").st_nlink == 1


def test_rename_over_an_open_file_keeps_the_old_one_readable(d):
    (d / "a").write_bytes(b"replacement")
    (d / "b").write_bytes(b"original")
    fd = os.open(d / "b", os.O_RDONLY)
    try:
        os.rename(d / "a", d / "b")
        assert os.pread(fd, 100, 0) == b"original"
        assert (d / "b").read_bytes() == b"replacement"
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["b"]
    assert (d / "b").read_bytes() == b"replacement"


@pytest.mark.backends
def test_rename_directory_with_contents_and_across_directories(d):
    src = d / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "f1").write_bytes(b"one")
    (src / "sub" / "f2").write_bytes(b"two" * 100_000)
    (src / "sub" / "deep" / "f3").write_bytes(b"")
    (d / "other").mkdir()
    nlink_before = os.stat(d).st_nlink

    os.rename(src, d / "renamed")
    assert not src.exists()
    r = d / "renamed"
    assert (r / "f1").read_bytes() == b"one"
    assert (r / "sub" / "f2").read_bytes() == b"two" * 100_000
    assert (r / "sub" / "deep" / "f3").read_bytes() == b""
    assert os.stat(d).st_nlink == nlink_before

    # A directory moved into another directory: link counts of both parents follow.
    other_before = os.stat(d / "other").st_nlink
    os.rename(r / "sub", d / "other" / "moved sub")
    assert os.stat(d / "other").st_nlink == other_before + 1
    assert os.stat(r).st_nlink == 2
    assert (d / "other" / "moved sub" / "f2").read_bytes() == b"two" * 100_000
    assert sorted(os.listdir(r)) == ["f1"]

    # A file across directories, then back under another name.
    os.rename(r / "f1", d / "other" / "moved sub" / "deep" / "f1")
    assert (d / "other" / "moved sub" / "deep" / "f1").read_bytes() == b"one"
    assert os.listdir(r) == []
    os.rename(d / "other" / "moved sub" / "deep" / "f1", r / "back")
    assert sorted(os.listdir(d / "other" / "moved sub" / "deep")) == ["f3"]
    assert (r / "back").read_bytes() == b"one"


def test_rename_directory_over_directories(d):
    (d / "a").mkdir()
    (d / "a" / "x").write_bytes(b"x")
    (d / "empty").mkdir()
    (d / "full").mkdir()
    (d / "full" / "y").write_bytes(b"y")
    assert errno_of(os.rename, d / "a", d / "full") in (errno.ENOTEMPTY, errno.EEXIST)
    nlink = os.stat(d).st_nlink
    os.rename(d / "a", d / "empty")
    assert sorted(os.listdir(d)) == ["empty", "full"]
    assert (d / "empty" / "x").read_bytes() == b"x"
    assert os.stat(d).st_nlink == nlink - 1
    assert errno_of(os.rename, d / "full", d / "full" / "inside") == errno.EINVAL
    (d / "file").write_bytes(b"f")
    assert errno_of(os.rename, d / "file", d / "full") == errno.EISDIR
    assert errno_of(os.rename, d / "full", d / "file") == errno.ENOTDIR


def test_rename_between_two_hard_links_of_one_inode_does_nothing(d):
    (d / "a").write_bytes(b"shared")
    os.link(d / "a", d / "b")
    os.rename(d / "a", d / "b")           # POSIX: same file, succeed and do nothing
    assert sorted(os.listdir(d)) == ["a", "b"]
    assert os.stat(d / "a").st_nlink == 2
    assert os.stat(d / "b").st_ino == os.stat(d / "a").st_ino
    assert (d / "a").read_bytes() == (d / "b").read_bytes() == b"shared"


def test_rm_r_and_rmdir_nonempty(d):
    t = d / "tree"
    for i in range(3):
        (t / f"dir{i}" / "sub").mkdir(parents=True)
        for j in range(4):
            (t / f"dir{i}" / f"file{j}").write_bytes(b"%d" % j * 1000)
        (t / f"dir{i}" / "sub" / "leaf").write_bytes(b"")
        os.symlink("../file0", t / f"dir{i}" / "sub" / "link")
    assert errno_of(os.rmdir, t) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, t / "dir0" / "sub") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, t / "dir0" / "file0") == errno.ENOTDIR
    assert errno_of(os.unlink, t / "dir0") in (errno.EISDIR, errno.EPERM)
    run("rm", "-r", t)
    assert not t.exists()
    assert os.listdir(d) == []
    assert os.stat(d).st_nlink == 2


# ---------------------------------------------------------------- hard links
@pytest.mark.backends
def test_hard_links_nlink(d):
    (d / "f").write_bytes(b"linked data")
    os.link(d / "f", d / "g")
    assert os.stat(d / "f").st_nlink == 2
    assert os.stat(d / "g").st_nlink == 2
    assert os.stat(d / "f").st_ino == os.stat(d / "g").st_ino
    (d / "sub").mkdir()
    os.link(d / "g", d / "sub" / "h")
    assert os.stat(d / "f").st_nlink == 3
    # Writing through one name is visible through the others.
    with open(d / "g", "r+b") as f:
        f.seek(0)
        f.write(b"LINKED")
    assert (d / "f").read_bytes() == b"LINKED data"
    assert (d / "sub" / "h").read_bytes() == b"LINKED data"
    os.chmod(d / "f", 0o604)
    assert stat.S_IMODE(os.stat(d / "sub" / "h").st_mode) == 0o604
    os.unlink(d / "f")
    assert os.stat(d / "g").st_nlink == 2
    assert os.stat(d / "sub" / "h").st_nlink == 2
    os.unlink(d / "sub" / "h")
    assert os.stat(d / "g").st_nlink == 1
    assert (d / "g").read_bytes() == b"LINKED data"
    assert errno_of(os.link, d / "sub", d / "dirlink") == errno.EPERM
    assert errno_of(os.link, d / "g", d / "sub") == errno.EEXIST


# ---------------------------------------------------------------- attributes
def test_chmod_chown_utimens(d):
    f = d / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o640)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    os.chmod(f, 0o4755)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4755
    os.chown(f, 1234, 4321)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    assert not st.st_mode & stat.S_ISUID          # chown clears set-user-ID
    os.chown(f, -1, 99)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (1234, 99)
    os.chmod(d, 0o711)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o711
    os.chmod(d, 0o755)

    before = os.stat(f)
    run("touch", "-m", "-d", "2001-02-03 04:05:06.123456789 UTC", f)
    st = os.stat(f)
    assert st.st_mtime_ns == 981173106_123456789
    assert st.st_atime_ns == before.st_atime_ns
    run("touch", "-a", "-d", "1999-12-31 23:59:59 UTC", f)
    st = os.stat(f)
    assert st.st_atime_ns == 946684799_000000000
    assert st.st_mtime_ns == 981173106_123456789
    os.utime(f, ns=(5_000_000_001, 6_000_000_002))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (5_000_000_001, 6_000_000_002)
    t0 = time.time()
    os.utime(f)                                   # now
    assert abs(os.stat(f).st_mtime - t0) < 5
    # Attributes changed while the file is open for writing survive its close.
    with open(f, "r+b") as fh:
        fh.write(b"y")
        fh.flush()
        os.utime(f, ns=(7_000_000_000, 8_000_000_000))
        os.chmod(f, 0o600)
    st = os.stat(f)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (f.read_bytes(), st.st_mtime_ns) == (b"y", 8_000_000_000)
    # utimens on a directory and on a symlink itself.
    os.utime(d, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(d).st_mtime_ns == 2_000_000_000
    os.symlink("f", d / "l")
    os.utime(d / "l", ns=(3_000_000_000, 4_000_000_000), follow_symlinks=False)
    assert os.lstat(d / "l").st_mtime_ns == 4_000_000_000
    assert os.stat(f).st_mtime_ns == 8_000_000_000


def test_truncate_by_path_and_size(d):
    f = d / "t"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert f.read_bytes() == b"0123"
    os.truncate(f, 3 << 20)
    data = f.read_bytes()
    assert len(data) == 3 << 20 and data[:4] == b"0123" and not any(data[4:])
    assert os.stat(f).st_size == 3 << 20


# ---------------------------------------------------------------- symlinks
def test_symlink_readlink_and_limits(d):
    os.symlink("target/that/does not exist \u00e9", d / "dangling")
    assert os.readlink(d / "dangling") == "target/that/does not exist \u00e9"
    assert stat.S_ISLNK(os.lstat(d / "dangling").st_mode)
    (d / "real").write_bytes(b"real")
    os.symlink("real", d / "good")
    assert (d / "good").read_bytes() == b"real"
    assert os.lstat(d / "good").st_size == len("real")

    long_target = "x" * 4095
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    assert os.lstat(d / "long").st_size == 4095
    assert errno_of(os.symlink, "y" * 4096, d / "too long") == errno.ENAMETOOLONG
    assert not os.path.lexists(d / "too long")
    assert errno_of(os.readlink, d / "real") == errno.EINVAL
    os.rename(d / "long", d / "long renamed")
    assert os.readlink(d / "long renamed") == long_target
    os.unlink(d / "dangling")
    assert sorted(os.listdir(d)) == ["good", "long renamed", "real"]


# ---------------------------------------------------------------- fifo
def test_mkfifo(d):
    os.mkfifo(d / "pipe", 0o640)
    st = os.stat(d / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    got = []

    def reader():
        with open(d / "pipe", "rb") as r:
            got.append(r.read())
    t = threading.Thread(target=reader)
    t.start()
    with open(d / "pipe", "wb") as w:
        w.write(b"through the fifo")
    t.join(10)
    assert got == [b"through the fifo"]
    assert stat.S_ISFIFO(os.lstat(d / "pipe").st_mode)
    os.unlink(d / "pipe")
    assert not os.path.lexists(d / "pipe")


# ---------------------------------------------------------------- xattrs
def test_xattrs_with_setfattr_getfattr(d):
    f = d / "f"
    f.write_bytes(b"data")
    run("setfattr", "-n", "user.color", "-v", "blue", f)
    run("setfattr", "-n", "user.empty", "-v", '""', f)
    run("setfattr", "-n", "user.bin", "-v", "0x00ff10", f)
    assert run("getfattr", "--only-values", "-n", "user.color", f).stdout == "blue"
    dump = run("getfattr", "-d", "-e", "hex", f).stdout
    assert "user.color=0x626c7565" in dump
    assert "user.bin=0x00ff10" in dump
    assert os.getxattr(f, "user.bin") == b"\x00\xff\x10"
    assert os.getxattr(f, "user.empty") == b""
    assert sorted(os.listxattr(f)) == ["user.bin", "user.color", "user.empty"]
    run("setfattr", "-n", "user.color", "-v", "red", f)
    assert os.getxattr(f, "user.color") == b"red"
    run("setfattr", "-x", "user.color", f)
    assert sorted(os.listxattr(f)) == ["user.bin", "user.empty"]
    assert errno_of(os.getxattr, f, "user.color") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.color") == errno.ENODATA
    missing = run("getfattr", "-n", "user.color", f, check=False)
    assert missing.returncode != 0 and "No such attribute" in missing.stderr
    assert errno_of(os.setxattr, f, "user.bin", b"v", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.nope", b"v", os.XATTR_REPLACE) == errno.ENODATA
    big = os.urandom(4000)
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    # On a directory and kept across content writes.
    os.setxattr(d, "user.dir", b"yes")
    assert os.getxattr(d, "user.dir") == b"yes"
    with open(f, "ab") as fh:
        fh.write(b" more")
    assert os.getxattr(f, "user.bin") == b"\x00\xff\x10"
    assert f.read_bytes() == b"data more"
    # No SELinux labels: "unsupported" (not "no such attribute") makes ls -l stop
    # asking for one per file. Other security.* attributes are stored.
    assert errno_of(os.getxattr, f, "security.selinux") == errno.EOPNOTSUPP
    os.setxattr(f, "security.zkfs-test", b"kept")
    assert os.getxattr(f, "security.zkfs-test") == b"kept"


# ---------------------------------------------------------------- names
def test_name_lengths_and_utf8(d):
    ok = "n" * 255
    (d / ok).write_bytes(b"255")
    assert (d / ok).read_bytes() == b"255"
    multibyte = "\u00e9" * 127 + "z"                 # 255 bytes in UTF-8
    assert len(multibyte.encode()) == 255
    (d / multibyte).mkdir()
    emoji = "\U0001F600" * 63 + "abc"               # 4*63 + 3 = 255 bytes
    (d / emoji).write_bytes(b"emoji")
    assert sorted(os.listdir(d)) == sorted([ok, multibyte, emoji])
    assert errno_of(os.stat, d / ("n" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o644) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, d / ("\u00e9" * 128)) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "t", d / ("s" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.rename, d / ok, d / ("r" * 256)) == errno.ENAMETOOLONG
    assert errno_of(os.link, d / ok, d / ("h" * 256)) == errno.ENAMETOOLONG
    assert sorted(os.listdir(d)) == sorted([ok, multibyte, emoji])
    odd = ["with space", " leading", "trailing ", "tab\there", "new\nline", "\u202eright-to-left",
           "combining e\u0301", "\u4e2d\u6587", "quote'\"", "back\\slash", "-dash", ".hidden", "..dots"]
    for name in odd:
        (d / multibyte / name).write_text(name)
    assert sorted(os.listdir(d / multibyte)) == sorted(odd)
    for name in odd:
        assert (d / multibyte / name).read_text() == name


# ---------------------------------------------------------------- unlinked but open
def test_unlinked_open_file_stays_readable_and_writable(d):
    path = d / "tmpfile"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"hello " * 1000)
        os.unlink(path)
        assert not os.path.lexists(path)
        assert os.listdir(d) == []
        assert os.pread(fd, 5, 0) == b"hello"
        os.pwrite(fd, b"WORLD", 6)
        assert os.pread(fd, 11, 0) == b"hello WORLD"
        os.pwrite(fd, b"tail", (2 << 20) + 7)          # grow it past a chunk boundary
        assert os.lseek(fd, 0, os.SEEK_END) == (2 << 20) + 11
        assert os.pread(fd, 100, (2 << 20) + 7) == b"tail"
        assert os.pread(fd, 10, 1 << 20) == bytes(10)
        os.ftruncate(fd, 8)
        assert os.lseek(fd, 0, os.SEEK_END) == 8
        assert os.pread(fd, 100, 0) == b"hello WO"
        # A new file under the same name is a different file.
        path.write_bytes(b"newcomer")
        assert os.pread(fd, 100, 0) == b"hello WO"
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"hello WO"
    finally:
        os.close(fd)
    assert path.read_bytes() == b"newcomer"
    assert os.listdir(d) == ["tmpfile"]


def test_fstat_and_fchmod_of_unlinked_open_file(d):
    path = d / "tmpfile"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 5000)
        os.unlink(path)
        st = os.fstat(fd)
        assert st.st_size == 5000 and st.st_nlink == 0 and stat.S_ISREG(st.st_mode)
        os.fchmod(fd, 0o644)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o644
        os.pwrite(fd, b"y", 9999)
        assert os.fstat(fd).st_size == 10000
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_directory_of_an_unlinked_open_file_can_be_removed(d):
    sub = d / "sub"
    sub.mkdir()
    (sub / "f").write_bytes(b"still here")
    fd = os.open(sub / "f", os.O_RDWR)
    try:
        os.unlink(sub / "f")
        assert os.listdir(sub) == []
        os.rmdir(sub)                              # empty for POSIX, though a file is open
        assert not sub.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_unlinked_open_committed_file(d):
    path = d / "committed"
    path.write_bytes(b"A" * 3_000_000)
    with open(path, "r+b") as f:
        os.unlink(path)
        f.seek(2_999_990)
        assert f.read() == b"A" * 10
        f.seek(0)
        f.write(b"B" * 10)
        f.flush()
        f.seek(0)
        assert f.read(12) == b"B" * 10 + b"AA"
    assert os.listdir(d) == []


def test_unlink_one_name_of_an_open_hardlinked_file(d):
    (d / "a").write_bytes(b"content")
    os.link(d / "a", d / "b")
    with open(d / "a", "r+b") as f:
        os.unlink(d / "a")
        f.write(b"CONTENT")
    assert (d / "b").read_bytes() == b"CONTENT"
    assert os.stat(d / "b").st_nlink == 1


def test_unlinked_open_file_keeps_fstat_after_its_folder_is_renamed(d):
    (d / "h1").mkdir()
    (d / "h1" / "f").write_bytes(b"content")
    fd = os.open(d / "h1" / "f", os.O_RDWR)
    try:
        os.unlink(d / "h1" / "f")
        os.rename(d / "h1", d / "h2")
        assert os.fstat(fd).st_size == 7
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert os.pread(fd, 10, 0) == b"content"
    finally:
        os.close(fd)
    assert os.listdir(d / "h2") == []


def test_a_gone_name_of_an_open_file_is_free_for_a_new_file(d):
    """An open file is found by the path it was opened under only while that path
    still names it: after its name is unlinked (another link remains), its folder
    is renamed, or another file is renamed over that name, the path means what the
    namespace says, and writing there never lands in the open file."""
    (d / "a").write_bytes(b"A-content")
    os.link(d / "a", d / "b")
    with open(d / "a", "rb"):
        os.unlink(d / "a")
        assert errno_of(os.stat, d / "a") == errno.ENOENT
        (d / "a").write_bytes(b"new file")
        assert (d / "a").read_bytes() == b"new file"
    assert (d / "b").read_bytes() == b"A-content"
    assert (d / "a").read_bytes() == b"new file"

    (d / "d1").mkdir()
    (d / "d1" / "f").write_bytes(b"orig")
    with open(d / "d1" / "f", "rb"):
        os.rename(d / "d1", d / "d2")
        (d / "d1").mkdir()
        assert errno_of(os.stat, d / "d1" / "f") == errno.ENOENT
        (d / "d1" / "f").write_bytes(b"new")
    assert (d / "d2" / "f").read_bytes() == b"orig"
    assert (d / "d1" / "f").read_bytes() == b"new"

    (d / "y").write_bytes(b"old y")
    os.link(d / "y", d / "y2")
    (d / "x").write_bytes(b"x content")
    with open(d / "y", "rb"):
        os.rename(d / "x", d / "y")
        assert (d / "y").read_bytes() == b"x content"
        with open(d / "y", "ab") as f:
            f.write(b"+")
    assert (d / "y").read_bytes() == b"x content+"
    assert (d / "y2").read_bytes() == b"old y"


def test_a_forked_child_closing_its_copy_does_not_publish_a_partial_file(mnt):
    """A child process inherits the open descriptor and closes it at exec: FUSE
    sends a FLUSH for that close, which must not publish what the parent has
    written so far (the parent's own close does)."""
    path = mnt.path / "forked.bin"
    with open(path, "wb") as f:
        f.write(b"a" * 1000)
        f.flush()
        subprocess.run(["true"], check=True)          # inherits f, closes it at exec
        mnt.settle()
        listing = mnt.machine.run("ls", "/").stdout
        # the create may have reached the server (an empty file, as any new file is
        # before its first close), never the half the parent has written so far
        assert not any(line.endswith(" forked.bin") and " 1000 " in line for line in listing.splitlines())
        f.write(b"b" * 1000)
    mnt.settle()
    listing = mnt.machine.run("ls", "/").stdout
    assert any(line.endswith(" forked.bin") and " 2000 " in line for line in listing.splitlines()), listing


# Run as another user with an inherited descriptor of the mount's root (the test's
# temporary folders, and this venv's python, are not reachable by other users).
_AS_OTHER_USER = r"""
r=/proc/self/fd/$1
probe() {
    if out=$("$@" 2>&1 >/dev/null); then echo ok
    else case "$out" in *"Permission denied"*) echo EACCES;; *) echo "other: $out";; esac; fi
}
printf '{"list": "%s", "read public": "%s", "read private": "%s", "create in root": "%s", "create in shared": "%s"}\n' \
    "$(probe ls "$r")" "$(probe cat "$r/public.txt")" "$(probe cat "$r/private.txt")" \
    "$(probe touch "$r/intruder.txt")" "$(probe touch "$r/shared/theirs.txt")"
"""


def _as_nobody(mount_root) -> dict:
    fd = os.open(mount_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        proc = subprocess.run(["sh", "-c", _AS_OTHER_USER, "sh", str(fd)], pass_fds=(fd,),
                              user=65534, group=65534, extra_groups=[], capture_output=True, text=True,
                              timeout=60)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_allow_other_lets_other_users_in_with_modes_enforced(mnt):
    """Without --allow-other the kernel turns every other user away; with it, the
    kernel enforces the file modes (default_permissions) and new files belong to
    the user who created them."""
    plain = mnt.mounts.mount(mnt.machine)            # the same account, mounted twice
    shared_mount = mnt.mounts.mount(mnt.machine, "--allow-other")
    os.chmod(shared_mount.path, 0o755)
    (shared_mount.path / "public.txt").write_text("for everyone\n")
    os.chmod(shared_mount.path / "public.txt", 0o644)
    (shared_mount.path / "private.txt").write_text("owner only\n")
    os.chmod(shared_mount.path / "private.txt", 0o600)
    (shared_mount.path / "shared").mkdir()
    os.chmod(shared_mount.path / "shared", 0o777)

    assert _as_nobody(plain.path) == {"list": "EACCES", "read public": "EACCES", "read private": "EACCES",
                                      "create in root": "EACCES", "create in shared": "EACCES"}
    assert _as_nobody(shared_mount.path) == {"list": "ok", "read public": "ok", "read private": "EACCES",
                                             "create in root": "EACCES", "create in shared": "ok"}
    theirs = os.stat(shared_mount.path / "shared" / "theirs.txt")
    assert (theirs.st_uid, theirs.st_gid) == (65534, 65534)
    assert not (shared_mount.path / "intruder.txt").exists()
    # and so they stay on the server: a fresh mount shows the same owner
    fresh = mnt.mounts.mount(mnt.machine)
    assert os.stat(fresh.path / "shared" / "theirs.txt").st_uid == 65534
