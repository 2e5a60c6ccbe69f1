#!/usr/bin/env python3
"""The mount's write-back journal with the server out of reach: write --gib GiB while the
link is cut, watch the disk the mount uses and its RSS, then restore the link and time the
drain (`mount.py --wait`). See bench/README.md.

    python bench/journal_offline.py [--gib 2] [--file-mib 64] [--wan] [--keep]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zkbench.systems import REPO, ZkfsSystem  # noqa: E402
from zkbench.util import REG, RssPoller, drop_caches, log, safe_rmtree  # noqa: E402

MiB = 1 << 20


def disk_use(path: Path) -> int:
    """Bytes allocated under path (st_blocks), files vanishing meanwhile skipped."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_blocks * 512
            except OSError:
                pass
    return total


class DiskPoller:
    def __init__(self, path: Path, interval: float = 0.5) -> None:
        self.path, self.interval = path, interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_use(self.path))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, disk_use(self.path))


def mount_cmd(zk: ZkfsSystem, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([zk._py(), "mount.py", *args, str(zk.mnt)], env=zk.env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="data written offline (default 2)")
    ap.add_argument("--file-mib", type=int, default=64, help="size of each file (default 64)")
    ap.add_argument("--wan", action="store_true", help="20 ms RTT, 200 Mbit/s link (else loopback)")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=200.0)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zkfs-journal-", dir=a.workdir)).resolve()
    nfiles = max(1, int(a.gib * 1024 // a.file_mib))
    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = os.getloadavg()
    # always through netem's relay (no delay and no cap on loopback): it is what cuts the link
    opts = SimpleNamespace(no_proxy=False, wan=True, rtt_ms=a.rtt_ms if a.wan else 0.0,
                           mbit=a.mbit if a.wan else 0, zkfs_mount_args="",
                           zkfs_keep_cache=False)
    zk = ZkfsSystem(work / "zkfs", opts)
    rc = 1
    try:
        src = work / "src.bin"
        with open(src, "wb") as f:
            for _ in range(a.file_mib):
                f.write(os.urandom(MiB))
        src_sha = hashlib.sha256(src.read_bytes()).hexdigest()
        zk.setup()
        relay = zk.proxy
        zk.mount()
        home = zk.home
        base = disk_use(home)
        log(f"mounted; $ZKFS_HOME uses {base / MiB:.1f} MiB; cutting the link")
        relay.set_down(True)
        groups = {"daemon": zk.daemon_procs()}
        with RssPoller(groups) as rss, DiskPoller(home) as disk:
            t0 = time.monotonic()
            for i in range(nfiles):
                r = subprocess.run(["cp", str(src), str(zk.mnt / f"f{i:03d}.bin")],
                                   capture_output=True, text=True, check=False)
                if r.returncode:
                    raise RuntimeError(f"cp #{i} offline failed: {r.stderr.strip()}")
            t_write = time.monotonic() - t0
            st = mount_cmd(zk, "--status", timeout=60)
            log(f"offline: {nfiles} x {a.file_mib} MiB in {t_write:.1f}s; "
                f"status: {st.stdout.strip() or st.stderr.strip()}")
            df = os.statvfs(zk.mnt)
        rss_offline, disk_offline = rss.peak.get("daemon", 0), disk.peak
        log(f"peak disk {(disk_offline - base) / MiB:.0f} MiB over the {base / MiB:.0f} MiB "
            f"before, peak mount RSS {rss_offline / MiB:.0f} MiB; restoring the link")
        with RssPoller(groups) as rss2, DiskPoller(home) as disk2:
            t0 = time.monotonic()
            relay.set_down(False)
            w = mount_cmd(zk, "--wait", "--retry-seconds", "600")
            t_drain = time.monotonic() - t0
        if w.returncode:
            raise RuntimeError(f"mount.py --wait exited {w.returncode}: {w.stderr.strip()}")
        up, _down = relay.counters()
        after = disk_use(home)
        log(f"drained in {t_drain:.1f}s ({nfiles * a.file_mib / t_drain:.1f} MiB/s); "
            f"$ZKFS_HOME now {after / MiB:.0f} MiB")
        # the server's copy, read cold through a fresh mount
        zk.unmount()
        zk.clear_client_cache()
        drop_caches()
        zk.mount()
        bad = [i for i in range(nfiles) if hashlib.sha256(
            (zk.mnt / f"f{i:03d}.bin").read_bytes()).hexdigest() != src_sha]
        ok = not bad
        link = (f"WAN {a.rtt_ms:g} ms RTT, {a.mbit:g} Mbit/s per connection" if a.wan
                else "loopback (a cuttable relay)")
        print(f"\njournal offline {started:%Y-%m-%d %H:%M}Z, {link}, {os.cpu_count()} CPUs")
        print(f"written offline          {nfiles} x {a.file_mib} MiB = "
              f"{nfiles * a.file_mib / 1024:.2f} GiB in {t_write:.1f} s "
              f"({nfiles * a.file_mib / t_write:.0f} MiB/s)")
        print(f"$ZKFS_HOME before        {base / MiB:.0f} MiB")
        print(f"peak disk use offline    {(disk_offline - base) / MiB:.0f} MiB more "
              f"({(disk_offline - base) / (nfiles * a.file_mib * MiB):.2f}x the data)")
        print(f"df of the mount offline  {(df.f_blocks - df.f_bavail) * df.f_frsize / MiB:.0f} "
              f"MiB used of {df.f_blocks * df.f_frsize / MiB:.0f} MiB")
        print(f"peak mount RSS           offline {rss_offline / MiB:.0f} MiB, "
              f"draining {rss2.peak.get('daemon', 0) / MiB:.0f} MiB")
        print(f"drain after the link     {t_drain:.1f} s ({nfiles * a.file_mib / t_drain:.1f} "
              f"MiB/s), {up / MiB:.0f} MiB sent; peak disk meanwhile "
              f"{(disk2.peak - base) / MiB:.0f} MiB more, after {(after - base) / MiB:.0f}")
        print(f"read back cold           {'all' if ok else 'NOT all'} {nfiles} sha256 match"
              + (f" (bad: {bad[:5]})" if bad else ""))
        la = os.getloadavg()
        print(f"load average at start {load0[0]:.2f}, at end {la[0]:.2f}")
        rc = 0 if ok else 1
    finally:
        try:
            zk.teardown()
        finally:
            REG.cleanup()
            if a.keep:
                log(f"kept {work}")
            else:
                safe_rmtree(work)
    return rc


if __name__ == "__main__":
    sys.exit(main())
