"""Load test, 127.0.0.1 only, bounded in count and time.

A server with ``--workers 2``; ZKFS_LOAD_CLIENTS (20) concurrent clients, each a
thread driving the real ``zkfs`` client library in-process (its own machine
state, 4 clients per account), doing mixed uploads, downloads, listings, renames
and deletes in its own folder for ZKFS_LOAD_SECONDS (60). Required: zero errors,
every file at the end exactly what its client last wrote (sha256), and the
server's memory bounded: the whole process tree (supervisor + workers) under
ZKFS_LOAD_RSS_MIB (150, the issue's server bound) per process, and not growing from the first quarter of the
run to the last (no leak under load).
p50/p99 latency per operation, throughput and RSS are printed (run with -s).
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import stat
import statistics
import threading
import time
import traceback
from pathlib import Path
from uuid import uuid4

import pytest

from faultkit import client_vault, sha256_bytes, tree_rss

DURATION = float(os.environ.get("ZKFS_LOAD_SECONDS", "60"))
CLIENTS = int(os.environ.get("ZKFS_LOAD_CLIENTS", "20"))
PER_ACCOUNT = 4
RSS_LIMIT_MIB = float(os.environ.get("ZKFS_LOAD_RSS_MIB", "150"))   # per server process (the server bound)
MAX_FILES = 25
SIZES = [(1_000, 25), (16_000, 20), (100_000, 25), (700_000, 15), (1_500_000, 10), (2_600_000, 5)]

pytestmark = [pytest.mark.timeout(int(DURATION) + 240), pytest.mark.slow]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


class LoadClient:
    def __init__(self, idx: int, machine, workdir: Path):
        from zkfs.vault import new_attrs
        self.idx = idx
        self.rng = random.Random(1000 + idx)
        self.vault = client_vault(machine)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir_name = f"client-{idx}"
        dir_id = uuid4()
        root = self.vault.root
        self.vault.apply([self.vault.op_create(root, self.dir_name, dir_id, new_attrs(stat.S_IFDIR | 0o755))])
        self.dir = self.vault.get(dir_id)
        self.model: dict[str, str] = {}          # name -> sha256 of what this client last wrote
        self.lat: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.bytes_up = self.bytes_down = 0
        self.seq = 0

    # ------------------------------------------------------------ operations
    def _size(self) -> int:
        sizes, weights = zip(*SIZES)
        return self.rng.choices(sizes, weights)[0]

    def upload(self) -> None:
        from zkfs.transfer import upload_file
        if self.model and self.rng.random() < 0.4:
            name = self.rng.choice(sorted(self.model))            # a new version of a file
        else:
            self.seq += 1
            name = f"f{self.seq:04d}.bin"
        data = os.urandom(self._size())
        src = self.workdir / "upload.tmp"
        src.write_bytes(data)
        _node, sha = upload_file(self.vault, src, self.dir, name)
        assert sha == sha256_bytes(data)
        self.model[name] = sha
        self.bytes_up += len(data)

    def download(self) -> None:
        from zkfs.transfer import download_file
        name = self.rng.choice(sorted(self.model))
        node = self.vault.lookup(self.dir.id, name)
        assert node is not None, f"{name} vanished"
        dest = self.workdir / "download.out"
        sha = download_file(self.vault, node, dest)
        assert sha == self.model[name], f"{name}: downloaded content differs from the last upload"
        self.bytes_down += node.attrs.size

    def listdir(self) -> None:
        names = {n for n, _ in self.vault.listdir(self.dir.id)}
        assert names == set(self.model), f"listing {sorted(names ^ set(self.model))} differs from the model"

    def rename(self) -> None:
        old = self.rng.choice(sorted(self.model))
        self.seq += 1
        new = f"r{self.seq:04d}.bin"
        node = self.vault.lookup(self.dir.id, old)
        assert node is not None, f"{old} vanished"
        self.vault.apply([self.vault.op_rename(node, self.dir.id, old, self.dir.id, new)])
        self.model[new] = self.model.pop(old)

    def delete(self) -> None:
        name = self.rng.choice(sorted(self.model))
        node = self.vault.lookup(self.dir.id, name)
        assert node is not None, f"{name} vanished"
        self.vault.apply([self.vault.op_unlink(self.dir.id, name, node.id)])
        del self.model[name]

    def pick(self) -> str:
        if not self.model:
            return "upload"
        if len(self.model) >= MAX_FILES:
            return "delete"
        return self.rng.choices(["upload", "download", "listdir", "rename", "delete"], [35, 30, 20, 10, 5])[0]

    def run(self, stop_at: float) -> None:
        while time.monotonic() < stop_at and len(self.errors) < 5:
            op = self.pick()
            t = time.perf_counter()
            try:
                getattr(self, op)()
            except BaseException as exc:       # noqa: BLE001 - every failure is reported
                self.errors.append(f"client {self.idx} {op}: {exc!r}\n{traceback.format_exc(limit=4)}")
                continue
            self.lat.setdefault(op, []).append(time.perf_counter() - t)

    def verify(self) -> int:
        """Every file of this client is exactly what it last wrote."""
        from zkfs.transfer import download_file
        listed = dict(self.vault.listdir(self.dir.id))
        assert set(listed) == set(self.model), (self.idx, sorted(set(listed) ^ set(self.model)))
        for name, node in listed.items():
            sha = download_file(self.vault, node, self.workdir / "verify.out")
            assert sha == self.model[name], f"client {self.idx}: {name} is corrupt or lost an update"
        return len(listed)


def test_load_mixed_clients(make_server, make_machine, tmp_path):
    srv = make_server(workers=2)
    rss_idle = tree_rss(srv.pid)
    accounts = -(-CLIENTS // PER_ACCOUNT)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        owners = list(pool.map(lambda _: make_machine(srv).register(), range(accounts)))
        machines = list(owners)
        extra = [make_machine(srv) for _ in range(CLIENTS - accounts)]
        list(pool.map(lambda im: im[1].login(owners[im[0] % accounts].username), enumerate(extra)))
    machines += extra
    clients = [LoadClient(i, m, tmp_path / f"c{i}") for i, m in enumerate(machines[:CLIENTS])]

    rss_samples: list[int] = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.wait(0.5):
            rss_samples.append(tree_rss(srv.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss_start = tree_rss(srv.pid)
    t0 = time.monotonic()
    stop_at = t0 + DURATION
    threads = [threading.Thread(target=c.run, args=(stop_at,), name=f"load-{c.idx}", daemon=True) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.monotonic()) + 120)
    elapsed = time.monotonic() - t0
    stop_sampling.set()
    sampler.join(5)
    hung = [t.name for t in threads if t.is_alive()]
    errors = [e for c in clients for e in c.errors]

    # ---- report
    lat: dict[str, list[float]] = {}
    for c in clients:
        for op, values in c.lat.items():
            lat.setdefault(op, []).extend(values)
    total_ops = sum(len(v) for v in lat.values())
    up = sum(c.bytes_up for c in clients)
    down = sum(c.bytes_down for c in clients)
    rss_max = max(rss_samples or [0])
    lines = [f"load: {len(clients)} clients over {accounts} accounts, server --workers 2, {elapsed:.1f} s"]
    for op in sorted(lat):
        v = lat[op]
        lines.append(f"  {op:9s} n={len(v):5d}  p50={pct(v, 50) * 1000:8.1f} ms  p99={pct(v, 99) * 1000:8.1f} ms  "
                     f"mean={statistics.mean(v) * 1000:8.1f} ms")
    lines.append(f"  throughput: {total_ops / elapsed:.1f} ops/s, upload {up / elapsed / 1e6:.2f} MB/s, "
                 f"download {down / elapsed / 1e6:.2f} MB/s")
    quarter = max(1, len(rss_samples) // 4)
    trend = " -> ".join(f"{max(rss_samples[i:i + quarter] or [0]) / 2**20:.0f}" for i in range(0, len(rss_samples), quarter))
    lines.append(f"  server RSS (whole process tree, {srv.workers} workers): idle {rss_idle / 2**20:.0f} MiB, "
                 f"after {len(machines)} logins {rss_start / 2**20:.0f} MiB, max under load {rss_max / 2**20:.0f} MiB "
                 f"(per quarter: {trend}), limit {RSS_LIMIT_MIB:.0f} MiB per process")
    report = "\n".join(lines)
    print("\n" + report)

    assert not hung, f"client threads hung: {hung}\n{report}"
    assert not errors, f"{len(errors)} errors:\n" + "\n".join(errors[:10]) + "\n" + report
    assert total_ops >= len(clients) * 5, report
    # ---- nothing lost, nothing corrupt
    verified = sum(c.verify() for c in clients)
    assert verified > 0
    processes = srv.workers + (1 if srv.workers > 1 else 0)      # uvicorn's supervisor
    assert rss_max < RSS_LIMIT_MIB * 2**20 * processes, report
    first, last = max(rss_samples[:quarter]), max(rss_samples[-quarter:])
    assert last <= first * 1.10, f"server memory grew under load\n{report}"
    assert "Traceback" not in srv.log(), srv.log()[-3000:]
    for c in clients:
        c.vault.api.close()
