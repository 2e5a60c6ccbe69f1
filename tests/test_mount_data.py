"""File content through the FUSE mount: sparse files, partial reads and edits of
multi-chunk files (measured on the server), byte-exact persistence across
remounts, a randomized read/write/truncate exerciser against an in-memory model,
and tampered ciphertext.

The module runs its own server (unbuffered, so its access log can be counted) and
one account; ``ctx.m`` is the current mount, ``ctx.remount()`` replaces it."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from conftest import backend_kwargs
from mount_helpers import blob_files, one_mount, drop_caches, run, sha256_file, wait_until

MiB = 1 << 20
CS = MiB                      # zkfs.format.CHUNK_SIZE


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, request, backend):
    more = backend_kwargs(request, backend)
    env = {"PYTHONUNBUFFERED": "1", **more.pop("env", {})}
    with one_mount(tmp_path_factory, "zkfs-data-server", env=env, **more) as ctx:
        yield ctx


@pytest.fixture(autouse=True)
def watchdog(ctx):
    with ctx.watched(90):
        yield


def new_blobs(before: dict, after: dict) -> dict:
    return {p: s for p, s in after.items() if p not in before}


# ---------------------------------------------------------------- sparse
def test_sparse_file_seek_100mb_write_one_byte(ctx):
    m = ctx.m
    before = blob_files(ctx.server)
    with open(m.path / "sparse.bin", "wb") as f:
        f.seek(100 * MiB)
        f.write(b"\x7f")
    added = new_blobs(before, blob_files(ctx.server))
    # One tiny chunk holds the byte; the 100 MiB hole costs nothing.
    assert len(added) <= 1 and sum(added.values()) < 64 * 1024, added

    def check(path: Path):
        assert path.stat().st_size == 100 * MiB + 1
        with open(path, "rb") as f:
            zeros = bytes(4 * MiB)
            for off in range(0, 100 * MiB, 4 * MiB):
                assert f.read(4 * MiB) == zeros, off
            assert f.read() == b"\x7f"
            f.seek(100 * MiB - 3)
            assert f.read(10) == b"\0\0\0\x7f"
    check(m.path / "sparse.bin")
    m = ctx.remount()
    check(m.path / "sparse.bin")


# ---------------------------------------------------------------- write-back of renames
def tree_state(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.read_bytes(), stat_bits(p)) for p in sorted(root.rglob("*"))
            if p.is_file()}


def stat_bits(p: Path) -> tuple:
    st = p.stat()
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def test_rsync_sends_one_request_per_file(ctx, tmp_path):
    """rsync's create + write + close + chown + chmod + utimens + rename of each file
    goes through the write-back journal, which sends many files per /fs/ops request.
    A cold mount then sees exactly the source tree (final names, modes, owners,
    mtimes)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    n = 40
    for i in range(n):
        f = src / f"file-{i:02d}.bin"
        f.write_bytes(rng.randbytes(rng.randrange(1, 40000)))
        os.chmod(f, rng.choice([0o600, 0o640, 0o755]))
        os.chown(f, 1000 + i % 3, 2000 + i % 2)
        os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i))
    dst = ctx.m.path / "rsynced"
    ops = len(ctx.requests("POST", "/api/v1/fs/ops"))
    run("rsync", "-a", f"{src}/", f"{dst}/")
    assert tree_state(dst) == tree_state(src)
    ctx.m.settle()
    sent = len(ctx.requests("POST", "/api/v1/fs/ops")) - ops
    assert sent <= n // 2, f"{sent} /fs/ops requests for {n} files"      # was one per file, or more
    fresh = ctx.fresh_mount()
    try:
        wait_until(lambda: tree_state(fresh.path / "rsynced") == tree_state(src), 5,
                   what="a cold mount sees the rsynced tree")
    finally:
        fresh.unmount()


def test_tree_listing_reads_folders_ahead(ctx):
    """`ls -lR` on a cold mount: the listings of the folders it is about to enter
    come ahead, several per request, instead of one round trip per folder, and
    the tree shown is exactly the one written."""
    root = ctx.m.path / "wide"
    for i in range(40):
        d = root / f"d{i:02d}"
        d.mkdir(parents=True)
        for j in range(i % 5):
            (d / f"f{j}").write_text(f"{i}/{j}" * j)
    (root / "d07" / "deeper" / "deepest").mkdir(parents=True)
    (root / "d07" / "deeper" / "deepest" / "leaf").write_text("leaf")
    os.fsync(os.open(root, os.O_RDONLY))      # written-back attributes are on the server
    # (Folder mtimes: test_mount_local_disk.py::test_directory_mtimes_survive_a_remount.)
    listing = ["find", ".", "-printf", r"%p %y %m %U %G %s %n\n", "-type", "f", "-printf", r"%p %T@\n"]
    expected = run(*listing, cwd=root).stdout
    fresh = ctx.fresh_mount()
    try:
        before = len(ctx.requests("GET", "/api/v1/fs/dirs/")) + len(ctx.requests("POST", "/api/v1/fs/listings"))
        run("ls", "-lR", fresh.path / "wide")
        sent = len(ctx.requests("GET", "/api/v1/fs/dirs/")) + len(ctx.requests("POST", "/api/v1/fs/listings")) - before
        assert sent <= 12, f"{sent} listing requests for 44 folders"
        assert run(*listing, cwd=fresh.path / "wide").stdout == expected
    finally:
        fresh.unmount()


def test_renames_written_back_in_order(ctx):
    """Name reuse right after a deferred rename (git's lockfile pattern, editors'
    save-by-rename): each step sees the previous one, locally and on the server."""
    d = ctx.m.path / "renames"
    d.mkdir()
    (d / "config.lock").write_text("v1")
    os.rename(d / "config.lock", d / "config")
    (d / "config.lock").write_text("v2")              # the name the rename freed
    os.rename(d / "config.lock", d / "config")        # over the file just renamed
    (d / "a").write_text("a")
    os.rename(d / "a", d / "b")
    os.rename(d / "b", d / "c")                       # a chain, before anything was sent
    (d / "a").write_text("a again")
    expect = {"a": "a again", "c": "a", "config": "v2"}
    assert {p.name: p.read_text() for p in d.iterdir()} == expect
    m = ctx.remount()                                  # unmount sends what is left
    assert {p.name: p.read_text() for p in (m.path / "renames").iterdir()} == expect


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_mount_memory_stays_flat_under_parallel_readers(ctx):
    """16 processes at once listing and reading a tree, round after round: libfuse
    starts and ends worker threads by the hundred under such load, and the mount
    must not keep anything per thread it has seen (it once kept each one's Python
    thread state: 8.6 MiB more over these 4 rounds)."""
    root = ctx.m.path / "parallel"
    for d in range(16):
        (root / f"d{d:02d}").mkdir(parents=True)
        for i in range(10):
            (root / f"d{d:02d}" / f"f{i}").write_bytes(os.urandom(3000))

    def round_of_readers():
        script = f'for i in 1 2 3 4; do cat "{root}"/d*/f{{0,1}} >/dev/null; ls -lR "{root}" >/dev/null; done'
        procs = [subprocess.Popen(["bash", "-c", script]) for _ in range(16)]
        assert [p.wait(timeout=120) for p in procs] == [0] * 16

    round_of_readers()                       # caches fill, libfuse's pool grows
    before = rss_kib(ctx.m.pid)
    for _ in range(4):
        round_of_readers()
    grown = rss_kib(ctx.m.pid) - before
    assert grown < 4 * 1024, f"mount RSS grew {grown} KiB over 4 rounds"


# ---------------------------------------------------------------- partial reads and edits
def test_reads_fetch_only_the_chunks_they_cover(ctx):
    data = os.urandom(8 * CS)
    (ctx.m.path / "ranged.bin").write_bytes(data)
    fresh = ctx.fresh_mount()
    drop_caches()
    gets = len(ctx.requests("GET"))
    fd = os.open(fresh.path / "ranged.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 5 * CS + 1000) == data[5 * CS + 1000: 5 * CS + 5096]
    finally:
        os.close(fd)
    fetched = ctx.requests("GET")[gets:]
    assert len(fetched) == 1, fetched
    fresh.unmount()


def test_small_edit_in_the_middle_uploads_only_the_chunks_touched(ctx):
    m = ctx.m
    data = bytearray(os.urandom(8 * CS))
    path = m.path / "big-edit.bin"
    path.write_bytes(data)
    m.settle()

    before, puts = blob_files(ctx.server), len(ctx.requests("PUT"))
    patch = os.urandom(100)
    with open(path, "r+b") as f:
        f.seek(4 * CS + 12345)
        f.write(patch)
    data[4 * CS + 12345: 4 * CS + 12445] = patch
    m.settle()
    after = blob_files(ctx.server)
    added = new_blobs(before, after)
    assert len(added) == 1, added
    assert sum(added.values()) < CS + 64 * 1024
    assert len(ctx.requests("PUT")[puts:]) <= 1
    # The replaced chunk is dropped: the file still occupies about 8 chunks.
    assert sum(after.values()) - sum(before.values()) < 64 * 1024

    # An edit across a chunk boundary touches exactly the two chunks around it.
    before = blob_files(ctx.server)
    patch = os.urandom(10)
    with open(path, "r+b") as f:
        f.seek(6 * CS - 5)
        f.write(patch)
    data[6 * CS - 5: 6 * CS + 5] = patch
    m.settle()
    added = new_blobs(before, blob_files(ctx.server))
    assert len(added) == 2 and sum(added.values()) < 2 * CS + 64 * 1024, added

    assert path.read_bytes() == data
    m = ctx.remount()
    assert sha256_file(m.path / "big-edit.bin") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- persistence
SIZES = [0, 1, 4095, 64 * 1024, 64 * 1024 + 1, CS - 1, CS, CS + 1, 3 * CS + 17, 5 * CS]


@pytest.mark.backends
def test_unmount_remount_every_byte(ctx):
    m = ctx.m
    base = m.path / "persist"
    (base / "nested \u00e9" / "deeper").mkdir(parents=True)
    expected = {}
    for i, size in enumerate(SIZES):
        rel = f"nested \u00e9/deeper/f{i}" if i % 3 == 0 else f"f{i}.bin"
        data = os.urandom(size)
        (base / rel).write_bytes(data)
        expected[rel] = hashlib.sha256(data).hexdigest()
    # Rewritten in place and grown/shrunk before the unmount.
    with open(base / "f1.bin", "r+b") as f:
        f.seek(CS + 5)
        f.write(b"grown")
    expected["f1.bin"] = sha256_file(base / "f1.bin")
    os.truncate(base / "f7.bin", CS // 2)
    expected["f7.bin"] = sha256_file(base / "f7.bin")

    m = ctx.remount()
    drop_caches()
    base = m.path / "persist"
    for rel, digest in expected.items():
        assert sha256_file(base / rel) == digest, rel
    assert (base / "f1.bin").stat().st_size == CS + 10
    assert (base / "f7.bin").stat().st_size == CS // 2
    found = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    assert found == sorted(expected)


# ---------------------------------------------------------------- randomized
class Model:
    """Files as bytearrays, and the open descriptor of each (or None)."""

    def __init__(self, root: Path, names):
        self.root = root
        self.data = {n: bytearray() for n in names}
        self.fd = {n: None for n in names}


def _offset(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.4:       # right around a chunk boundary
        k = rng.randint(0, max(1, size // CS + 1))
        return max(0, k * CS + rng.randint(-64, 64))
    return rng.randint(0, max(0, size))


def _length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.randint(1, 200)
    if r < 0.85:
        return rng.randint(1, 128 * 1024)
    return rng.randint(CS // 2, CS + CS // 2)


def test_randomized_exerciser_against_a_model(ctx):
    rng = random.Random(20240601)
    root = ctx.m.path / "random"
    root.mkdir()
    names = ["a.bin", "b.bin", "c \u00e9.bin"]
    model = Model(root, names)
    max_size = 5 * CS
    hist: list[str] = []

    def trail() -> str:
        return "recent operations:\n" + "\n".join(hist[-15:])

    def note(text: str) -> None:
        hist.append(f"{step:3d} {text}")

    def resize(name: str, new: int) -> None:
        d = model.data[name]
        if new < len(d):
            del d[new:]
        else:
            d.extend(bytes(new - len(d)))

    def fd_of(name: str) -> int:
        if model.fd[name] is None:
            flags = os.O_RDWR | os.O_CREAT
            if model.data[name] and rng.random() < 0.05:
                flags |= os.O_TRUNC
                model.data[name].clear()
            note(f"open {name}{' O_TRUNC' if flags & os.O_TRUNC else ''}")
            model.fd[name] = os.open(root / name, flags, 0o644)
            size = os.fstat(model.fd[name]).st_size
            assert size == len(model.data[name]), (name, size, len(model.data[name]), trail())
        return model.fd[name]

    def check_read(name: str, off: int, n: int, fd: int | None = None) -> None:
        got = os.pread(fd if fd is not None else fd_of(name), n, off)
        want = bytes(model.data[name][off: off + n])
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise AssertionError(f"{name}: pread({n}, {off}) returned {len(got)} bytes, expected {len(want)};"
                                 f" first difference at file offset {off + first}; model size "
                                 f"{len(model.data[name])}\n{trail()}")

    def write(name: str, off: int, payload: bytes) -> None:
        d = model.data[name]
        fd = fd_of(name)
        note(f"pwrite {name} off={off} len={len(payload)} (size {len(d)})")
        if off > len(d):
            d.extend(bytes(off - len(d)))
        d[off: off + len(payload)] = payload
        assert os.pwrite(fd, payload, off) == len(payload)

    ops = ["write"] * 30 + ["read"] * 30 + ["sparse"] * 5 + ["truncate"] * 8 + ["reopen"] * 8 + \
          ["fsync"] * 3 + ["second_fd"] * 5 + ["path_truncate"] * 3 + ["append"] * 3 + ["full_check"] * 2
    step = 0
    completed = False
    try:
        for name in names:
            fd_of(name)
        for step in range(700):
            name = rng.choice(names)
            d = model.data[name]
            op = rng.choice(ops)
            if len(d) > max_size and op in ("write", "sparse", "append"):
                op = "truncate"
            if op == "write":
                write(name, _offset(rng, len(d)), rng.randbytes(_length(rng)))
            elif op == "read":
                off, n = _offset(rng, len(d)), _length(rng)
                note(f"pread {name} off={off} len={n}")
                check_read(name, off, n)
            elif op == "sparse":           # a write well past EOF leaves a hole
                write(name, len(d) + rng.randint(CS // 2, 2 * CS), rng.randbytes(rng.randint(1, 100)))
            elif op == "truncate":
                r = rng.random()
                if r < 0.6:                # to the middle of some chunk
                    new = rng.randint(0, max(0, len(d) - 1) // CS) * CS + rng.randint(1, CS - 1)
                elif r < 0.8:              # exactly on a boundary
                    new = rng.randint(0, 4) * CS
                else:                      # grow
                    new = len(d) + rng.randint(1, 2 * CS)
                new = min(new, max_size)
                fd = fd_of(name)
                note(f"ftruncate {name} {len(d)} -> {new}")
                os.ftruncate(fd, new)
                resize(name, new)
            elif op == "path_truncate":
                new = rng.randint(0, len(d) + CS)
                note(f"truncate(path) {name} {len(d)} -> {new} (open: {model.fd[name] is not None})")
                os.truncate(root / name, new)
                resize(name, new)
            elif op == "reopen":
                if model.fd[name] is not None:
                    note(f"close {name}")
                    os.close(model.fd[name])
                    model.fd[name] = None
                size = os.stat(root / name).st_size
                assert size == len(d), (name, size, len(d), trail())
            elif op == "fsync":
                note(f"fsync {name}")
                os.fsync(fd_of(name))
            elif op == "second_fd":        # another descriptor sees the same bytes
                fd_of(name)
                off, n = _offset(rng, len(d)), _length(rng)
                note(f"second fd: pread {name} off={off} len={n}")
                fd2 = os.open(root / name, os.O_RDONLY)
                try:
                    check_read(name, off, n, fd2)
                finally:
                    os.close(fd2)
            elif op == "append":
                payload = rng.randbytes(rng.randint(1, 5000))
                fd_of(name)
                note(f"O_APPEND write {name} len={len(payload)} (size {len(d)})")
                fda = os.open(root / name, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fda, payload)
                finally:
                    os.close(fda)
                d.extend(payload)
            elif op == "full_check":
                note(f"full read {name}")
                check_read(name, 0, len(d) + 10)
            if len(d) and rng.random() < 0.3:   # frequent spot checks near the last change
                off, n = max(0, len(d) - rng.randint(1, 3 * CS)), rng.randint(1, 2 * CS)
                note(f"spot pread {name} off={off} len={n}")
                check_read(name, off, n)
        completed = True
    finally:                                 # never leave descriptors open on the mount
        for name, fd in model.fd.items():
            if fd is not None:
                model.fd[name] = None
                try:
                    os.close(fd)
                except OSError:
                    if completed:            # else keep the original failure
                        raise

    for name in names:
        assert (root / name).read_bytes() == model.data[name], (name, trail())
    sizes = {n: len(model.data[n]) for n in names}
    assert any(s > 2 * CS for s in sizes.values()), sizes

    m = ctx.remount()
    for name in names:
        path = m.path / "random" / name
        assert path.stat().st_size == len(model.data[name])
        assert path.read_bytes() == model.data[name], name


# ---------------------------------------------------------------- tampering
def test_after_a_failed_write_close_reports_it_and_publishes_nothing(ctx):
    """A write() that failed (here: the chunk it edits fails verification) means the
    writer's data is incomplete: its close() says EIO and the server keeps the
    previous version, with none of the writes that did succeed."""
    d = ctx.m.path / "failed-write"
    d.mkdir()
    original = os.urandom(CS + 100_000)
    ctx.m.settle()
    before = blob_files(ctx.server)
    (d / "f.bin").write_bytes(original)
    ctx.m.settle()
    blobs = new_blobs(before, blob_files(ctx.server))
    assert len(blobs) == 2, blobs
    second = min(blobs, key=blobs.get)     # chunk 1: the short one
    saved = second.read_bytes()
    second.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))

    writer = ctx.fresh_mount()         # cold cache: editing chunk 1 must fetch it
    try:
        fd = os.open(writer.path / "failed-write" / "f.bin", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"N" * CS, 0) == CS
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x", CS + 10)
            assert ei.value.errno == errno.EIO
        finally:
            with pytest.raises(OSError) as ei:
                os.close(fd)
        assert ei.value.errno == errno.EIO
    finally:
        writer.unmount()
    second.write_bytes(saved)
    reader = ctx.fresh_mount()
    try:
        assert (reader.path / "failed-write" / "f.bin").read_bytes() == original
    finally:
        reader.unmount()


def test_tampered_ciphertext_reads_eio_and_logs_the_file(ctx):
    m = ctx.m
    d = m.path / "tamper"
    d.mkdir()
    good = os.urandom(200_000)
    (d / "good.bin").write_bytes(good)
    m.settle()
    before = blob_files(ctx.server)
    bad = os.urandom(200_000)
    (d / "bad.bin").write_bytes(bad)
    m.settle()
    added = new_blobs(before, blob_files(ctx.server))
    assert len(added) == 1, added
    (blob,) = added
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(raw)

    fresh = ctx.fresh_mount()          # cold cache: it must fetch the tampered blob
    drop_caches()
    for _ in range(2):
        with pytest.raises(OSError) as ei:
            (fresh.path / "tamper" / "bad.bin").read_bytes()
        assert ei.value.errno == errno.EIO
    lines = [line for line in fresh.log().splitlines() if "bad.bin" in line]
    assert any("ERROR" in line for line in lines), fresh.log()
    assert (fresh.path / "tamper" / "good.bin").read_bytes() == good
    assert (fresh.path / "tamper" / "bad.bin").stat().st_size == 200_000
    assert fresh.is_mounted()
    fresh.unmount()
