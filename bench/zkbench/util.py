"""Process/mount bookkeeping, tool installation and small helpers.

Every process and FUSE mount the harness starts is recorded in ``REG``; ``REG.cleanup()``
runs from ``finally`` blocks and from ``atexit`` and unmounts (``fusermount -u``, then
``-u -z``) and stops (by PID, SIGTERM then SIGKILL) exactly those, nothing else.
"""
from __future__ import annotations

import atexit
import ctypes.util
import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- tools
APT_TOOLS = {  # executable or library -> Debian package
    "rclone": "rclone",
    "gocryptfs": "gocryptfs",
    "rsync": "rsync",
    "fusermount3": "fuse3",
}
PY_DEPS = {"psutil": "psutil", "matplotlib": "matplotlib", "cryptography": "cryptography"}


def ensure_tools(need_apt: bool = True) -> list[str]:
    """apt-get install the missing system tools, pip install missing Python deps into
    the running interpreter's environment. Returns a list of notes."""
    notes: list[str] = []
    if need_apt:
        missing = [pkg for exe, pkg in APT_TOOLS.items() if shutil.which(exe) is None]
        if not shutil.which("fusermount") and not shutil.which("fusermount3"):
            missing.append("fuse3")
        if ctypes.util.find_library("fuse") is None:  # libfuse.so.2 (fusepy, zkfs mount)
            missing.append("libfuse2")
        missing = sorted(set(missing))
        if missing:
            log(f"installing system packages: {' '.join(missing)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-q"], check=False, env=env,
                           stdout=subprocess.DEVNULL)
            r = subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env,
                               stdout=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"apt-get install {' '.join(missing)} failed")
            notes.append(f"apt-get installed: {' '.join(missing)}")
    missing_py = []
    for mod, pkg in PY_DEPS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing_py.append(pkg)
    if missing_py:
        log(f"pip installing into {sys.prefix}: {' '.join(missing_py)}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", *missing_py]
        r = subprocess.run(cmd)
        if r.returncode != 0 and sys.prefix == sys.base_prefix:
            # system interpreter with PEP 668 marker: the brief asks for this env anyway
            r = subprocess.run(cmd + ["--break-system-packages"])
        if r.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(missing_py)} failed")
        importlib.invalidate_caches()
        notes.append(f"pip installed: {' '.join(missing_py)}")
    return notes


# ----------------------------------------------------------------------------- mounts
def _unescape_mount(s: str) -> str:
    return (s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mounted_paths() -> list[str]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                out.append(_unescape_mount(parts[1]))
    return out


def _norm(path: str | Path) -> str:
    # no realpath: a stat through a hung FUSE mount would block (the work dir is resolved
    # once, before anything is mounted, so our paths hold no symlinks)
    return os.path.normpath(os.path.abspath(str(path)))


def is_mounted(path: str | Path) -> bool:
    return _norm(path) in mounted_paths()


def mounts_under(path: str | Path) -> list[str]:
    p = _norm(path).rstrip("/") + "/"
    return [m for m in mounted_paths() if (m + "/").startswith(p)]


def _fusermount() -> str:
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"


def _quiet(cmd: list[str], timeout: float = 10.0) -> int:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


def unmount_fuse(path: str | Path, timeout: float = 30.0, lazy: bool = True) -> bool:
    """Unmount a FUSE mount: fusermount -u (retried while busy), then -u -z."""
    path = _norm(path)
    if not is_mounted(path):
        return True
    fm = _fusermount()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _quiet([fm, "-u", path]) == 0 or not is_mounted(path):
            return True
        time.sleep(0.5)
    if not lazy:
        return False
    log(f"fusermount -u {path} failed; lazy unmount")
    lazy_unmount(path)
    return not is_mounted(path)


def lazy_unmount(path: str | Path) -> None:
    path = _norm(path)
    _quiet([_fusermount(), "-u", "-z", path])
    if is_mounted(path):
        _quiet(["umount", "-l", path])


# ----------------------------------------------------------------------------- processes
class Registry:
    """What this harness started: processes (psutil handles, PID + create time, so a
    recycled PID is never signalled) and mountpoints."""

    def __init__(self) -> None:
        self.procs: list = []          # psutil.Process
        self.mounts: list[str] = []
        self.lock = threading.RLock()
        self._cleaned = False

    def add_proc(self, pid: int, name: str = ""):
        import psutil
        p = psutil.Process(pid)
        p._bench_name = name  # type: ignore[attr-defined]
        with self.lock:
            self.procs.append(p)
        return p

    def add_mount(self, path: str | Path) -> None:
        with self.lock:
            rp = _norm(path)
            if rp not in self.mounts:
                self.mounts.append(rp)

    def drop_mount(self, path: str | Path) -> None:
        with self.lock:
            rp = _norm(path)
            if rp in self.mounts:
                self.mounts.remove(rp)

    def drop_proc(self, p) -> None:
        with self.lock:
            self.procs = [q for q in self.procs if q.pid != p.pid]

    def cleanup(self) -> None:
        with self.lock:
            mounts, procs = list(self.mounts), list(self.procs)
            self.mounts, self.procs = [], []
        # 1. polite unmount (the daemons flush and exit), 2. stop what we started (a hung
        # daemon included), 3. lazy-unmount whatever is still mounted (now dead mounts)
        for m in reversed(mounts):
            try:
                if is_mounted(m):
                    log(f"cleanup: unmounting {m}")
                    unmount_fuse(m, timeout=5, lazy=False)
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: unmount {m}: {e}")
        for p in reversed(procs):
            try:
                stop_process(p, name=getattr(p, "_bench_name", ""))
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: stop {p.pid}: {e}")
        for m in reversed(mounts):
            try:
                if is_mounted(m):
                    log(f"cleanup: lazy unmount {m}")
                    lazy_unmount(m)
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: lazy unmount {m}: {e}")


REG = Registry()
atexit.register(REG.cleanup)


def stop_process(p, name: str = "", timeout: float = 10.0) -> None:
    """SIGTERM then SIGKILL one process we started, plus its descendants (which we
    started through it). By PID only, verified by psutil's create-time check."""
    import psutil
    try:
        if not p.is_running():
            return
        kids = p.children(recursive=True)
    except psutil.Error:
        return
    try:
        log(f"stopping {name or 'process'} pid {p.pid}")
        p.terminate()
        try:
            p.resume()  # a stopped process would hold SIGTERM pending
        except psutil.Error:
            pass
        p.wait(timeout)
    except psutil.TimeoutExpired:
        try:
            p.kill()
            p.wait(5)
        except psutil.Error:
            pass
    except psutil.Error:
        pass
    for k in kids:
        try:
            if k.is_running():
                k.terminate()
                k.wait(5)
        except psutil.TimeoutExpired:
            try:
                k.kill()
            except psutil.Error:
                pass
        except psutil.Error:
            pass


def start_daemon(cmd: list[str], log_path: Path, name: str, env: dict | None = None,
                 cwd: str | Path | None = None) -> subprocess.Popen:
    """Start a long-running process in its own session (so a terminal Ctrl-C reaches only
    the harness, which then tears everything down in order) and register it."""
    logf = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
    finally:
        logf.close()
    REG.add_proc(proc.pid, name)
    return proc


def wait_for(pred, timeout: float, what: str, interval: float = 0.05, proc=None,
             log_path: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}"
                               + (f"; log tail:\n{tail(log_path)}" if log_path else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f"; log tail:\n{tail(log_path)}" if log_path else ""))
        time.sleep(interval)


def tail(path: Path | None, n: int = 15) -> str:
    if not path or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, method: str = "GET", timeout: float = 2.0, data: bytes | None = None):
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, urllib.error.URLError):
        return None, b""


# ----------------------------------------------------------------------------- caches
def drop_caches() -> tuple[bool, str]:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True, ""
    except OSError as e:
        return False, f"drop_caches not permitted ({e.strerror}); reads may be warm"


# ----------------------------------------------------------------------------- /proc
def tree(procs) -> list:
    import psutil
    out = []
    for p in procs:
        try:
            if p.is_running():
                out.append(p)
                out.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    return out


def io_counters(procs) -> dict[str, int]:
    """Sum of /proc/PID/io rchar/wchar over procs and their descendants."""
    tot = {"rchar": 0, "wchar": 0}
    for p in tree(procs):
        try:
            with open(f"/proc/{p.pid}/io") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in tot:
                        tot[k] += int(v)
        except OSError:
            pass
    return tot


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssPoller:
    """Polls VmRSS (summed over each group's process tree) every 50 ms; keeps the peak."""

    def __init__(self, groups: dict[str, list], interval: float = 0.05) -> None:
        self.groups = {k: v for k, v in groups.items() if v}
        self.interval = interval
        self.peak = {k: 0 for k in self.groups}
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        members = {}
        while not self._stop.is_set():
            if i % 20 == 0:
                members = {k: tree(v) for k, v in self.groups.items()}
            for k, ps in members.items():
                self.peak[k] = max(self.peak[k], sum(rss_bytes(p.pid) for p in ps))
            i += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.groups:
            self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._th.is_alive():
            self._th.join()


# ----------------------------------------------------------------------------- files
def safe_rmtree(path: str | Path) -> None:
    """rmtree that never descends into a live mount (it would delete through it)."""
    path = Path(path)
    if not path.exists():
        return
    live = mounts_under(path)
    if live:
        log(f"not removing {path}: still mounted: {live}")
        return
    shutil.rmtree(path, ignore_errors=True)
