#!/usr/bin/env python3
"""Shared folders at scale: `client.py share` of a folder of 10,000 files (seconds and
requests), adding a second member, `unshare` (seconds, requests) and `unshare
--reencrypt` (MB/s), of that folder and of a folder holding one big file. See
bench/README.md.

    python bench/sharing.py [--files 10000] [--size-mib 256] [--quick] [--keep]

/tree: ``--files`` files of 4 KiB in 10 folders (rotate_full.py's tree); /big: one
file of ``--size-mib``. Each command is timed as the whole client.py process;
requests are the server's access log lines written while it ran. Everything runs on
127.0.0.1 in a temp dir.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rotate_full import MiB, PASSWORD, client, make_tree
from zkbench.localzkfs import local_server


def requests_in(log: Path, start: int) -> tuple[int, int]:
    """(requests logged after byte ``start`` of the access log, its new end)."""
    data = log.read_bytes()
    return data[start:].count(b' HTTP/1.1" '), len(data)


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="zkfs-sharebench-", dir=args.workdir))
    log = work / "server.log"
    try:
        with local_server(work / "server", log=log) as (_server, url):
            homes = {}
            for name in ("alice", "bob", "carol"):
                homes[name] = work / name
                homes[name].mkdir()
                client(homes[name], "register", name, "--server", url, "--password-stdin", stdin=PASSWORD + "\n")
            alice = homes["alice"]
            make_tree(work / "tree", args.files, args.files * 4096)           # --files files of 4 KiB
            (work / "big").mkdir()
            make_tree(work / "big", 1, args.size_mib * MiB)                    # one file of --size-mib
            up = client(alice, "upload", "-r", str(work / "tree"))[0]
            client(alice, "upload", "-r", str(work / "big"))
            sizes = {d: sum(p.stat().st_size for p in (work / d).rglob("*") if p.is_file()) for d in ("tree", "big")}
            rows = []
            end = log.stat().st_size
            for label, cmd in (("share (makes the share)", ("share", "/tree", "bob")),
                               ("share (a second member)", ("share", "/tree", "carol")),
                               ("unshare", ("unshare", "/tree", "bob")),
                               ("unshare --reencrypt", ("unshare", "/tree", "carol", "--reencrypt")),
                               ("share of one big file", ("share", "/big", "bob")),
                               ("unshare --reencrypt of it", ("unshare", "/big", "bob", "--reencrypt"))):
                seconds, rss, out = client(alice, *cmd)
                count, end = requests_in(log, end)
                rows.append((label, cmd[1][1:], seconds, count, rss, out.strip().splitlines()[-1]))
            # what was re-encrypted still reads back for a member
            for folder, name in (("tree", "d3/f3.bin"), ("big", "big.bin")):
                client(alice, "share", f"/{folder}", "carol")
                client(homes["carol"], "download", f"/Shared/alice/{folder}/{name}", "-o", str(work / "back"))
                if (work / "back").read_bytes() != (work / folder / name).read_bytes():
                    raise SystemExit(f"{folder}/{name} does not read back after --reencrypt")
                (work / "back").unlink()
            print(f"/tree: {args.files} files of 4 KiB, upload -r {up:.1f} s; /big: one file of {args.size_mib} MiB")
            for label, folder, seconds, count, rss, out in rows:
                extra = f"   {sizes[folder] / seconds / 1e6:6.1f} MB/s" if "reencrypt" in label else ""
                print(f"{label:26} {seconds:7.1f} s {count:7d} requests   client peak RSS {rss / MiB:5.0f} MiB{extra}"
                      f"\n    ({out})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=None, help="default 10000 (500 with --quick)")
    ap.add_argument("--size-mib", type=int, default=None, help="default 256 (16 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.files = args.files or (500 if args.quick else 10_000)
    args.size_mib = args.size_mib or (16 if args.quick else 256)
    run(args)


if __name__ == "__main__":
    main()
