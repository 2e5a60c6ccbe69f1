"""The four systems under test. Each gives a directory (``target``) to run workloads in,
mount/unmount, a "settle" (wait until written data is durable / on the server), and the
processes to watch (mount daemon, server)."""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from .tcpcount import CountingProxy, NetemRelay, make_relay
from .util import (REG, drop_caches, free_port, http_status, is_mounted, log, start_daemon,
                   stop_process, tail, unmount_fuse, wait_for)

REPO = Path(__file__).resolve().parents[2]


class SystemUnavailable(Exception):
    """The system cannot be benchmarked on this checkout (reported, not fatal)."""


class System:
    name = "?"
    networked = False
    description = ""

    def __init__(self, root: Path, opts) -> None:
        self.root = root
        self.opts = opts
        self.root.mkdir(parents=True, exist_ok=True)
        self.mnt = root / "mnt"
        self.proxy: CountingProxy | NetemRelay | None = None
        self.notes: list[str] = []

    # --- lifecycle
    def setup(self) -> None: ...
    def mount(self) -> None: ...
    def unmount(self) -> None: ...

    def teardown(self) -> None:
        try:
            self.unmount()
        finally:
            if self.proxy:
                self.proxy.close()
                self.proxy = None

    @property
    def target(self) -> Path:
        return self.mnt

    def clear_client_cache(self) -> None:
        """Called between unmount and mount of a cold remount."""

    def remount_cold(self) -> tuple[bool, str]:
        self.unmount()
        self.clear_client_cache()
        ok, note = drop_caches()
        self.mount()
        return ok, note

    def abort(self) -> None:
        """Watchdog: a workload hangs. Stop our FUSE daemon (blocked syscalls then fail
        with ENOTCONN instead of hanging forever) and detach the mount."""
        for p in self.daemon_procs():
            stop_process(p, f"{self.name} mount daemon (watchdog)", timeout=5)
        if is_mounted(self.mnt):
            unmount_fuse(self.mnt, timeout=5)

    # --- observation
    def daemon_procs(self) -> list:
        return []

    def server_procs(self) -> list:
        return []

    def wire(self) -> tuple[int, int] | None:
        return self.proxy.counters() if self.proxy else None

    # --- settle
    def settle(self, kind: str, **kw) -> dict:
        """Block until the data written so far is settled. Returns extra info."""
        os.sync()
        return {"settle": "sync"}

    def check_settled(self, res, what: str) -> None:
        """Untimed, after settle(): a system's own confirmation, if it has one."""


def _wait_mounted(path: Path, proc, timeout: float, what: str, log_path: Path) -> None:
    def ready():
        if not is_mounted(path):
            return False
        try:
            os.listdir(path)
            return True
        except OSError:
            return False
    wait_for(ready, timeout, what, proc=proc, log_path=log_path)
    REG.add_mount(path)


def _wait_exit(proc, timeout: float, name: str) -> None:
    """Wait for a FUSE daemon to exit after unmount; stop it if it doesn't."""
    if proc is None:
        return
    try:
        p = proc if isinstance(proc, psutil.Process) else psutil.Process(proc.pid)
    except psutil.Error:
        return
    try:
        p.wait(timeout)
    except psutil.TimeoutExpired:
        stop_process(p, name)
    except psutil.Error:
        pass
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            pass
    REG.drop_proc(p)


# =============================================================================== local
class LocalSystem(System):
    name = "local"
    description = "plain directory on the local disk (settled = after sync)"

    def setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)


# =============================================================================== gocryptfs
class GocryptfsSystem(System):
    name = "gocryptfs"
    proc = None
    description = "gocryptfs (defaults) over a local directory, mounted -fg (settled = after sync)"

    def setup(self) -> None:
        self.cipher = self.root / "cipher"
        self.cipher.mkdir()
        self.mnt.mkdir()
        self.passfile = self.root / "pass"
        self.passfile.write_text(secrets.token_urlsafe(24) + "\n")
        self.passfile.chmod(0o600)
        self.log_path = self.root / "gocryptfs.log"
        r = subprocess.run(["gocryptfs", "-init", "-q", "-passfile", str(self.passfile),
                            str(self.cipher)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"gocryptfs -init failed: {r.stderr.strip()}")
        self.proc = None

    def mount(self) -> None:
        self.proc = start_daemon(["gocryptfs", "-fg", "-q", "-passfile", str(self.passfile),
                                  str(self.cipher), str(self.mnt)], self.log_path, "gocryptfs")
        _wait_mounted(self.mnt, self.proc, 30, "gocryptfs mount", self.log_path)

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            unmount_fuse(self.mnt)
        REG.drop_mount(self.mnt)
        _wait_exit(self.proc, 15, "gocryptfs")
        self.proc = None

    def daemon_procs(self) -> list:
        return [psutil.Process(self.proc.pid)] if self.proc and self.proc.poll() is None else []


# =============================================================================== rclone
def crypt_size(n: int) -> int:
    """Size of an rclone crypt object holding n plaintext bytes."""
    return 32 + n + 16 * ((n + 65535) // 65536)


class RcloneSystem(System):
    name = "rclone"
    networked = True
    mproc = None
    serve = None
    rc_port = 0
    description = ("rclone crypt remote -> webdav remote -> `rclone serve webdav` of a local "
                   "dir; `rclone mount --vfs-cache-mode writes`")

    def setup(self) -> None:
        self.backend = self.root / "backend"
        self.cache = self.root / "cache"
        for d in (self.backend, self.cache, self.mnt):
            d.mkdir()
        self.conf = self.root / "rclone.conf"
        self.serve_log = self.root / "serve.log"
        self.mount_log = self.root / "mount.log"
        self.serve_port = free_port()
        self.serve = start_daemon(
            ["rclone", "serve", "webdav", str(self.backend), "--addr",
             f"127.0.0.1:{self.serve_port}", "--config", str(self.conf),
             "--cache-dir", str(self.cache / "serve"), "--log-file", str(self.serve_log)],
            self.serve_log, "rclone serve webdav")
        wait_for(lambda: http_status(f"http://127.0.0.1:{self.serve_port}/")[0] is not None,
                 30, "rclone serve webdav", proc=self.serve, log_path=self.serve_log)
        self.proxy = make_relay(self.serve_port, self.opts)
        port = self.proxy.port if self.proxy else self.serve_port

        def obscure(pw: str) -> str:
            return subprocess.run(["rclone", "obscure", "--", pw], capture_output=True, text=True,
                                  check=True).stdout.strip()
        self.conf.write_text(
            "[benchdav]\ntype = webdav\n"
            f"url = http://127.0.0.1:{port}/\nvendor = other\n\n"
            "[benchcrypt]\ntype = crypt\nremote = benchdav:data\n"
            f"password = {obscure(secrets.token_urlsafe(24))}\n"
            f"password2 = {obscure(secrets.token_urlsafe(24))}\n")
        self.conf.chmod(0o600)
        self.mproc = None
        self.notes.append(f"rclone --vfs-write-back {self.opts.rclone_write_back}: uploads start "
                          "that long after close(); included in 'settled' times")

    def mount(self) -> None:
        self.rc_port = free_port()
        self.mproc = start_daemon(
            ["rclone", "mount", "benchcrypt:", str(self.mnt), "--config", str(self.conf),
             "--vfs-cache-mode", "writes", "--cache-dir", str(self.cache),
             "--vfs-write-back", self.opts.rclone_write_back,
             "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
             "--log-file", str(self.mount_log)],
            self.mount_log, "rclone mount")
        _wait_mounted(self.mnt, self.mproc, 30, "rclone mount", self.mount_log)
        wait_for(lambda: self._vfs_stats() is not None, 30, "rclone rc", proc=self.mproc,
                 log_path=self.mount_log)

    def unmount(self) -> None:
        if self.mproc is not None and self.mproc.poll() is None:
            st = self._vfs_stats()
            dc = (st or {}).get("diskCache", {})
            if dc.get("uploadsInProgress") or dc.get("uploadsQueued"):
                log("rclone: unmounting with uploads pending")
        if is_mounted(self.mnt):
            unmount_fuse(self.mnt)
        REG.drop_mount(self.mnt)
        _wait_exit(self.mproc, 20, "rclone mount")
        self.mproc = None

    def clear_client_cache(self) -> None:
        # cold read must come from the server, not from rclone's VFS cache of the write
        for sub in ("vfs", "vfsMeta"):
            shutil.rmtree(self.cache / sub, ignore_errors=True)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if getattr(self, "serve", None) is not None:
                p = psutil.Process(self.serve.pid) if self.serve.poll() is None else None
                if p:
                    stop_process(p, "rclone serve webdav")
                    REG.drop_proc(p)
                self.serve.wait()
                self.serve = None

    def daemon_procs(self) -> list:
        return [psutil.Process(self.mproc.pid)] if self.mproc and self.mproc.poll() is None else []

    def server_procs(self) -> list:
        return [psutil.Process(self.serve.pid)] if self.serve and self.serve.poll() is None else []

    def _vfs_stats(self) -> dict | None:
        status, body = http_status(f"http://127.0.0.1:{self.rc_port}/vfs/stats", method="POST",
                                   data=b"{}", timeout=5)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def _backend_files(self) -> list[os.stat_result]:
        out = []
        for dirpath, _dirs, files in os.walk(self.backend):
            for fn in files:
                try:
                    out.append(os.stat(os.path.join(dirpath, fn)))
                except OSError:
                    pass
        return out

    def settle(self, kind: str, since_ns: int = 0, sizes: list[int] | None = None,
               count: int = 0, timeout: float = 600, **kw) -> dict:
        """Wait until rclone's VFS reports no queued/in-progress uploads (3 polls in a row)
        AND the backend holds the expected result: `count` files changed (ctime) since
        `since_ns`, whose sizes (if given) are crypt_size(...) of the plaintext sizes."""
        want = Counter(crypt_size(s) for s in sizes) if sizes else None
        t0 = time.monotonic()
        idle = 0
        polls = 0
        seen_busy = False
        margin = 20_000_000  # kernel timestamps are coarse (jiffies)

        def backend_ok() -> bool:
            if count <= 0:
                return True
            fresh = [st for st in self._backend_files() if st.st_ctime_ns >= since_ns - margin]
            if want is None:
                return len(fresh) >= count
            have = Counter(st.st_size for st in fresh)
            return all(have[k] >= v for k, v in want.items())

        while True:
            st = self._vfs_stats()
            if st is None:
                raise RuntimeError("rclone rc vfs/stats not answering; mount log:\n"
                                   + tail(self.mount_log))
            dc = st.get("diskCache", {})
            busy = (dc.get("uploadsInProgress", 0) or 0) + (dc.get("uploadsQueued", 0) or 0)
            if dc.get("erroredFiles"):
                raise RuntimeError(f"rclone reports {dc['erroredFiles']} errored uploads")
            seen_busy |= busy > 0
            idle = idle + 1 if busy == 0 else 0
            polls += 1
            if idle >= 3 and backend_ok():
                return {"settle": "rclone vfs/stats idle + backend check", "seen_busy": seen_busy,
                        "settle_polls": polls}
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"rclone upload not settled after {timeout:.0f}s ({kind})")
            time.sleep(0.05)


# =============================================================================== zkfs
class ZkfsSystem(System):
    name = "zkfs"
    networked = True
    daemon = None
    server = None
    description = ("zkfs server (python -m server) on 127.0.0.1 + `mount.py` FUSE client; "
                   "close() returns once the change is in the mount's local journal "
                   "(settled = fsync of the mount's root: the server has everything)")

    def _py(self) -> str:
        venv = REPO / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable

    def setup(self) -> None:
        for f in ("mount.py", "client.py", "server"):
            if not (REPO / f).exists():
                raise SystemUnavailable(f"{REPO / f} does not exist (zkfs not built yet?)")
        self.data = self.root / "server-data"
        self.home = self.root / "zkfs-home"
        for d in (self.data, self.home, self.mnt):
            d.mkdir()
        self.server_log = self.root / "server.log"
        self.mount_log = self.root / "mount.log"
        self.env = dict(os.environ, ZKFS_HOME=str(self.home), PYTHONUNBUFFERED="1")
        self.port = free_port()
        cmd = [self._py(), "-m", "server", "--data-dir", str(self.data), "--host", "127.0.0.1",
               "--port", str(self.port)]
        # like rclone serve (which logs nothing per request by default), no access log
        h = subprocess.run([self._py(), "-m", "server", "--help"], capture_output=True,
                           text=True, env=self.env, cwd=REPO, timeout=60)
        if "--log-level" in h.stdout:
            cmd += ["--log-level", "warning"]
        self.server = start_daemon(cmd, self.server_log, "zkfs server", env=self.env, cwd=REPO)
        wait_for(lambda: http_status(f"http://127.0.0.1:{self.port}/api/v1/health")[0] == 200,
                 60, "zkfs server health", interval=0.2, proc=self.server,
                 log_path=self.server_log)
        self.proxy = make_relay(self.port, self.opts)
        port = self.proxy.port if self.proxy else self.port
        self.url = f"http://127.0.0.1:{port}"
        self.password = secrets.token_urlsafe(24)
        self.passfile = self.root / "password"
        self.passfile.write_text(self.password + "\n")
        self.passfile.chmod(0o600)
        self.user = "bench"
        for verb in ("register", "login"):
            r = subprocess.run([self._py(), "client.py", verb, self.user, "--server", self.url,
                                "--password-stdin"], input=self.password + "\n", text=True,
                               capture_output=True, env=self.env, cwd=REPO, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"zkfs client.py {verb} failed ({r.returncode}): "
                                   f"{(r.stderr or r.stdout).strip()[-2000:]}")
        self.daemon = None

    def _find_daemon(self):
        """The background FUSE daemon: from mount.py's pidfile ($ZKFS_HOME/run/*.pid) if
        there is one, else the process whose command line names our mountpoint and
        mount.py / zkfs.mount."""
        mnt = str(self.mnt)

        def ours(p) -> bool:
            try:
                cl = p.cmdline()
            except psutil.Error:
                return False
            return (mnt in cl and "--unmount" not in cl and "-u" not in cl and
                    any(a.endswith("mount.py") or a in ("zkfs.mount", "zkfs.mount.cli")
                        or a.endswith("zkfs-mount") for a in cl))
        for pf in sorted((self.home / "run").glob("*.pid")):
            try:
                p = psutil.Process(int(pf.read_text().strip()))
            except (OSError, ValueError, psutil.Error):
                continue
            if ours(p):
                return p
        for p in psutil.process_iter():
            if ours(p):
                return p
        return None

    def mount(self) -> None:
        logf = open(self.mount_log, "ab")
        try:
            extra = shlex.split(self.opts.zkfs_mount_args or "")
            proc = subprocess.Popen([self._py(), "mount.py", str(self.mnt), "--password-file",
                                     str(self.passfile), *extra], env=self.env, cwd=REPO,
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logf.close()
        launcher = REG.add_proc(proc.pid, "zkfs mount.py")
        deadline = time.monotonic() + 180
        # interface: mount.py returns once the mount is ready and the daemon runs on in
        # the background; also cope with a mount.py that stays in the foreground.
        while True:
            rc = proc.poll()
            if rc is not None:
                REG.drop_proc(launcher)
                if rc != 0:
                    raise RuntimeError(f"zkfs mount.py exited {rc}: {tail(self.mount_log)}")
                break
            if is_mounted(self.mnt):
                time.sleep(0.5)
                if proc.poll() is None:  # foreground daemon
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("zkfs mount.py did not become ready: " + tail(self.mount_log))
            time.sleep(0.05)
        _wait_mounted(self.mnt, None, 30, "zkfs mount", self.mount_log)
        d = self._find_daemon()
        if d is not None and d.pid != proc.pid:
            d._bench_name = "zkfs mount daemon"  # type: ignore[attr-defined]
            with REG.lock:
                REG.procs.append(d)
        self.daemon = d

    def unmount(self) -> None:
        if is_mounted(self.mnt):
            try:
                r = subprocess.run([self._py(), "mount.py", "--unmount", str(self.mnt)],
                                   env=self.env, cwd=REPO, capture_output=True, text=True,
                                   timeout=120)
                if r.returncode != 0:
                    log(f"zkfs mount.py --unmount exited {r.returncode}: "
                        f"{(r.stderr or r.stdout).strip()[-500:]}")
            except subprocess.TimeoutExpired:
                log("zkfs mount.py --unmount timed out")
            if is_mounted(self.mnt):
                unmount_fuse(self.mnt)
        REG.drop_mount(self.mnt)
        _wait_exit(self.daemon, 30, "zkfs mount daemon")
        self.daemon = None

    def clear_client_cache(self) -> None:
        # mount.py keeps a ciphertext cache in $ZKFS_HOME/cache/<mount>: a cold read must
        # come from the server (as for rclone, whose VFS cache is wiped too)
        if not self.opts.zkfs_keep_cache:
            shutil.rmtree(self.home / "cache", ignore_errors=True)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if getattr(self, "server", None) is not None:
                if self.server.poll() is None:
                    p = psutil.Process(self.server.pid)
                    stop_process(p, "zkfs server")
                    REG.drop_proc(p)
                self.server.wait()
                self.server = None

    def daemon_procs(self) -> list:
        return [self.daemon] if self.daemon is not None and self.daemon.is_running() else []

    def server_procs(self) -> list:
        if getattr(self, "server", None) is not None and self.server.poll() is None:
            return [psutil.Process(self.server.pid)]
        return []

    def settle(self, kind: str, **kw) -> dict:
        # close() returns once the change is in the local journal; an fsync of a
        # directory returns once the server has every change journaled before it (as
        # `mount.py --wait` does, without its start-up and its 0.5 s status polling).
        fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"settle": "fsync of the mount's root (waits for the server to have the journal)"}

    def check_settled(self, res, what: str) -> None:
        # untimed, after settle(): the mount's own account agrees that nothing waits
        t0 = time.monotonic()
        r = subprocess.run([self._py(), "mount.py", "--wait", "--retry-seconds", "10",
                            str(self.mnt)], env=self.env, cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=False)
        res.raw.setdefault(what, {})["mount_wait_after_settle_s"] = time.monotonic() - t0
        res.check(f"{what}: mount.py --wait after settle", r.returncode == 0,
                  f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")


SYSTEMS = {"local": LocalSystem, "zkfs": ZkfsSystem, "rclone": RcloneSystem,
           "gocryptfs": GocryptfsSystem}
