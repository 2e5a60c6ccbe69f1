"""Helpers for the FUSE mount tests (tests/test_mount_*.py).

* ``Mounts`` - a module-scoped stand-in for the ``make_mount`` fixture: it builds
  ``harness.Mount`` objects itself and ``close()`` always unmounts them all.
* ``wait_until`` - poll a predicate (cross-mount propagation).
* ``blob_files`` / ``storage_bytes`` - what the server stores under ``storage/``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from harness import Machine, Mount


class Mounts:
    """Mounts that outlive one test (module fixtures); ``close()`` cleans them all up."""

    def __init__(self, tmp_path_factory):
        self.factory = tmp_path_factory
        self.mounts: list[Mount] = []

    def machine(self, server, *, register: bool = True) -> Machine:
        m = Machine(self.factory.mktemp("machine"), server.url)
        return m.register() if register else m

    def mount(self, machine: Machine, *extra: str, path: Path | None = None) -> Mount:
        m = Mount(machine, path or self.factory.mktemp("mnt"), list(extra))
        self.mounts.append(m)
        return m.start()

    def close(self) -> None:
        for m in self.mounts:
            try:
                m.cleanup()
            except Exception:       # pragma: no cover - keep cleaning up the others
                pass


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


def blob_files(server) -> dict[Path, int]:
    """Every chunk object stored by the server (path -> size); inode key objects excluded."""
    out = {}
    root = Path(server.data_dir) / "storage"
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name == "key" or name.endswith(".tmp"):
                continue
            p = Path(dirpath) / name
            try:
                out[p] = p.stat().st_size
            except FileNotFoundError:
                pass
    return out


def storage_bytes(server) -> int:
    return sum(blob_files(server).values())


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
