"""Real tools on a real FUSE mount: cp -a, rsync, git, sqlite, tar, gio, df.

One server, one account and one mount for the whole module (each test works in
its own folder of the mount)."""
from __future__ import annotations

import os
import re
import sqlite3
import stat
from pathlib import Path

from mount_helpers import mnt, run, watchdog  # noqa: F401 (fixtures)



def make_tree(root: Path, *, big: int = 0) -> Path:
    """A nested tree: empty files and dirs, spaces, emoji and other UTF-8 names,
    modes, ownership, a symlink, ns-precision mtimes (set bottom-up)."""
    root.mkdir(parents=True)
    files = {
        "empty.txt": b"",
        "plain.txt": b"hello world\n" * 100,
        "a dir with spaces/file with spaces.txt": b"spaces " * 1000,
        "a dir with spaces/\U0001F389 party \U0001F680.bin": os.urandom(70_000),
        "a dir with spaces/nested/deeper/empty": b"",
        "a dir with spaces/nested/deeper/\u00fcn\u00efc\u00f8d\u00e9 \u2014 \u65e5\u672c\u8a9e.txt": "h\u00e9llo \u4e16\u754c".encode() * 50,
        "chunky.bin": os.urandom((1 << 20) + 4321),
        "script.sh": b"#!/bin/sh\necho hi\n",
        "private": b"secret\n",
        "owned-by-1234": b"chowned\n",
    }
    if big:
        files["big.bin"] = os.urandom(big)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty dir").mkdir()
    (root / "a dir with spaces" / "nested" / "empty \U0001F4C1").mkdir()
    os.chmod(root / "script.sh", 0o755)
    os.chmod(root / "private", 0o600)
    os.chmod(root / "a dir with spaces" / "nested", 0o750)
    os.chown(root / "owned-by-1234", 1234, 5678)
    os.symlink("a dir with spaces/file with spaces.txt", root / "link to file")
    # Distinct, ns-precision times, children before parents so dir mtimes stick.
    t = 1_500_000_000_123_456_789
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda w: -len(w[0])):
        for name in sorted(filenames + dirnames):
            t += 1_000_000_007
            os.utime(os.path.join(dirpath, name), ns=(t, t), follow_symlinks=False)
    os.utime(root, ns=(t + 5, t + 5))
    return root


def assert_same_metadata(src: Path, dst: Path) -> None:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(src):
        for name in ["."] + dirnames + filenames:
            a = Path(dirpath) / name
            b = dst / a.relative_to(src)
            sa, sb = os.lstat(a), os.lstat(b)
            assert stat.S_IFMT(sb.st_mode) == stat.S_IFMT(sa.st_mode), b
            if not stat.S_ISLNK(sa.st_mode):
                assert oct(stat.S_IMODE(sb.st_mode)) == oct(stat.S_IMODE(sa.st_mode)), b
            assert (sb.st_uid, sb.st_gid) == (sa.st_uid, sa.st_gid), b
            assert sb.st_mtime_ns == sa.st_mtime_ns, (b, sa.st_mtime_ns, sb.st_mtime_ns)
            if stat.S_ISREG(sa.st_mode):
                assert sb.st_size == sa.st_size, b
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(b) == os.readlink(a)
            seen += 1
    assert seen > 15


def test_cp_a_tree_with_unicode_empty_and_20mb(mnt, tmp_path):
    src = make_tree(tmp_path / "src", big=20 * 1000 * 1000)
    dst = mnt.path / "cp"
    dst.mkdir()
    run("cp", "-a", src, dst)
    run("diff", "-r", src, dst / "src")
    assert_same_metadata(src, dst / "src")
    assert sorted(os.listdir(dst / "src" / "a dir with spaces")) == sorted(os.listdir(src / "a dir with spaces"))
    assert (dst / "src" / "big.bin").stat().st_size == 20 * 1000 * 1000


def itemized(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_rsync_twice_then_one_change(mnt, tmp_path):
    src = make_tree(tmp_path / "src")
    dst = mnt.path / "rsync"
    first = run("rsync", "-a", "-i", f"{src}/", f"{dst}/")
    assert any(line.startswith(">f+++") for line in itemized(first.stdout))
    run("diff", "-r", src, dst)
    assert_same_metadata(src, dst)

    again = run("rsync", "-a", "-i", f"{src}/", f"{dst}/")
    assert itemized(again.stdout) == [], again.stdout
    stats = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert re.search(r"Number of regular files transferred: 0\b", stats.stdout), stats.stdout

    changed = src / "a dir with spaces" / "file with spaces.txt"
    changed.write_bytes(b"changed content\n" * 77)
    third = run("rsync", "-a", "-i", f"{src}/", f"{dst}/")
    lines = itemized(third.stdout)
    assert len(lines) == 1 and lines[0].startswith(">f") \
        and lines[0].endswith("a dir with spaces/file with spaces.txt"), third.stdout
    stats = run("rsync", "-a", "--stats", f"{src}/", f"{dst}/")
    assert re.search(r"Number of regular files transferred: 0\b", stats.stdout), stats.stdout
    run("diff", "-r", src, dst)
    assert_same_metadata(src, dst)


def git_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "Tester", "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "Tester", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def test_git_init_commit_clone_fsck(mnt, tmp_path):
    env = git_env(tmp_path)
    base = mnt.path / "git"
    base.mkdir()
    repo = base / "repo"
    run("git", "init", "-q", "-b", "main", repo, env=env)
    (repo / "README.md").write_text("# zkfs test\n")
    (repo / "src").mkdir()
    (repo / "src" / "main.py").write_text("print('hello')\n" * 50)
    (repo / "blob.bin").write_bytes(os.urandom(300_000))
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    (repo / "src" / "main.py").write_text("print('changed')\n")
    run("git", "mv", "README.md", "README.txt", cwd=repo, env=env)
    run("git", "commit", "-q", "-a", "-m", "second", cwd=repo, env=env)
    run("git", "fsck", "--full", "--strict", cwd=repo, env=env)
    run("git", "gc", "-q", "--prune=now", cwd=repo, env=env)     # packs, renames, deletes
    run("git", "fsck", "--full", "--strict", cwd=repo, env=env)
    assert run("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""

    clone = base / "clone"
    run("git", "clone", "-q", repo, clone, env=env)
    run("git", "fsck", "--full", "--strict", cwd=clone, env=env)
    log = run("git", "log", "--format=%s", cwd=clone, env=env).stdout.split()
    assert log == ["second", "first"]
    assert run("git", "status", "--porcelain", cwd=clone, env=env).stdout == ""
    for rel in ("README.txt", "src/main.py", "blob.bin"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes()
    assert not (clone / "README.md").exists()


def test_sqlite_1000_rows_integrity(mnt):
    d = mnt.path / "sqlite"
    d.mkdir()
    db = d / "test.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB)")
    con.execute("CREATE INDEX t_name ON t(name)")
    con.commit()
    for batch in range(10):
        with con:
            con.executemany("INSERT INTO t VALUES (?, ?, ?)",
                            [(batch * 100 + i, f"row {batch * 100 + i}", os.urandom(200)) for i in range(100)])
    con.close()
    assert not (d / "test.db-journal").exists()

    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*), sum(id) FROM t").fetchone() == (1000, sum(range(1000)))
        assert con.execute("SELECT name FROM t WHERE id = 777").fetchone() == ("row 777",)
    finally:
        con.close()
    out = run("sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;").stdout.split()
    assert out == ["ok", "1000"]


def test_tar_extract_into_and_create_out_of_the_mount(mnt, tmp_path):
    src = make_tree(tmp_path / "src", big=3 * 1000 * 1000)
    a1, a2 = tmp_path / "in.tar", tmp_path / "out.tar"
    run("tar", "-C", src, "--format=posix", "--sort=name", "-cf", a1, ".")
    dst = mnt.path / "tar"
    dst.mkdir()
    run("tar", "-C", dst, "-xpf", a1)
    run("tar", "-C", dst, "--format=posix", "--sort=name", "-cf", a2, ".")
    listing = lambda a: run("tar", "--full-time", "-tvf", a).stdout.splitlines()  # noqa: E731
    assert listing(a2) == listing(a1)
    back = tmp_path / "back"
    back.mkdir()
    run("tar", "-C", back, "-xpf", a2)
    run("diff", "-r", src, back)
    run("diff", "-r", src, dst)
    assert_same_metadata(src, back)


def test_gio_copy_list_move_trash(mnt, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
           "GIO_USE_VFS": "local"}
    local = tmp_path / "gio source.txt"
    local.write_bytes(b"gio " * 5000)
    d = mnt.path / "gio"
    d.mkdir()
    run("gio", "copy", local, d / "copied.txt", env=env)
    assert (d / "copied.txt").read_bytes() == local.read_bytes()
    listed = run("gio", "list", d, env=env).stdout.split("\n")
    assert "copied.txt" in [line.strip() for line in listed]
    run("gio", "move", d / "copied.txt", d / "moved \u00e9.txt", env=env)
    assert not (d / "copied.txt").exists()
    assert (d / "moved \u00e9.txt").read_bytes() == local.read_bytes()
    run("gio", "trash", d / "moved \u00e9.txt", env=env)
    assert not (d / "moved \u00e9.txt").exists()
    trashed = [p for p in [mnt.path / ".Trash-0" / "files" / "moved \u00e9.txt",
                           mnt.path / ".Trash" / "0" / "files" / "moved \u00e9.txt",
                           home / ".local/share/Trash/files/moved \u00e9.txt"] if p.exists()]
    assert trashed, "the trashed file is in no trash folder"
    assert trashed[0].read_bytes() == local.read_bytes()


def test_df_and_statvfs_show_real_numbers(mnt):
    out = run("df", "-B1", "--output=size,used,avail,target", mnt.path).stdout.splitlines()
    size, used, avail, target = out[-1].split(None, 3)
    assert target == str(mnt.path)
    assert int(size) > 0 and int(avail) > 0 and int(used) >= 0
    st = os.statvfs(mnt.path)
    assert st.f_blocks > 0 and st.f_bsize > 0
    assert 0 < st.f_bavail <= st.f_blocks
    assert st.f_namemax == 255
