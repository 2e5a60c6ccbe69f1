"""Helpers for the fault-injection and load tests (test_faults.py, test_load.py,
test_auth_hardening.py, test_api_fuzz.py).

* ``Bg``            - run blocking I/O (FUSE calls, CLI runs) in a daemon thread so the
                      test thread can always give up after a bounded time and clean up.
* ``write_pattern`` - fast, reproducible multi-MiB content (distinct per chunk) + sha256.
* ``client_vault``  - an in-process ``zkfs`` vault for a logged-in machine (observer).
* ``tmpfs``         - a size-limited tmpfs mounted at a path, always unmounted.
* ``tree_rss``      - resident memory of a process and all its children (psutil).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mount_helpers import storage_bytes, storage_files  # noqa: F401 (storage_bytes: re-exported)

MiB = 1 << 20


# ------------------------------------------------------------------ threads
class Bg:
    """``fn`` running in a daemon thread; ``wait(timeout)`` never blocks longer."""

    def __init__(self, fn: Callable[[], Any], name: str = "bg"):
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.finished_at: float | None = None

        def run():
            try:
                self.result = fn()
            except BaseException as exc:      # noqa: BLE001 - reported to the test
                self.error = exc
            finally:
                self.finished_at = time.monotonic()
                self.done.set()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def value(self, timeout: float, what: str = "operation") -> Any:
        if not self.wait(timeout):
            raise AssertionError(f"{what} did not finish within {timeout:.0f} s (hung)")
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:      # noqa: BLE001 - transient while things settle
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")
        time.sleep(interval)


# ------------------------------------------------------------------ content
def pattern_block(seed: int) -> bytes:
    return hashlib.shake_256(f"zkfs-fault-{seed}".encode()).digest(MiB)


def write_pattern(f, n_mib: int, seed: int, on_chunk: Callable[[int], None] | None = None) -> str:
    """Write ``n_mib`` MiB to the open binary file ``f``; every MiB differs (its index
    is stamped in). Returns the sha256 of everything written."""
    base = bytearray(pattern_block(seed))
    sha = hashlib.sha256()
    for i in range(n_mib):
        base[:8] = i.to_bytes(8, "big")
        block = bytes(base)
        f.write(block)
        sha.update(block)
        if on_chunk:
            on_chunk(i)
    return sha.hexdigest()


def pattern_sha(n_mib: int, seed: int) -> str:
    class _Null:
        def write(self, _b):
            pass
    return write_pattern(_Null(), n_mib, seed)


def make_pattern_file(path: Path, n_mib: int, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        return write_pattern(f, n_mib, seed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ server side
def temp_leftovers(server) -> list[Path]:
    return sorted(p for p in storage_files(server) if p.name.endswith(".tmp"))


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` plus all its descendants, in bytes (0 if gone)."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


# ------------------------------------------------------------------ client side
def client_vault(machine, retry_seconds: float = 5.0):
    """An in-process vault for a machine that ran `client.py login` (its saved keys)."""
    from zkfs.session import open_vault
    from zkfs.state import LocalState
    return open_vault(LocalState(Path(machine.home)), retry_seconds=retry_seconds)


def remote_node(vault, path: str):
    """The node at ``path`` or None."""
    from zkfs.vault import split_path
    parts = split_path(path)
    parent = vault.resolve("/".join(parts[:-1]))
    return vault.lookup(parent.id, parts[-1])


def remote_sha(vault, path: str, scratch: Path) -> str:
    from zkfs.transfer import download_file
    node = remote_node(vault, path)
    assert node is not None, f"{path} is not on the server"
    scratch.mkdir(parents=True, exist_ok=True)
    dest = scratch / f"dl-{time.monotonic_ns()}"
    try:
        return download_file(vault, node, dest)
    finally:
        dest.unlink(missing_ok=True)


# ------------------------------------------------------------------ tmpfs
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of ``size`` (e.g. "64m") at ``path``; always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def py_stacks(pid: int | None) -> str:
    """Python stacks of a (hung) process via py-spy, when installed; for failure messages."""
    import shutil
    import sys
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not pid or not Path(spy).exists():
        return "(no py-spy)"
    try:
        out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        return out.stdout[-6000:] or out.stderr[-2000:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy failed: {exc})"
