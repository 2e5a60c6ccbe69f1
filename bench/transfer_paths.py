"""Chunk bytes through the API node or straight to the bucket: a 1 GiB write and a
cold read through the FUSE mount on PostgreSQL + S3 (SeaweedFS on 127.0.0.1),
with presigned direct transfers and with ``direct=0`` (every byte through the API
node), in one run; MB/s and the API node's CPU seconds per GiB moved, with ratios.

    python bench/transfer_paths.py [--size-mib 1024] [--json FILE]

The write is timed until ``cp`` returns and the file's new version is committed
(the mount commits at close); the read is ``cat`` to /dev/null after a remount and
``drop_caches``, checked against the source's sha256 afterwards (untimed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from backends import PostgresCluster, S3Endpoint  # noqa: E402
from conftest import TEST_SECRET, ServerProcess  # noqa: E402
from harness import Machine, Mount  # noqa: E402

MiB = 1024 * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its children (uvicorn workers)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def run_mode(work: Path, pg: PostgresCluster, s3: S3Endpoint, src: Path, direct: bool) -> dict:
    blobs = s3.blobs_url(uuid.uuid4().hex[:8]) + ("" if direct else "&direct=0")
    srv = ServerProcess(work / f"node-{'direct' if direct else 'api'}", database_url=pg.new_database(),
                        blobs_url=blobs, env={**s3.env(), "ZKFS_SECRET_KEY": TEST_SECRET})
    srv.start()
    machine = Machine(work / f"machine-{direct}", srv.url).register()
    m = Mount(machine, work / f"mnt-{direct}", [])
    size = src.stat().st_size
    try:
        m.start()
        cpu0, t0 = cpu_seconds(srv.pid), time.monotonic()
        subprocess.run(["cp", str(src), str(m.path / "big.bin")], check=True)
        write_s = time.monotonic() - t0
        write_cpu = cpu_seconds(srv.pid) - cpu0
        m.unmount()
        drop_caches()
        m.start()
        cpu0, t0 = cpu_seconds(srv.pid), time.monotonic()
        subprocess.run(["cat", str(m.path / "big.bin")], stdout=subprocess.DEVNULL, check=True)
        read_s = time.monotonic() - t0
        read_cpu = cpu_seconds(srv.pid) - cpu0
        ok = sha256(m.path / "big.bin") == sha256(src)
    finally:
        m.cleanup()
        srv.stop()
    gib = size / (1024 * MiB)
    return {"write_mb_s": size / MiB / write_s, "read_mb_s": size / MiB / read_s,
            "write_cpu_s_per_gib": write_cpu / gib, "read_cpu_s_per_gib": read_cpu / gib, "verified": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zkfs-bench-paths-"))
    src = work / "src.bin"
    with open(src, "wb") as f:
        for _ in range(args.size_mib):
            f.write(__import__("os").urandom(MiB))
    pg, s3 = PostgresCluster().init().start(), S3Endpoint().start()
    results = {}
    try:
        for direct in (True, False):
            name = "presigned direct" if direct else "through the API node"
            results[name] = run_mode(work, pg, s3, src, direct)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        pg.destroy()
        s3.destroy()
    base = results["presigned direct"]
    print(f"\n{args.size_mib} MiB through the mount on PostgreSQL + S3 (SeaweedFS), one API node")
    print(f"{'path':<22} {'write MB/s':>10} {'read MB/s':>10} {'node CPU s/GiB written':>23} {'read':>6}")
    for name, r in results.items():
        print(f"{name:<22} {r['write_mb_s']:>10.1f} {r['read_mb_s']:>10.1f} "
              f"{r['write_cpu_s_per_gib']:>23.2f} {r['read_cpu_s_per_gib']:>6.2f}"
              + ("" if r["verified"] else "  (CONTENT MISMATCH)"))
    api = results["through the API node"]
    print(f"API node CPU per GiB, through the node / direct: write "
          f"{api['write_cpu_s_per_gib'] / max(base['write_cpu_s_per_gib'], 1e-9):.1f}x, read "
          f"{api['read_cpu_s_per_gib'] / max(base['read_cpu_s_per_gib'], 1e-9):.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
