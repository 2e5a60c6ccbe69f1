"""Helpers for the FUSE mount tests (tests/test_mount_*.py).

* ``Mounts`` - a module-scoped stand-in for the ``make_mount`` fixture: it builds
  ``harness.Mount`` objects itself and ``close()`` always unmounts them all.
* ``wait_until`` - poll a predicate (cross-mount propagation).
* ``blob_files`` / ``storage_bytes`` - what the server stores under ``storage/``.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import Machine, Mount


class Mounts:
    """Mounts that outlive one test (module fixtures); ``close()`` cleans them all up."""

    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.mounts: list[Mount] = []
        _reaper.start()

    def machine(self, server, *, register: bool = True) -> Machine:
        m = Machine(self.factory.mktemp("machine"), server.url)
        return m.register() if register else m

    def mount(self, machine: Machine, *extra: str, path: Path | None = None) -> Mount:
        m = Mount(machine, path or self.factory.mktemp("mnt"), list(extra))
        self.mounts.append(m)
        return m.start()

    @contextlib.contextmanager
    def watchdog(self, seconds: float):
        """If the block takes longer than ``seconds`` (a hung FUSE request cannot be
        interrupted by pytest-timeout), record the daemons' Python stacks in their log
        dir and SIGKILL them: the stuck syscall then fails (ENOTCONN) instead of hanging."""
        fired = threading.Event()

        def fire():
            fired.set()
            for m in list(self.mounts):
                if m.pid and Path(f"/proc/{m.pid}").exists():
                    _reaper.kill(m)
        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            if fired.is_set():
                print(f"WATCHDOG: killed the mount daemons after {seconds}s (stacks in their "
                      f"logs/watchdog.log)", file=sys.stderr)

    def close(self) -> None:
        """Unmount everything (concurrently: each waits for its daemon to exit)."""
        def cleanup(m: Mount) -> None:
            try:
                m.cleanup()
            except Exception:       # pragma: no cover - keep cleaning up the others
                pass
        threads = [threading.Thread(target=cleanup, args=(m,)) for m in self.mounts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


_REAPER = r"""
import os, signal, subprocess, sys
spy = sys.argv[1]
for line in sys.stdin:
    pid, log = line.rstrip("\n").split(" ", 1)
    out = ""
    if spy:
        try:
            out = subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True,
                                 timeout=30).stdout
        except Exception as exc:
            out = "py-spy failed: %s" % exc
    try:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            f.write("--- watchdog: stacks of mount daemon %s before SIGKILL ---\n%s\n" % (pid, out))
    except OSError:
        pass
    try:
        os.kill(int(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass
    print("done", flush=True)
"""


class _Reaper:
    """Dumps a hung daemon's Python stacks (py-spy) and SIGKILLs it, from a helper
    process started while the tests hold no FUSE file open: forking from the test
    process itself would close (= FLUSH) its open FUSE files in the child and hang
    on the very daemon it is meant to kill. Exits when its stdin closes."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.proc = subprocess.Popen([sys.executable, "-c", _REAPER, spy if os.path.exists(spy) else ""],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def kill(self, m: Mount) -> None:
        with self.lock:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.stdin.write(f"{m.pid} {m.machine.home / 'logs' / 'watchdog.log'}\n")
                    proc.stdin.flush()
                    ready, _, _ = select.select([proc.stdout], [], [], 45)
                    if ready:
                        proc.stdout.readline()
                except OSError:
                    pass
            try:                             # whatever happened above: it must die
                os.kill(m.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_reaper = _Reaper()


def wait_until(pred, timeout: float = 5.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``pred`` until it returns a truthy value; raise AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except OSError as exc:      # e.g. ENOENT while a change propagates
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")
        time.sleep(interval)


def storage_files(server, *, chunks_only: bool = False) -> dict[Path, int]:
    """Every file under the server's storage/ (path -> size); with ``chunks_only``
    just the chunk objects (no key objects, no temp files)."""
    out = {}
    for dirpath, _dirs, files in os.walk(Path(server.data_dir) / "storage"):
        for name in files:
            if chunks_only and (name == "key" or name.endswith(".tmp")):
                continue
            p = Path(dirpath) / name
            try:
                out[p] = p.stat().st_size
            except FileNotFoundError:
                pass
    return out


def blob_files(server) -> dict[Path, int]:
    """Every chunk object stored by the server (path -> size)."""
    return storage_files(server, chunks_only=True)


def storage_bytes(server) -> int:
    return sum(storage_files(server).values())


class MountCtx:
    """A module's server, one account and its mount (remounted when a test needs it)."""

    def __init__(self, server, mounts: Mounts):
        self.server = server
        self.mounts = mounts
        self.machine = mounts.machine(server)
        self.m = mounts.mount(self.machine)

    def remount(self):
        """Unmount cleanly (commits everything) and mount again at a new path (new cache)."""
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

    @contextlib.contextmanager
    def watched(self, seconds: float):
        """One test: a new mount first if an earlier test killed or hung the daemon,
        and the daemon killed if this one hangs past ``seconds``."""
        if not self.alive():
            self.m.cleanup()
            self.m = self.mounts.mount(self.machine)
        with self.mounts.watchdog(seconds):
            yield

    def fresh_mount(self):
        """An additional mount of the same account with a cold cache, once the server
        has everything the first one wrote."""
        if self.alive():
            self.m.settle()
        return self.mounts.mount(self.machine)

    def requests(self, method: str, path: str = "/api/v1/blobs/") -> list[str]:
        """The server's access-log lines so far for requests of this method whose path
        starts with ``path``."""
        text = self.server.log_path.read_text(errors="replace")
        return re.findall(rf'^.*"{method} {re.escape(path)}.*$', text, re.M)


@contextlib.contextmanager
def one_mount(tmp_path_factory, name: str, **server_kw):
    """A module's own server (``ServerProcess`` arguments) and one mount of a new account."""
    from conftest import ServerProcess
    srv = ServerProcess(tmp_path_factory.mktemp(name), **server_kw)
    mounts = Mounts(tmp_path_factory)
    try:
        srv.start()
        yield MountCtx(srv, mounts)
    finally:
        mounts.close()
        srv.stop()


@pytest.fixture
def mounts(tmp_path_factory, request):
    """Mounts for one test, all cleaned up after it; a hung one is killed after the
    test module's ``WATCHDOG_SECONDS`` (300 by default)."""
    ms = Mounts(tmp_path_factory)
    try:
        with ms.watchdog(getattr(request.module, "WATCHDOG_SECONDS", 300)):
            yield ms
    finally:
        ms.close()


@pytest.fixture(scope="module")
def mnt(shared_server, tmp_path_factory):
    """One mount for a test module (import this fixture, and ``watchdog``)."""
    mounts = Mounts(tmp_path_factory)
    try:
        m = mounts.mount(mounts.machine(shared_server))
        m.mounts = mounts
        yield m
    finally:
        mounts.close()


@pytest.fixture(autouse=True)
def watchdog(mnt):
    """A hung FUSE call fails the test (stacks logged) instead of hanging the run."""
    with mnt.mounts.watchdog(120):
        yield


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(*cmd, cwd=None, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
