"""Fault injection: the server or the mount dies, the disk fills up, several
writers race. All I/O on a mount runs in a helper thread (``Bg``) with a bound, so
a hung mount fails the test instead of hanging it, and the fixtures still clean up.

Sizes and durations (environment):
  ZKFS_FAULT_MB            size of the upload that the server dies in (default 500, as the issue says)
  ZKFS_CONFLICT_SECONDS    how long the concurrent writers run (default 20)
"""
from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zkfs.transfer import download_file
from faultkit import (Bg, MiB, client_vault, make_pattern_file, pattern_sha, py_stacks, remote_node, remote_sha,
                      sha256_bytes, storage_bytes, temp_leftovers, tmpfs, wait_until, write_pattern)
from harness import REPO, Mount

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

FAULT_MB = int(os.environ.get("ZKFS_FAULT_MB", "500"))   # the 500 MB
CONFLICT_SECONDS = float(os.environ.get("ZKFS_CONFLICT_SECONDS", "20"))
MOUNT_RETRY = 60          # the mount retries an unreachable server this long (zkfs/mount/cli.py)
CLI_RETRY = 5             # the CLI's window (zkfs/api.py default)
OLD_MB = 8
KILL_AFTER = 48 * MiB     # kill the server once its storage has grown this much


def io(fn, timeout: float = 60, what: str = "mount I/O", mount=None):
    bg = Bg(fn, what)
    if not bg.wait(timeout):
        stacks = f"; mount stacks:\n{py_stacks(mount.pid)}\nmount log:\n{mount.log()[-2000:]}" if mount else ""
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s (hung){stacks}")
    return bg.value(0, what)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def observer(make_machine, srv, owner):
    m = make_machine(srv)
    m.login(owner.username, owner.password)
    return m, client_vault(m, retry_seconds=1)


class Watcher:
    """Polls (version, size) of one remote file from another machine: a partial or
    torn version must never be visible there."""

    def __init__(self, vault, path: str, interval: float = 0.2):
        self.seen: list[tuple[int, int]] = []
        self.stop = threading.Event()

        def run():
            while not self.stop.wait(interval):
                try:
                    node = remote_node(vault, path)
                except Exception:          # noqa: BLE001 - the server is down: nothing visible
                    continue
                self.seen.append((node.version, node.attrs.size) if node else (-1, -1))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> list[tuple[int, int]]:
        self.stop.set()
        self.thread.join(10)
        return self.seen


def wait_for_growth(srv, base: int, busy: Bg | subprocess.Popen, timeout: float = 180) -> None:
    def grown():
        finished = busy.done.is_set() if isinstance(busy, Bg) else busy.poll() is not None
        assert not finished, "the upload finished before the server could be killed (raise ZKFS_FAULT_MB)"
        return storage_bytes(srv) - base >= KILL_AFTER
    wait_until(grown, timeout, 0.02, "the server's storage to grow")


# ------------------------------------------------------------------ server dies mid-upload
def test_server_killed_mid_upload_through_the_mount(make_server, make_machine, make_mount, tmp_path):
    srv = make_server()
    owner = make_machine(srv).register()
    # --sync: close() waits for the server, so the writer is told (EIO) 10 s into the
    # outage; without it the journal takes the file (tests/test_mount_journal.py).
    mnt = make_mount(owner, "--sync", "--retry-seconds", "10")
    target = mnt.path / "big.bin"

    def write_version(n_mib: int, seed: int) -> str:
        with open(target, "wb") as f:           # what cp does: O_WRONLY|O_CREAT|O_TRUNC
            return write_pattern(f, n_mib, seed)

    old_sha = io(lambda: write_version(OLD_MB, seed=1), 120, "writing the old version", mnt)
    _, vault = observer(make_machine, srv, owner)
    old = remote_node(vault, "/big.bin")
    assert old is not None and old.attrs.size == OLD_MB * MiB
    old_state = (old.version, old.attrs.size)

    watcher = Watcher(vault, "/big.bin")
    base = storage_bytes(srv)
    writer = Bg(lambda: write_version(FAULT_MB, seed=2), "writer")
    wait_for_growth(srv, base, writer)
    srv.kill()
    killed_at = time.monotonic()

    # The writer must be told, clearly and in bounded time: an OSError (EIO).
    finished = writer.wait(MOUNT_RETRY + 60)
    seen_while_down = watcher.finish()
    if not finished:
        stacks = py_stacks(mnt.pid)
        srv.start()                  # let the stuck mount drain so that the teardown is quick
    assert finished, (f"writing to the mount still blocked {time.monotonic() - killed_at:.0f} s after the server "
                      f"died (mount retry window {MOUNT_RETRY} s): no error reached the application\n"
                      f"{stacks}\n{mnt.log()[-3000:]}")
    assert isinstance(writer.error, OSError), f"expected an OSError, the write returned {writer.result!r} / {writer.error!r}"
    assert writer.error.errno == errno.EIO, writer.error
    print(f"\nmount: server killed; the writer got {writer.error!r} after {writer.finished_at - killed_at:.1f} s")

    interrupted = set(temp_leftovers(srv))
    srv.start()
    assert not interrupted & set(temp_leftovers(srv)), "temp files of the interrupted upload survived a restart"
    assert set(seen_while_down) <= {old_state}, f"a partial version was visible: {sorted(set(seen_while_down))}"
    # The close failed with EIO and the mount kept the data for a retry: after the
    # restart the file is the previous version, or the complete new one once that
    # retry has gone through, never anything in between.
    now = remote_node(vault, "/big.bin")
    assert now.attrs.size in (OLD_MB * MiB, FAULT_MB * MiB)
    assert remote_sha(vault, "/big.bin", tmp_path) in (old_sha, pattern_sha(FAULT_MB, 2))

    # the same operation succeeds once the server is back
    watcher = Watcher(vault, "/big.bin")
    new_sha = io(lambda: write_version(FAULT_MB, seed=2), 600, "writing the new version again", mnt)
    seen = watcher.finish()
    assert new_sha == pattern_sha(FAULT_MB, 2)
    final = remote_node(vault, "/big.bin")
    assert final.attrs.size == FAULT_MB * MiB
    assert remote_sha(vault, "/big.bin", tmp_path) == new_sha
    sizes = {size for _v, size in seen}
    assert sizes <= {OLD_MB * MiB, FAULT_MB * MiB}, f"a partial version was visible: sizes {sorted(sizes)}"


def test_server_killed_mid_upload_through_the_cli(make_server, make_machine, tmp_path):
    srv = make_server()
    owner = make_machine(srv).register()
    big = tmp_path / "src" / "big.bin"
    old_sha = make_pattern_file(big, OLD_MB, seed=3)
    owner.run("upload", str(big))
    new_sha = make_pattern_file(big, FAULT_MB, seed=4)
    _, vault = observer(make_machine, srv, owner)
    old = remote_node(vault, "/big.bin")
    old_state = (old.version, old.attrs.size)

    watcher = Watcher(vault, "/big.bin")
    base = storage_bytes(srv)
    proc = subprocess.Popen([sys.executable, str(REPO / "client.py"), "upload", str(big)], env=owner.env(),
                            cwd=owner.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_growth(srv, base, proc)
        srv.kill()
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=CLI_RETRY + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    took = time.monotonic() - killed_at
    seen_while_down = watcher.finish()
    print(f"\ncli: server killed; the upload exited {proc.returncode} after {took:.1f} s: {err.strip()}")
    assert proc.returncode != 0, out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert re.search(r"reach|connect|unreachable|server", lines[0], re.I), lines[0]
    assert "uploaded" not in out

    srv.start()
    assert temp_leftovers(srv) == [], "temp files of the interrupted upload survived a restart"
    now = remote_node(vault, "/big.bin")
    assert (now.version, now.attrs.size) == old_state
    assert remote_sha(vault, "/big.bin", tmp_path) == old_sha
    assert set(seen_while_down) <= {old_state}, f"a partial version was visible: {sorted(set(seen_while_down))}"

    watcher = Watcher(vault, "/big.bin")
    again = owner.run("upload", str(big), timeout=600)
    seen = watcher.finish()
    assert f"uploaded /big.bin ({FAULT_MB * MiB} bytes)" in again.stdout, again.stdout
    assert remote_sha(vault, "/big.bin", tmp_path) == new_sha
    sizes = {size for _v, size in seen}
    assert sizes <= {OLD_MB * MiB, FAULT_MB * MiB}, f"a partial version was visible: sizes {sorted(sizes)}"


# ------------------------------------------------------------------ server restarts under a mount
def test_mount_carries_on_across_server_restarts_and_token_expiry(make_server, make_machine, make_mount, tmp_path):
    srv = make_server(env={"ZKFS_TOKEN_TTL_SECONDS": "3"})
    owner = make_machine(srv).register()
    mnt = make_mount(owner)
    p = mnt.path
    blob = os.urandom(3 * MiB + 123)
    io(lambda: (write_file(p / "a.txt", b"alpha"), os.mkdir(p / "d"), write_file(p / "d" / "b.bin", blob)))
    expected = {"a.txt": b"alpha", "d/b.bin": blob}

    def check(tag: str) -> None:
        def run():
            assert sorted(os.listdir(p)) == sorted({n.split("/")[0] for n in expected}), (tag, os.listdir(p))
            for name, data in expected.items():
                got = (p / name).read_bytes()
                assert got == data, (tag, name, len(got), len(data))
            new = f"{tag}.txt"
            write_file(p / new, tag.encode() * 100)
            expected[new] = tag.encode() * 100
            os.rename(p / new, p / f"{tag}-renamed.txt")
            expected[f"{tag}-renamed.txt"] = expected.pop(new)
            assert (p / f"{tag}-renamed.txt").read_bytes() == expected[f"{tag}-renamed.txt"]
        io(run, 90, f"mount I/O after {tag}")

    srv.stop()
    srv.start()
    check("graceful-restart")
    srv.kill()
    srv.start()
    check("kill-restart")
    # I/O issued while the server is down completes once it is back
    srv.kill()
    pending = Bg(lambda: (write_file(p / "during-outage.txt", b"queued"), (p / "during-outage.txt").read_bytes()))
    time.sleep(2)
    srv.start()
    assert pending.value(MOUNT_RETRY, "I/O issued during the outage")[1] == b"queued"
    expected["during-outage.txt"] = b"queued"
    # the token (3 s) expires, twice over: the mount logs in again by itself
    time.sleep(4)
    check("token-expired-1")
    time.sleep(4)
    check("token-expired-2")
    assert mnt.is_mounted()
    # another machine sees exactly the same tree, once the renames written back
    # within 0.5 s are sent: fsync of the folder sends them at once
    fd = os.open(mnt.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _, vault = observer(make_machine, srv, owner)
    names = {n for n, _ in vault.listdir(vault.root)}
    assert names == {n.split("/")[0] for n in expected}
    assert remote_sha(vault, "/d/b.bin", tmp_path) == sha256_bytes(blob)
    assert "Traceback" not in mnt.log()


# ------------------------------------------------------------------ the mount dies
def test_mount_killed_while_writing(make_server, make_machine, make_mount, tmp_path):
    srv = make_server()
    owner = make_machine(srv).register()
    mnt = make_mount(owner)
    closed: dict[str, str] = {}
    in_flight: dict[str, str] = {}
    rng = random.Random(5)

    def writer():
        for i in range(10_000):
            name = f"w{i:04d}.bin"
            data = os.urandom(rng.choice([10_000, 200_000, 1_100_000, 2_500_000]))
            in_flight.clear()
            in_flight[name] = sha256_bytes(data)
            with open(mnt.path / name, "wb") as f:
                f.write(data)
            closed[name] = sha256_bytes(data)        # only once close() returned 0

    w = Bg(writer, "writer")
    wait_until(lambda: len(closed) >= 12 or w.done.is_set(), 120, 0.01, "12 files written")
    assert not w.done.is_set(), w.error
    mnt.kill()
    assert w.wait(30), "a write to a dead mount did not fail"
    assert isinstance(w.error, OSError), w.error
    snapshot = dict(closed)
    assert mnt.is_mounted()
    with pytest.raises(OSError) as dead:
        os.stat(mnt.path)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), dead.value

    # mount.py --unmount cleans up the dead mount; a fresh mount at the same place sends
    # what the killed one had journaled before it serves anything
    done = mnt.unmount()
    assert done.returncode == 0, done.stderr
    assert not mnt.is_mounted()
    again = Mount(owner, mnt.path, [])
    try:
        again.start()
        # every file whose close() succeeded is on the server, complete
        _, vault = observer(make_machine, srv, owner)
        remote = {n: node for n, node in vault.listdir(vault.root)}
        for name, sha in snapshot.items():
            assert name in remote, f"{name} was closed before the kill but is not on the server"
            assert remote_sha(vault, "/" + name, tmp_path) == sha, f"{name} is not what was written"
        # at most the file being written at the kill is extra, and it is empty or complete, never torn
        extra = set(remote) - set(snapshot)
        assert extra <= set(in_flight), (extra, in_flight)
        for name in extra:
            if remote[name].attrs.size:
                assert remote_sha(vault, "/" + name, tmp_path) == in_flight[name], f"{name} is torn"
        names = io(lambda: sorted(os.listdir(again.path)))
        assert set(snapshot) <= set(names)
        first = sorted(snapshot)[0]
        assert sha256_bytes(io(lambda: (again.path / first).read_bytes())) == snapshot[first]
        io(lambda: write_file(again.path / "after.txt", b"fresh mount works"))
        assert io(lambda: (again.path / "after.txt").read_bytes()) == b"fresh mount works"
        again.unmount()
    finally:
        again.cleanup()
    assert remote_sha(vault, "/after.txt", tmp_path) == sha256_bytes(b"fresh mount works")


# ------------------------------------------------------------------ the server's disk fills up
def test_server_disk_full(make_machine, make_mount, tmp_path_factory, tmp_path):
    from conftest import ServerProcess
    data_dir = tmp_path_factory.mktemp("zkfs-full")
    with tmpfs(data_dir / "storage", "64m"):
        srv = ServerProcess(data_dir)
        mnt = None
        try:
            srv.start()
            owner = make_machine(srv).register()
            # --sync: close() and fsync() report ENOSPC from the server
            mnt = make_mount(owner, "--sync", "--retry-seconds", "10")
            p = mnt.path
            keep1 = io(lambda: sha256_bytes(_write_pattern_file(p / "keep1.bin", 6, seed=10)), 60, "writing keep1", mnt)
            local = tmp_path / "local"
            keep2 = make_pattern_file(local / "keep2.bin", 4, seed=11)
            owner.run("upload", str(local / "keep2.bin"))

            # the mount: a file larger than the disk fails with ENOSPC (at write, flush or close)
            def too_big():
                with open(p / "huge.bin", "wb") as f:
                    write_pattern(f, 100, seed=12)
                    f.flush()
                    os.fsync(f.fileno())
            bg = Bg(too_big, "huge write")
            assert bg.wait(180), f"writing past a full disk hung\n{py_stacks(mnt.pid)}"
            assert isinstance(bg.error, OSError), f"a 100 MiB file fit on a 64 MiB disk? {bg.error!r}"
            assert bg.error.errno == errno.ENOSPC, bg.error
            # the CLI: one clear line
            make_pattern_file(local / "huge-cli.bin", 80, seed=13)
            proc = owner.run("upload", str(local / "huge-cli.bin"), check=False)
            assert proc.returncode != 0
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
            assert re.search(r"space|full|quota", lines[0], re.I), lines[0]

            # nothing stored before is damaged
            _, vault = observer(make_machine, srv, owner)
            assert remote_sha(vault, "/keep1.bin", tmp_path) == keep1
            assert remote_sha(vault, "/keep2.bin", tmp_path) == keep2
            assert io(lambda: sha256_bytes((p / "keep2.bin").read_bytes()), 60, "reading keep2", mnt) == keep2

            # deleting makes room again, for the mount and for the CLI
            io(lambda: os.unlink(p / "keep1.bin"), 60, "unlink keep1", mnt)
            try:
                io(lambda: os.unlink(p / "huge.bin"), 60, "unlink huge", mnt)
            except FileNotFoundError:
                # a new file whose first commit failed may never have reached the server; but
                # if the server has it, the mount must show it too (give the change feed 3 s)
                on_server = remote_node(vault, "/huge.bin")
                time.sleep(3)
                listed = io(lambda: os.listdir(p), 60, "listing after ENOENT", mnt)
                assert on_server is None, (f"huge.bin is on the server ({on_server.attrs.size} bytes) but the "
                                           f"mount says ENOENT; mount lists {listed}")
            small = os.urandom(2 * MiB)
            io(lambda: write_file(p / "after.bin", small), 60, "writing after a delete", mnt)
            make_pattern_file(local / "after-cli.bin", 1, seed=14)
            owner.run("upload", str(local / "after-cli.bin"))
            assert remote_sha(vault, "/after.bin", tmp_path) == sha256_bytes(small)
            assert remote_sha(vault, "/keep2.bin", tmp_path) == keep2
            assert "Traceback" not in srv.log()
        finally:
            if mnt is not None:
                mnt.cleanup()                    # before the server goes: the mount flushes on exit
            srv.stop()


def _write_pattern_file(path: Path, n_mib: int, seed: int) -> bytes:
    import io as _io
    buf = _io.BytesIO()
    write_pattern(buf, n_mib, seed)
    data = buf.getvalue()
    write_file(path, data)
    return data


# ------------------------------------------------------------------ concurrent writers
def test_two_mounts_and_the_cli_write_the_same_files(make_server, make_machine, make_mount, tmp_path):
    srv = make_server()
    a = make_machine(srv).register()
    b = make_machine(srv)
    b.login(a.username, a.password)
    c = make_machine(srv)
    c.login(a.username, a.password)
    ma, mb = make_mount(a), make_mount(b)
    names = ["s0.txt", "s1.txt", "s2.bin"]
    versions: dict[str, str] = {}                 # sha -> "writer:seq" of every version written
    successes: list[dict] = []
    errors: list[str] = []
    cli_conflicts = 0
    stop_at = time.monotonic() + CONFLICT_SECONDS
    lock = threading.Lock()

    def content(wid: str, seq: int, rng: random.Random) -> bytes:
        size = rng.choice([50, 5_000, 80_000, 300_000, 1_300_000])
        head = f"{wid}:{seq}:".encode()
        return head + rng.randbytes(size)

    def mount_writer(wid: str, root: Path):
        rng = random.Random(wid)
        seq = 0
        while time.monotonic() < stop_at:
            seq += 1
            name = rng.choice(names)
            data = content(wid, seq, rng)
            with lock:
                versions[sha256_bytes(data)] = f"{wid}:{seq}"
            t_open = time.monotonic()
            try:
                write_file(root / name, data)
            except OSError as exc:
                with lock:
                    errors.append(f"{wid} {name}: {exc!r}")
                continue
            with lock:
                successes.append({"w": wid, "name": name, "sha": sha256_bytes(data), "t_open": t_open,
                                  "t_done": time.monotonic()})
            time.sleep(rng.random() * 0.2)

    def cli_writer(wid: str):
        nonlocal cli_conflicts
        rng = random.Random(wid)
        local = tmp_path / wid
        local.mkdir()
        seq = 0
        while time.monotonic() < stop_at:
            seq += 1
            name = rng.choice(names)
            data = content(wid, seq, rng)
            with lock:
                versions[sha256_bytes(data)] = f"{wid}:{seq}"
            (local / name).write_bytes(data)
            t_open = time.monotonic()
            # t_done is when the CLI says "uploaded" (right after its commit), not its
            # exit: saving its records and interpreter shutdown come after the commit,
            # and a mount's write committed meanwhile legitimately replaces this one.
            proc = subprocess.Popen([sys.executable, str(REPO / "client.py"), "upload", str(local / name)],
                                    env=c.env() | {"PYTHONUNBUFFERED": "1"}, cwd=c.home, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            t_done = None
            for line in proc.stdout:
                if line.startswith("uploaded") and t_done is None:
                    t_done = time.monotonic()
            stderr = proc.stderr.read()
            proc.wait(120)
            if proc.returncode == 0 and t_done is not None:
                with lock:
                    successes.append({"w": wid, "name": name, "sha": sha256_bytes(data), "t_open": t_open,
                                      "t_done": t_done})
            elif (re.search(r"conflict|changed|version", stderr, re.I) and stderr.startswith("error:")
                  and stderr.count("\n") <= 1):
                cli_conflicts += 1                # told clearly; the local file is still there
            else:
                with lock:
                    errors.append(f"{wid} {name}: exit {proc.returncode}: {stderr.strip()[:300]}")

    workers = [Bg(lambda: mount_writer("A", ma.path), "A"), Bg(lambda: mount_writer("B", mb.path), "B"),
               Bg(lambda: cli_writer("C"), "C")]
    for w in workers:
        assert w.wait(CONFLICT_SECONDS + 180), (f"writer {w.thread.name} hung\n{py_stacks(ma.pid)}\n"
                                                 f"{py_stacks(mb.pid)}")
        assert w.error is None, repr(w.error)
    # let both mounts publish anything pending, then read the server's final state
    ma.unmount()
    mb.unmount()
    _, vault = observer(make_machine, srv, a)
    final: dict[str, str] = {}
    for name, node in vault.listdir(vault.root):
        final[name] = remote_sha(vault, "/" + name, tmp_path)
    conflict_re = re.compile(r"^(?P<stem>.+) \(conflict [^)]*\)(?P<ext>\.\w+)?$")
    copies: dict[str, set[str]] = {n: set() for n in names}
    at_name = {n: final.get(n) for n in names}
    def describe(n: str) -> str:        # which version it starts as, and how long it is
        out = tmp_path / "describe.bin"
        download_file(vault, vault.resolve("/" + n), out)
        data = out.read_bytes()
        return f"{n} ({final[n][:12]}, {len(data)} bytes, starts {data[:12]!r})"
    corrupt = [describe(n) for n, sha in final.items() if sha not in versions]
    for n, sha in final.items():
        if n in names:
            continue
        m = conflict_re.match(n)
        assert m, f"unexpected file {n!r}"
        original = m.group("stem") + (m.group("ext") or "")
        assert original in names, n
        copies[original].add(sha)
    summary = (f"{len(successes)} successful writes ({sum(1 for s in successes if s['w'] == 'C')} by the CLI), "
               f"{cli_conflicts} CLI conflicts reported, "
               f"{sum(len(v) for v in copies.values())} conflict copies, errors: {errors[:10]}")
    print("\nconcurrent writers:", summary)
    assert not errors, summary
    assert not corrupt, f"files that are no complete version: {corrupt}; {summary}"
    for n in names:
        assert at_name[n] is not None, f"{n} is gone; {summary}"

    # no lost update: each writer's last successful write of a name is at the name, in a
    # conflict copy, or was replaced by a write that finished after it and itself went to
    # the name (not into a conflict copy). "Finished after" rather than "started after":
    # the CLI records its start before ~0.4 s of process start-up and reads the folder
    # (its compare-and-swap base) only then, so it can legitimately build on a version
    # that was committed after its recorded start.
    in_copies = {sha for v in copies.values() for sha in v}
    lost = []
    for wid in ("A", "B", "C"):
        for n in names:
            mine = [s for s in successes if s["w"] == wid and s["name"] == n]
            if not mine:
                continue
            last = mine[-1]
            if last["sha"] == at_name[n] or last["sha"] in copies[n]:
                continue
            superseded = any(s["name"] == n and s["w"] != wid and s["t_done"] > last["t_done"]
                             and s["sha"] not in in_copies for s in successes)
            if not superseded:
                lost.append(f"{wid}'s last write of {n} ({versions[last['sha']]})")
    assert not lost, f"lost updates: {lost}; {summary}"
    assert len(successes) >= 10, summary
    assert "Traceback" not in srv.log()
