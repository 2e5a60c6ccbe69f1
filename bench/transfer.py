#!/usr/bin/env python3
"""zkfs CLI transfer benchmark: `client.py upload` / `client.py download` throughput of one
big random file, next to a plain `cp` on the same disk and the raw crypto ceiling (Fernet,
zkfs's BinaryFernet), with the peak RSS of client and server, in one run. See bench/README.md.

    python bench/transfer.py [--size-mib 1024] [--runs 1] [--out bench/results] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zkbench.util import (REG, RssPoller, drop_caches, ensure_tools, log,  # noqa: E402
                          safe_rmtree, stop_process, tail)

MiB = 1 << 20
MB = 1e6
BLOCK = 4 * MiB
CMD_TIMEOUT = 3600.0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=None, help="file size (default 1024)")
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat crypto, cp, upload and download; medians reported")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, short crypto runs")
    ap.add_argument("--workdir", default=None,
                    help="where the temp dir goes (default /tmp); source, cp copy, server "
                         "data and download all live in it, i.e. on one disk")
    ap.add_argument("--rss-interval", type=float, default=0.025,
                    help="RSS polling interval in seconds (default 0.025)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    ap.add_argument("--skip-install", action="store_true",
                    help="do not pip install missing Python deps (psutil, cryptography)")
    a = ap.parse_args(argv)
    if a.size_mib is None:
        a.size_mib = 64 if a.quick else 1024
    if a.size_mib < 1 or a.runs < 1:
        ap.error("--size-mib and --runs must be >= 1")
    return a


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- steps
def generate(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(BLOCK, left))
            f.write(b)
            h.update(b)
            left -= len(b)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(BLOCK):
            h.update(b)
    return h.hexdigest()


def cold(notes: list[str]) -> bool:
    ok, note = drop_caches()
    if not ok and note not in notes:
        log(note)
        notes.append(note)
    return ok


def measure_cp(src: Path, dst: Path, size: int, notes: list[str]) -> dict:
    """`cp SRC DST` then `sync DST` (fsync of that file: the zkfs server fsyncs every blob;
    a bare `sync` would also flush whatever other work on the machine left dirty)."""
    dropped = cold(notes)
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t_cp = time.perf_counter() - t0
    subprocess.run(["sync", str(dst)], check=True)
    dt = time.perf_counter() - t0
    got = dst.stat().st_size
    dst.unlink()
    if got != size:
        raise RuntimeError(f"cp copy has {got} bytes, expected {size}")
    return {"cp_MBps": size / MB / dt, "cp_s": dt, "cp_returned_s": t_cp,
            "cp_cold": dropped}


def run_client(zk, args: list[str], log_path: Path, server_ps, interval: float) -> dict:
    """Run `client.py ARGS` in its own session, polling the peak RSS of its process tree
    and of the server's. Wall time of the whole command; the client's CPU time from wait4()
    (not its ru_maxrss: Linux carries the forking parent's RSS high-water mark over exec,
    so that would report the harness's own RSS); the server's CPU time delta."""
    import psutil
    cmd = [zk._py(), "client.py", *args]
    srv = server_ps[0]
    srv_cpu0 = sum(srv.cpu_times()[:2])
    with open(log_path, "ab") as logf:
        logf.write(f"$ {' '.join(cmd)}\n".encode())
        logf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=zk.env, cwd=str(zk_repo()),
                                start_new_session=True)
    ps = REG.add_proc(proc.pid, "zkfs client.py " + args[0])
    timer = threading.Timer(CMD_TIMEOUT, lambda: stop_process(ps, "client.py (timeout)"))
    timer.daemon = True
    timer.start()
    try:
        with RssPoller({"client": [ps], "server": server_ps}, interval=interval) as poll:
            _pid, status, ru = os.wait4(proc.pid, 0)
            dt = time.perf_counter() - t0
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    REG.drop_proc(ps)
    try:
        srv_cpu = sum(srv.cpu_times()[:2]) - srv_cpu0
    except psutil.Error:
        srv_cpu = float("nan")
    if proc.returncode != 0:
        raise RuntimeError(f"client.py {' '.join(args)} exited {proc.returncode}; log tail:\n"
                           + tail(log_path))
    return {"s": dt, "rss_client_MiB": poll.peak.get("client", 0) / MiB,
            "rss_server_MiB": poll.peak.get("server", 0) / MiB,
            "client_cpu_s": ru.ru_utime + ru.ru_stime, "server_cpu_s": srv_cpu}


def zk_repo() -> Path:
    from zkbench.systems import REPO
    return REPO


def one_run(i: int, opts, work: Path, src: Path, src_sha: str, size: int, zk,
            notes: list[str]) -> dict:
    import psutil
    from zkbench.cryptobench import crypto_ceiling
    m: dict = {}
    crypto = crypto_ceiling(seconds=0.5 if opts.quick else 1.5)
    for n in crypto.get("notes", []):
        if n not in notes:
            notes.append(n)
    m.update({f"{k}_MBps": v for k, v in crypto["results"].items()})

    log(f"run {i + 1}: cp + sync of {size // MiB} MiB")
    m.update(measure_cp(src, work / "cp-copy.bin", size, notes))
    log(f"run {i + 1}: cp {m['cp_MBps']:.0f} MB/s")

    server_ps = [psutil.Process(zk.server.pid)]
    m["rss_server_idle_MiB"] = sum(p.memory_info().rss for p in server_ps) / MiB
    remote_dir = f"/run{i + 1}"
    clog = work / "client.log"

    # the floor under every CLI command: interpreter start-up, imports, loading the keys
    ls = run_client(zk, ["ls", "/"], clog, server_ps, opts.rss_interval)
    m["startup_s"] = ls["s"]

    m["upload_cold"] = cold(notes)
    log(f"run {i + 1}: client.py upload")
    up = run_client(zk, ["upload", str(src), "--to", remote_dir], clog, server_ps,
                    opts.rss_interval)
    m.update({f"upload_{k}": v for k, v in up.items()})
    m["upload_MBps"] = size / MB / up["s"]
    log(f"run {i + 1}: upload {m['upload_MBps']:.1f} MB/s, {up['s']:.1f} s")

    out = work / "download.bin"
    m["download_cold"] = cold(notes)
    log(f"run {i + 1}: client.py download")
    dn = run_client(zk, ["download", f"{remote_dir}/{src.name}", "-o", str(out)], clog,
                    server_ps, opts.rss_interval)
    m.update({f"download_{k}": v for k, v in dn.items()})
    m["download_MBps"] = size / MB / dn["s"]
    log(f"run {i + 1}: download {m['download_MBps']:.1f} MB/s, {dn['s']:.1f} s")
    got = sha256_file(out)
    m["download_sha_ok"] = got == src_sha
    out.unlink()
    if got != src_sha:
        raise RuntimeError(f"download sha256 {got} != source {src_sha}")
    # free the server's copy before the next run (untimed)
    r = subprocess.run([zk._py(), "client.py", "rm", "-r", remote_dir], env=zk.env,
                       cwd=str(zk_repo()), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        notes.append(f"client.py rm -r {remote_dir} failed: {(r.stderr or r.stdout).strip()}")
    return m


# ----------------------------------------------------------------------------- report
def build_rows(med: dict, threads: int) -> list[tuple]:
    """(key, label, value, unit, x cp, x BinaryFernet 1 thread, x BinaryFernet N threads)"""
    nt = f"{threads}t"
    rows: list[tuple] = []

    def g(k):
        return med.get(k)

    def ratio(a, b):
        return a / b if a is not None and b else None

    rows.append(("cp_MBps", "cp + sync, same disk (ceiling)", g("cp_MBps"), "MB/s",
                 None, None, None))
    for impl, name in (("fernet", "Fernet"), ("zkfs_binary_fernet", "BinaryFernet")):
        for op in ("encrypt", "decrypt"):
            for t in sorted({"1t", nt}):
                k = f"{impl}_{op}_{t}_MBps"
                if k in med:
                    n = t[:-1]
                    rows.append((k, f"{name} {op}, 1 MiB msgs, {n} thread{'s' * (n != '1')}",
                                 g(k), "MB/s", None, None, None))
    for d, op in (("upload", "encrypt"), ("download", "decrypt")):
        v = g(f"{d}_MBps")
        rows.append((f"{d}_MBps", f"zkfs client.py {d} (wall)", v, "MB/s",
                     ratio(v, g("cp_MBps")),
                     ratio(v, g(f"zkfs_binary_fernet_{op}_1t_MBps")),
                     ratio(v, g(f"zkfs_binary_fernet_{op}_{nt}_MBps"))))
    for d in ("upload", "download"):
        rows.append((f"{d}_s", f"zkfs {d} wall time", g(f"{d}_s"), "s", None, None, None))
    rows.append(("startup_s", "client.py ls / wall time (CLI start-up floor)", g("startup_s"),
                 "s", None, None, None))
    for d in ("upload", "download"):
        rows.append((f"{d}_rss_client_MiB", f"peak RSS client ({d})",
                     g(f"{d}_rss_client_MiB"), "MiB", None, None, None))
        rows.append((f"{d}_rss_server_MiB", f"peak RSS server ({d})",
                     g(f"{d}_rss_server_MiB"), "MiB", None, None, None))
    rows.append(("rss_server_idle_MiB", "RSS server before upload", g("rss_server_idle_MiB"),
                 "MiB", None, None, None))
    for d in ("upload", "download"):
        rows.append((f"{d}_client_cpu_s", f"CPU client ({d})", g(f"{d}_client_cpu_s"),
                     "s", None, None, None))
        rows.append((f"{d}_server_cpu_s", f"CPU server ({d})", g(f"{d}_server_cpu_s"),
                     "s", None, None, None))
    return rows


def render(rows: list[tuple], threads: int) -> str:
    from zkbench.report import fmt
    header = ["metric", "value", "unit", "x cp", "x BinaryFernet 1t",
              f"x BinaryFernet {threads}t"]
    cells = [header]
    for _k, label, v, unit, *rs in rows:
        cells.append([label, fmt(v), unit, *[f"{r:.2f}x" if r is not None else "" for r in rs]])
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w[i]) if i in (0, 2) else c.rjust(w[i])
                               for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def write_csv(path: Path, rows: list[tuple], runs: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "metric", "median", "unit", "ratio_cp", "ratio_binaryfernet_1t",
                    "ratio_binaryfernet_allthreads",
                    *[f"run{i + 1}" for i in range(len(runs))]])
        for k, label, v, unit, *rs in rows:
            w.writerow([k, label, "" if v is None else f"{v:.6g}", unit,
                        *["" if r is None else f"{r:.4g}" for r in rs],
                        *[("" if r.get(k) is None else f"{r[k]:.6g}") for r in runs]])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    notes: list[str] = []
    if not opts.skip_install:
        notes += ensure_tools(need_apt=False)
    if os.geteuid() != 0:
        log("warning: not root; drop_caches will fail (reads may come from the page cache)")

    from zkbench.report import write_json
    from zkbench.systems import ZkfsSystem

    size = opts.size_mib * MiB
    threads = os.cpu_count() or 1
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(opts.workdir) if opts.workdir else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    need = int(size * 3.2) + 512 * MiB  # source, cp copy / download, server blobs
    if free < need:
        print(f"not enough space in {base}: {free / MiB:.0f} MiB free, need ~{need / MiB:.0f}",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="zkfs-transfer-", dir=base.resolve())).resolve()
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = os.getloadavg()
    log(f"work dir {work}; load average {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f} ({threads} CPUs)")
    if load_start[0] > 0.5 * threads:
        log("warning: machine busy before start; numbers will be noisy")
    t_start = time.monotonic()
    runs: list[dict] = []
    rc = 0
    zk = None
    src_sha = ""
    try:
        src = work / "source.bin"
        log(f"generating {opts.size_mib} MiB random source file")
        src_sha = generate(src, size)
        log(f"source sha256 {src_sha}")
        zk = ZkfsSystem(work / "zkfs", SimpleNamespace(no_proxy=True, zkfs_mount_args="",
                                                       zkfs_keep_cache=False))
        log("starting zkfs server, registering a user")
        zk.setup()  # server on 127.0.0.1:free port, register + login into a fresh ZKFS_HOME
        log(f"zkfs server {zk.url} (pid {zk.server.pid})")
        for i in range(opts.runs):
            m = one_run(i, opts, work, src, src_sha, size, zk, notes)
            m["run"] = i + 1
            runs.append(m)
    except (KeyboardInterrupt, SystemExit) as e:
        rc = 130 if isinstance(e, KeyboardInterrupt) else (
            int(e.code) if isinstance(e.code, int) else 1)
        log(f"{'interrupted' if rc == 130 else f'terminated ({rc})'}: cleaning up")
    except Exception:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        if zk is not None:
            try:
                zk.teardown()
            except Exception as e:  # noqa: BLE001
                log(f"zkfs teardown: {e}")
        REG.cleanup()
        if opts.keep:
            log(f"kept {work}")
        else:
            safe_rmtree(work)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not runs:
        return rc or 1

    elapsed = time.monotonic() - t_start
    load_end = os.getloadavg()
    keys = sorted({k for r in runs for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    med = {k: statistics.median([r[k] for r in runs if k in r]) for k in keys}
    rows = build_rows(med, threads)
    title = (f"zkfs transfer bench {started:%Y-%m-%d %H:%M}Z: {opts.size_mib} MiB file, "
             f"{len(runs)} run(s){' (medians)' if len(runs) > 1 else ''}, {threads} CPUs")
    print()
    print(title)
    print("MB/s = 10^6 bytes/s of plaintext. Upload/download: wall time of the whole "
          "client.py command (start-up, sha256 pass, transfer, commit).")
    print(render(rows, threads))
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} "
          f"({threads} CPUs)")
    print(f"download sha256 matches source: "
          f"{'yes' if all(r.get('download_sha_ok') for r in runs) else 'NO'}")
    for n in notes:
        print(f"note: {n}")

    write_csv(out_dir / "transfer.csv", rows, runs)
    write_json(out_dir / "transfer.json", {
        "meta": {"started": started.isoformat(), "elapsed_s": elapsed, "argv": sys.argv,
                 "options": vars(opts), "python": sys.version,
                 "platform": platform.platform(), "cpus": threads,
                 "size_bytes": size, "source_sha256": src_sha,
                 "loadavg_start": load_start, "loadavg_end": load_end, "notes": notes},
        "table": [{"key": k, "metric": label, "value": v, "unit": unit, "ratio_cp": a,
                   "ratio_binaryfernet_1t": b, "ratio_binaryfernet_allthreads": c}
                  for k, label, v, unit, a, b, c in rows],
        "median": med, "runs": runs})
    print(f"wrote {out_dir}/transfer.csv, transfer.json in {elapsed:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
