"""`mount.py`: mount the encrypted store as a folder, or unmount it.

`mount.py MOUNTPOINT` checks the login, starts the filesystem daemon in the
background and returns once the mount answers; `--foreground` keeps it attached.
`--status`, `--wait` and `--unmount` talk to a running mount through the status
file it keeps beside its pid file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ZkfsError
from ..session import open_vault
from ..state import LocalState

log = logging.getLogger("zkfs.mount")

REQUEST_RETRY_SECONDS = 5.0


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mount.py", description=(
        "Mount the zkfs encrypted store at MOUNTPOINT. Uses the login saved by `client.py login`."))
    p.add_argument("mountpoint")
    p.add_argument("--unmount", "-u", action="store_true",
                   help="unmount once the journal has reached the server (also cleans up a dead mount)")
    p.add_argument("--keep-pending", action="store_true",
                   help="with --unmount: do not wait for the server, keep unsent changes for the next mount")
    p.add_argument("--status", action="store_true", help="say how much is waiting to reach the server")
    p.add_argument("--wait", action="store_true",
                   help="block until everything written so far is on the server (fails after --retry-seconds "
                        "without the server)")
    p.add_argument("--sync", action="store_true",
                   help="close() returns once the server has the file (default: once it is in the local journal)")
    p.add_argument("--server", help="server URL (default: the one saved at login)")
    p.add_argument("--password-file", help="read the password from this file (unattended mounts)")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow plain http:// to a server that is not this machine (login may have saved this)")
    p.add_argument("--cache-dir", help="ciphertext cache and encrypted spool (default: $ZKFS_HOME/cache/...)")
    p.add_argument("--cache-size", default="1G", help="ciphertext cache bound, e.g. 512M, 2G (default 1G)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--retry-seconds", type=float, default=60.0,
                   help="how long fsync(), --sync closes, --wait and --unmount wait for an absent server "
                        "(default 60; the journal keeps everything meanwhile)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in, with the kernel enforcing modes (allow_other,default_permissions)")
    p.add_argument("--foreground", "-f", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def _cache_dir(args, state: LocalState) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir)
    tag = hashlib.sha256(os.path.realpath(args.mountpoint).encode()).hexdigest()[:16]
    return state.root / "cache" / tag


def _is_mounted(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/mounts") as f:
        return any(line.split()[1].encode().decode("unicode_escape") == target for line in f)


def unmount(mountpoint: str, keep_pending: bool = False) -> None:
    """Unmount; the daemon first sends its journal (a progress line meanwhile) unless
    ``keep_pending``, and keeps whatever the server does not take for the next mount."""
    if not _is_mounted(mountpoint):
        raise ZkfsError(f"{mountpoint} is not mounted")
    run = _run_file(mountpoint, "")
    keep = run.with_suffix(".keep")
    if keep_pending:
        keep.touch()
    fusermount = shutil.which("fusermount") or shutil.which("fusermount3")
    done = subprocess.run([fusermount, "-u", mountpoint], capture_output=True, text=True)
    lazy = done.returncode != 0 and _is_mounted(mountpoint)
    if lazy:
        # Busy or dead ("Transport endpoint is not connected"): detach lazily; a busy
        # daemon finishes (and sends its journal) when the last process lets go.
        done = subprocess.run([fusermount, "-u", "-z", mountpoint], capture_output=True, text=True)
        if done.returncode != 0 and _is_mounted(mountpoint):
            raise ZkfsError(f"cannot unmount {mountpoint}: {done.stderr.strip()}")
    pidfile = run.with_suffix(".pid")
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    shown = False
    last, stalled_since = None, time.monotonic()
    # The daemon drains its journal (each stall bounded by its --retry-seconds) and exits.
    while _alive(pid) and not lazy and time.monotonic() - stalled_since < 120:
        status = read_status(mountpoint)
        pending = status["pending"] if status else None
        if pending != last:
            last, stalled_since = pending, time.monotonic()
        if pending and sys.stderr.isatty():
            print(f"\r{_describe(status)}, sending...", end="", file=sys.stderr, flush=True)
            shown = True
        time.sleep(0.1)
    if shown:
        print(file=sys.stderr)
    status = read_status(mountpoint)
    if _alive(pid):
        if lazy:
            print(f"{mountpoint} was busy: detached; its daemon finishes (and sends what waits) once the "
                  f"last process using it lets go", file=sys.stderr)
        return
    pidfile.unlink(missing_ok=True)
    keep.unlink(missing_ok=True)
    if status and status["pending"]:
        print(f"{_describe(status)}: kept in the journal for the next mount", file=sys.stderr)


def _run_file(mountpoint: str, suffix: str) -> Path:
    tag = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return LocalState().root / "run" / f"mount-{tag}{suffix}"


def status_path(mountpoint: str) -> Path:
    return _run_file(mountpoint, ".status")


def read_status(mountpoint: str) -> dict | None:
    try:
        return json.loads(status_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None


def _describe(status: dict) -> str:
    mib = status["pending_bytes"] / (1 << 20)
    state = "" if status["online"] else f" (server unreachable: {status['last_error']})"
    return f"{status['pending']} change(s), {mib:.1f} MiB waiting{state}"


def _live_status(mountpoint: str) -> dict:
    if not _is_mounted(mountpoint):
        raise ZkfsError(f"{mountpoint} is not mounted")
    status = read_status(mountpoint)
    if status is None or not _alive(status["pid"]):
        raise ZkfsError(f"{mountpoint}: no running zkfs mount answers there")
    return status


def show_status(mountpoint: str) -> None:
    s = _live_status(mountpoint)
    if not s["pending"]:
        print(f"{mountpoint}: everything is on the server")
        return
    age = f", oldest {time.time() - s['oldest']:.0f} s ago" if s["oldest"] else ""
    print(f"{mountpoint}: {_describe(s)}{age}")


def wait_settled(mountpoint: str, timeout: float) -> None:
    """Until the server has every change made before this call (the mount writes
    its status twice a second: the first one written after now names them all)."""
    start = time.time()
    while True:
        s = _live_status(mountpoint)
        if s["at"] > start:
            break
        time.sleep(0.05)
    target = s["last"]
    offline_since = None
    while s["done"] < target:
        if s["online"]:
            offline_since = None
        elif offline_since is None:
            offline_since = time.monotonic()
        elif time.monotonic() - offline_since > timeout:
            raise ZkfsError(f"{mountpoint}: the server stayed unreachable for {timeout:.0f} s; "
                            f"{_describe(s)} (kept in the journal)")
        time.sleep(0.1)
        s = _live_status(mountpoint)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pidfile_for(mountpoint: str) -> Path:
    return _run_file(mountpoint, ".pid")


def _password(args) -> str | None:
    if not args.password_file:
        return None
    try:
        return Path(args.password_file).read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        raise ZkfsError(f"cannot read the password file {args.password_file}: {exc}") from None


def serve(args) -> None:
    """Run the filesystem in this process until unmounted."""
    from . import binding          # libfuse3 is needed only here
    from .fs import ZkfsOperations

    state = LocalState()
    # One request retries a vanished server only briefly: the journal keeps every change
    # (and waits --retry-seconds where a caller waits for the server), so a lookup or a
    # write-behind upload need not stall the mount for that long (it did: 60 s per call).
    vault = open_vault(state, server=args.server, password=_password(args),
                       retry_seconds=min(args.retry_seconds, REQUEST_RETRY_SECONDS),
                       insecure_http=args.insecure_http)
    cache = _cache_dir(args, state)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    pidfile = _pidfile_for(args.mountpoint)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    ops = ZkfsOperations(vault, cache, _parse_size(args.cache_size), read_only=args.read_only, sync=args.sync,
                         retry_seconds=args.retry_seconds, status_path=status_path(args.mountpoint))
    ops.keep_pending_flag = pidfile.with_suffix(".keep")
    ops.keep_pending_flag.unlink(missing_ok=True)      # a --keep-pending meant for an earlier mount
    pidfile.write_text(str(os.getpid()))
    sent = ops.replay()           # what a crashed mount left, before anything is served
    if sent:
        log.info("journal: the server has the %d change(s) the last mount left", sent)
    log.info("mounting at %s", args.mountpoint)
    binding.serve(ops, args.mountpoint, read_only=args.read_only, allow_other=args.allow_other)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.unmount:
            unmount(args.mountpoint, keep_pending=args.keep_pending)
            print(f"unmounted {args.mountpoint}")
            return 0
        if args.status:
            show_status(args.mountpoint)
            return 0
        if args.wait:
            wait_settled(args.mountpoint, args.retry_seconds)
            return 0
        mp = Path(args.mountpoint)
        if _is_mounted(args.mountpoint):
            raise ZkfsError(f"{mp} is already mounted (use --unmount)")
        if not mp.is_dir():
            raise ZkfsError(f"{mp}: not a directory")
        if args.foreground:
            serve(args)
            return 0
        return _spawn(args)
    except ZkfsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _spawn(args) -> int:
    """Check the login here (clear errors), then run the daemon detached and wait for it."""
    state = LocalState()
    open_vault(state, server=args.server, password=_password(args), retry_seconds=2,
               insecure_http=args.insecure_http).api.close()
    log_dir = state.root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"mount-{_pidfile_for(args.mountpoint).stem.split('-')[1]}.log"
    argv = [sys.executable, "-m", "zkfs.mount", *sys.argv[1:], "--foreground"]
    # Chunk buffers are 1 MiB and churn fast across threads: glibc's default of one
    # malloc arena per thread lets RSS balloon (measured ~170 MiB vs ~125 MiB
    # with two arenas for a 1 GiB copy).
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, cwd=os.getcwd(), env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise ZkfsError(f"the mount failed: {tail[0]} (log: {log_path})")
        if _is_mounted(args.mountpoint):
            try:
                os.stat(args.mountpoint)
                print(f"mounted at {args.mountpoint} (log: {log_path})")
                return 0
            except OSError:
                pass
        time.sleep(0.05)
    proc.terminate()
    raise ZkfsError(f"the mount did not come up within 60 s (log: {log_path})")
