#!/usr/bin/env python3
"""zkfs benchmark harness: the same workloads on a local dir, zkfs, rclone crypt and
gocryptfs, in one run on this machine. See bench/README.md.

    python bench/run.py [--systems local,zkfs,rclone,gocryptfs] [--size-mib 1024]
                        [--files 2000] [--runs 1] [--out bench/results] [--quick]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from zkbench.util import REG, ensure_tools, log, mounts_under, safe_rmtree  # noqa: E402
from zkbench.workloads import WORKLOADS  # noqa: E402

ALL_WORKLOADS = [w for w, _fn, _deps in WORKLOADS]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="local,zkfs,rclone,gocryptfs",
                    help="comma list of: local, zkfs, rclone, gocryptfs")
    ap.add_argument("--size-mib", type=int, default=None, help="big file size (default 1024)")
    ap.add_argument("--files", type=int, default=None, help="small files (default 2000)")
    ap.add_argument("--runs", type=int, default=1, help="repeat everything; medians reported")
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--workdir", default=None,
                    help="where temp dirs go (default: a new dir under /tmp)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 64 MiB file, 200 files, short crypto runs")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    ap.add_argument("--workloads", default=None,
                    help="comma list of workloads to run (default: all but git_clone; "
                         "'all' for every one): " + ", ".join(ALL_WORKLOADS))
    ap.add_argument("--wan", action="store_true",
                    help="put an emulated user's link (tests/netem.py: --rtt-ms round trip, "
                         "--mbit each way) between every networked client and its server")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="--wan round trip (default 20)")
    ap.add_argument("--mbit", type=float, default=200.0,
                    help="--wan bandwidth cap, Mbit/s each way per connection (default 200; "
                         "0: none)")
    ap.add_argument("--git-source", default="/usr/include",
                    help="git_clone: the first --git-files files of this tree (sorted walk) "
                         "are committed into a local repo, then cloned (default /usr/include)")
    ap.add_argument("--git-files", type=int, default=5000, help="git_clone: files (default 5000)")
    ap.add_argument("--no-proxy", action="store_true",
                    help="networked systems talk to their server directly (then the bytes "
                         "sent during edit_middle are only estimated by the server's rchar)")
    ap.add_argument("--rclone-write-back", default="5s",
                    help="rclone --vfs-write-back: idle delay after close before the upload "
                         "starts (default: rclone's own default, 5s; counted in 'settled'. "
                         "Note: 0s loses files renamed right after close, e.g. by rsync)")
    ap.add_argument("--zkfs-keep-cache", action="store_true",
                    help="keep zkfs's local ciphertext cache across the cold remounts "
                         "(default: wiped, like rclone's VFS cache, so cold reads hit the server)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-workload watchdog in seconds: past it the system's mount daemon "
                         "is stopped so a hung FUSE call fails, then it is mounted afresh for the next "
                         "workload (default 450; --quick 120)")
    ap.add_argument("--zkfs-mount-args", default="",
                    help="extra arguments for zkfs's mount.py, e.g. \"--cache-size 4G\"")
    ap.add_argument("--no-crypto", action="store_true", help="skip the crypto ceiling")
    ap.add_argument("--skip-install", action="store_true",
                    help="do not apt-get/pip install missing tools")
    a = ap.parse_args(argv)
    if a.size_mib is None:
        a.size_mib = 64 if a.quick else 1024
    if a.files is None:
        a.files = 200 if a.quick else 2000
    if a.timeout is None:
        a.timeout = 120.0 if a.quick else 450.0
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if a.workloads in (None, "all"):
        a.workloads = [w for w in ALL_WORKLOADS if a.workloads == "all" or w != "git_clone"]
    else:
        a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
        bad = [w for w in a.workloads if w not in ALL_WORKLOADS]
        if bad:
            ap.error(f"unknown workload(s) {', '.join(bad)}; choose from "
                     + ", ".join(ALL_WORKLOADS))
    if a.wan and a.no_proxy:
        ap.error("--wan needs the relay: drop --no-proxy")
    return a


STOP = threading.Event()


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def run_system(name: str, root: Path, opts, ds) -> dict:
    from zkbench.systems import SYSTEMS, SystemUnavailable
    from zkbench.workloads import Result

    res = Result(name)
    sys_ = SYSTEMS[name](root, opts)
    log(f"== {name}: {sys_.description}")
    try:
        try:
            sys_.setup()
            sys_.mount()
        except SystemUnavailable as e:
            log(f"   {name} unavailable: {e}")
            out = res.as_dict()
            out["unavailable"] = str(e)
            return out
        done: set[str] = set()
        aborted = threading.Event()
        for wname, fn, deps in WORKLOADS:
            if wname not in opts.workloads:
                continue
            missing = [d for d in deps if d not in done]
            if missing:
                res.errors[wname] = f"skipped: {', '.join(missing)} failed"
                continue
            if STOP.is_set():
                return res.as_dict()
            if aborted.is_set():
                res.errors[wname] = "skipped: an earlier workload hung (watchdog)"
                continue
            log(f"   {name}: {wname}")
            t0 = time.monotonic()

            def fire(w=wname):
                log(f"   {name}: {w} still running after {opts.timeout:.0f}s: watchdog aborts "
                    "the mount")
                aborted.set()
                sys_.abort()
            timer = threading.Timer(opts.timeout, fire)
            timer.daemon = True
            timer.start()
            before = set(res.metrics)
            try:
                fn(sys_, ds, res)
                done.add(wname)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one workload failing must not stop the rest
                # numbers of a failed workload are not results
                for k in set(res.metrics) - before:
                    res.raw.setdefault("discarded_metrics", {})[k] = res.metrics.pop(k)
                res.errors[wname] = (f"{type(e).__name__}: {e}" + (
                    f" (watchdog fired after {opts.timeout:.0f}s)" if aborted.is_set() else ""))
                log(f"   {name}: {wname} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
            finally:
                timer.cancel()
            log(f"   {name}: {wname} took {time.monotonic() - t0:.1f}s")
            if aborted.is_set() and not STOP.is_set():
                # the watchdog killed the mount: give the remaining workloads a fresh one
                try:
                    log(f"   {name}: mounting afresh after the watchdog")
                    sys_.unmount()
                    sys_.mount()
                    aborted.clear()
                except Exception as e:  # noqa: BLE001
                    log(f"   {name}: remount failed: {type(e).__name__}: {e}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001
        res.errors["setup"] = f"{type(e).__name__}: {e}"
        log(f"   {name}: setup FAILED: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
    finally:
        try:
            sys_.teardown()
        except Exception as e:  # noqa: BLE001
            log(f"   {name}: teardown error: {e}")
        if sys_.proxy:
            sys_.proxy.close()
    res.notes.extend(sys_.notes)
    out = res.as_dict()
    out["description"] = sys_.description
    return out


def main(argv=None) -> int:
    opts = parse_args(argv)
    from zkbench.systems import SYSTEMS
    bad = [s for s in opts.systems if s not in SYSTEMS]
    if bad:
        print(f"unknown system(s): {', '.join(bad)}; choose from {', '.join(SYSTEMS)}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        log("warning: not root; drop_caches and FUSE mounts may fail")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    notes: list[str] = []
    if not opts.skip_install:
        notes += ensure_tools(need_apt=any(s != "local" for s in opts.systems))

    from zkbench import report
    from zkbench.cryptobench import crypto_ceiling
    from zkbench.workloads import Dataset

    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(opts.workdir) if opts.workdir else Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zkfs-bench-", dir=base.resolve())).resolve()
    log(f"work dir {work}")
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = os.getloadavg()
    if load_start[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: machine busy before start (load average {load_start[0]:.1f}); "
            "numbers will be noisy")
    t_start = time.monotonic()
    runs: list[dict] = []
    crypto: dict = {}
    failure: list[BaseException] = []

    def body() -> None:
        # Runs in a worker thread: the main thread stays free to take Ctrl-C/SIGTERM even
        # while the worker is blocked in a FUSE call that only killing the daemon can end.
        try:
            ds = Dataset(work / "src", opts.size_mib, opts.files)
            ds.generate(big="seq_write" in opts.workloads,
                        tree=bool({"small_files", "meta_ls"} & set(opts.workloads)))
            if "git_clone" in opts.workloads:
                ds.generate_git(Path(opts.git_source), opts.git_files)
            if not opts.no_crypto:
                crypto.update(crypto_ceiling(seconds=0.5 if opts.quick else 1.5))
            for i in range(opts.runs):
                for name in opts.systems:
                    if STOP.is_set():
                        return
                    root = work / f"run{i}-{name}"
                    r = run_system(name, root, opts, ds)
                    r["run"] = i
                    if not STOP.is_set():
                        runs.append(r)
                    if not opts.keep:
                        safe_rmtree(root)
        except BaseException as e:  # noqa: BLE001
            failure.append(e)
            if not STOP.is_set():
                traceback.print_exc(file=sys.stderr)

    rc = 0
    worker = threading.Thread(target=body, name="bench", daemon=True)
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
    except (KeyboardInterrupt, SystemExit) as e:
        rc = 130 if isinstance(e, KeyboardInterrupt) else (
            int(e.code) if isinstance(e.code, int) else 1)
        log(f"{'interrupted' if rc == 130 else f'terminated ({rc})'}: cleaning up")
        STOP.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        REG.cleanup()  # unmounts and stops our daemons: the worker's FUSE calls fail now
        worker.join(60)
    finally:
        REG.cleanup()
        left = mounts_under(work)
        if left:
            log(f"WARNING: mounts left under {work}: {left}")
        if not opts.keep:
            safe_rmtree(work)
        else:
            log(f"kept {work}")
    if failure and not rc:
        rc = 1
    if not runs:
        return rc or 1
    elapsed = time.monotonic() - t_start
    summary = report.summarize(runs, opts.systems)
    header, rows, keys = report.table_rows(summary, opts.systems)
    table = report.render_table(header, rows)
    link = (f"WAN profile: {opts.rtt_ms:g} ms RTT, {opts.mbit:g} Mbit/s" if opts.wan
            else "loopback")
    title = (f"zkfs bench {started:%Y-%m-%d %H:%M}Z: {opts.size_mib} MiB file, {opts.files} "
             f"files, {opts.runs} run(s), {os.cpu_count()} CPUs, {link}")
    print()
    print(title)
    print("MB/s = 10^6 bytes/s. Ratio zkfs/X > 1 is good where higher is better, "
          "< 1 is good where lower is better.")
    print(table)
    la = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f}, at end {la[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    print()
    if crypto:
        print(report.crypto_table(crypto))
        print()
    for s in opts.systems:
        sm = summary[s]
        if sm["unavailable"]:
            print(f"{s}: not measured: {sm['unavailable']}")
        for c in sm["checks_failed"]:
            kind = "CHECK FAILED" if c.get("fatal", True) else "behaviour check failed"
            print(f"{s}: {kind}: {c['name']}: {c['detail']}")
        for k, v in sm["errors"].items():
            print(f"{s}: ERROR in {k}: {v}")
        for n in sm["notes"]:
            print(f"{s}: note: {n}")
    all_notes = notes + [n for s in opts.systems for n in summary[s]["notes"]]
    if crypto:
        all_notes += crypto.get("notes", [])

    report.write_csv(out_dir / "results.csv", header, rows, keys)
    if crypto:
        report.write_crypto_csv(out_dir / "crypto.csv", crypto)
    report.write_json(out_dir / "results.json", {
        "meta": {"started": started.isoformat(), "elapsed_s": elapsed,
                 "argv": sys.argv, "options": {k: v for k, v in vars(opts).items()},
                 "python": sys.version, "platform": platform.platform(),
                 "cpus": os.cpu_count(), "notes": notes,
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                 "metrics": [{"key": k, "workload": w, "label": l, "unit": u, "better": b}
                             for k, w, l, u, b in report.METRICS]},
        "systems": {r["system"]: r.get("description", "") for r in runs},
        "summary": summary, "crypto": crypto, "runs": runs})
    try:
        report.write_chart(out_dir / "chart.png", summary, opts.systems, crypto, title)
    except Exception as e:  # noqa: BLE001
        log(f"chart failed: {e}")
    print(f"wrote {out_dir}/results.csv, results.json, chart.png"
          + (", crypto.csv" if crypto else "") + f" in {elapsed:.0f}s")
    failed = any(summary[s]["errors"] or any(c.get("fatal", True)
                                             for c in summary[s]["checks_failed"])
                 for s in opts.systems)
    return rc or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
