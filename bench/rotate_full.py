#!/usr/bin/env python3
"""`client.py rotate-key --full` on 1,000 files and 1 GiB: wall time and peak RSS
of the client (and of the server), next to plain `rotate-key` and the upload of
the same tree. See bench/README.md.

    python bench/rotate_full.py [--files 1000] [--size-mib 1024] [--quick] [--keep]

The tree: ``--files - 1`` small files (4 KiB, in 10 folders) and one file holding
the rest of ``--size-mib``. Everything runs on 127.0.0.1 in a temp dir.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
from pathlib import Path

import psutil
from zkbench.localzkfs import PASSWORD, client, local_server, register

MiB = 1 << 20


def peak_rss(proc: psutil.Process, stop: threading.Event, out: list[int]) -> None:
    while not stop.wait(0.05):
        try:
            out[0] = max(out[0], proc.memory_info().rss)
        except psutil.Error:
            return


def make_tree(root: Path, files: int, size: int) -> None:
    small = 4096
    for i in range(files - 1):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(small))
    left = size - (files - 1) * small
    with open(root / "big.bin", "wb") as f:
        while left > 0:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="zkfs-rotbench-", dir=args.workdir))
    try:
        with local_server(work / "server") as (server, url):
            home = work / "home"
            register(home, url)
            make_tree(work / "tree", args.files, args.size_mib * MiB)
            up = client(home, "upload", "-r", str(work / "tree"))[0]
            srv = psutil.Process(server.pid)
            results = {}
            for label, extra in (("rotate-key", ()), ("rotate-key --full", ("--full",))):
                stop, server_peak = threading.Event(), [0]
                poller = threading.Thread(target=peak_rss, args=(srv, stop, server_peak))
                poller.start()
                seconds, rss, out = client(home, "rotate-key", "--password-stdin", *extra, stdin=PASSWORD + "\n")
                stop.set()
                poller.join()
                results[label] = (seconds, rss, server_peak[0], out.strip())
        print(f"tree: {args.files} files, {args.size_mib} MiB; upload -r: {up:.1f} s")
        for label, (seconds, rss, srv_rss, out) in results.items():
            print(f"{label:18} {seconds:7.1f} s   client peak RSS {rss / MiB:6.0f} MiB   "
                  f"server peak RSS {srv_rss / MiB:6.0f} MiB   ({out})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size-mib", type=int, default=None, help="default 1024 (64 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.size_mib = args.size_mib or (64 if args.quick else 1024)
    run(args)


if __name__ == "__main__":
    main()
