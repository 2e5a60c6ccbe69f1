"""Metadata throughput of the zkfs server: creates/s, lookups/s and one 10,000-entry
listing, with 16 concurrent clients, on sqlite and on PostgreSQL (+ S3), behind 1
or 2 API nodes (2: HAProxy in front), in one run, with ratios to the first setup.

    python bench/metadata.py [--setups sqlite-1,postgres-1,postgres-2] [--clients 16]
                             [--seconds 10] [--listing 10000] [--repo DIR] [--json FILE]

Each client is its own account (an account's writes are serialised by design;
accounts are independent), driving the raw API with random bytes as ciphertext
over one keep-alive connection. ``--repo``: the checkout whose server is measured
(an older one too, for before/after figures: the client side is the v1 API).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from backends import PostgresCluster, S3Endpoint  # noqa: E402
from loadbalancer import LoadBalancer  # noqa: E402


def b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def nh(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Client:
    def __init__(self, api: str) -> None:
        self.c = httpx.Client(base_url=api, timeout=60)
        self.username = "b" + uuid.uuid4().hex[:12]
        self.auth_key = b64(32)
        self.root = uuid.uuid4()
        body = {"username": self.username, "auth_key": self.auth_key,
                "kdf": {"alg": "argon2id", "salt": b64(16), "memory_kib": 65536, "iterations": 3, "lanes": 4},
                "master_key": {"gen": 1, "wrapped_master": b64(40), "wrapped_namespace": b64(40)},
                "root_inode": str(self.root), "root_meta": b64(64)}
        r = self.c.post("/users", json=body)
        r.raise_for_status()
        r = self.c.post("/auth/login", json={"username": self.username, "auth_key": self.auth_key})
        r.raise_for_status()
        self.c.headers["Authorization"] = "Bearer " + r.json()["access_token"]
        self.names: list[str] = []

    def create(self, name: str) -> None:
        op = {"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(120),
              "parent": str(self.root), "name_hash": nh(name), "name": b64(40)}
        r = self.c.post("/fs/ops", json={"ops": [op]})
        r.raise_for_status()
        self.names.append(name)

    def lookup(self, name: str) -> None:
        self.c.get(f"/fs/dirs/{self.root}/entries/{nh(name)}").raise_for_status()


def _timed(clients: list[Client], seconds: float, work) -> float:
    """Operations per second of ``work(client, i)`` run by every client for ``seconds``."""
    stop = time.monotonic() + seconds
    counts = [0] * len(clients)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            i = 0
            while time.monotonic() < stop:
                work(clients[k], i)
                i += 1
            counts[k] = i
        except BaseException as e:      # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.monotonic() - start)


def measure(api: str, n_clients: int, seconds: float, listing: int) -> dict:
    clients = [Client(api) for _ in range(n_clients)]
    creates = _timed(clients, seconds, lambda c, i: c.create(f"f{i}"))
    lookups = _timed(clients, seconds, lambda c, i: c.lookup(c.names[i % len(c.names)]))
    big = clients[0]
    batch = []
    for i in range(listing):
        batch.append({"op": "create", "inode": str(uuid.uuid4()), "is_dir": False, "meta": b64(120),
                      "parent": str(big.root), "name_hash": nh(f"L{i}"), "name": b64(40)})
        if len(batch) == 1000:
            big.c.post("/fs/ops", json={"ops": batch}).raise_for_status()
            batch = []
    times = []
    for _ in range(5):
        t = time.monotonic()
        r = big.c.get(f"/fs/dirs/{big.root}/entries")
        r.raise_for_status()
        times.append(time.monotonic() - t)
        assert len(r.json()["entries"]) >= listing
    return {"creates_per_s": creates, "lookups_per_s": lookups, "listing_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="sqlite-1,postgres-1,postgres-2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--listing", type=int, default=10_000)
    ap.add_argument("--repo", default=str(HERE.parent))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from conftest import TEST_SECRET, ServerProcess

    import tempfile
    work = Path(tempfile.mkdtemp(prefix="zkfs-bench-meta-"))
    pg = s3 = None
    results: dict[str, dict] = {}
    try:
        for setup in args.setups.split(","):
            kind, nodes = setup.rsplit("-", 1)
            kw: dict = {"env": {"ZKFS_REGISTRATIONS_PER_HOUR": "1000000"}}
            if kind == "postgres":
                if pg is None:
                    pg, s3 = PostgresCluster().init().start(), S3Endpoint().start()
                kw.update(database_url=pg.new_database(), blobs_url=s3.blobs_url(uuid.uuid4().hex[:8]))
                kw["env"] |= {**s3.env(), "ZKFS_SECRET_KEY": TEST_SECRET}
            servers = []
            for n in range(int(nodes)):
                servers.append(ServerProcess(work / f"{setup}-{n}", repo=Path(args.repo), **kw))
            lb = None
            try:
                for srv in servers:
                    srv.start()
                api = servers[0].api
                if len(servers) > 1:
                    lb = LoadBalancer([s.port for s in servers], work / f"{setup}-lb").start()
                    api = lb.url + "/api/v1"
                results[setup] = measure(api, args.clients, args.seconds, args.listing)
            finally:
                if lb:
                    lb.stop()
                for srv in servers:
                    srv.stop()
            print(f"{setup}: {results[setup]}", flush=True)
    finally:
        for p in (pg, s3):
            if p is not None:
                p.destroy()
    base = next(iter(results.values()))
    print(f"\n{args.clients} concurrent clients, {args.seconds:.0f} s each, {args.listing}-entry listing")
    print(f"{'setup':<14} {'creates/s':>10} {'ratio':>6} {'lookups/s':>10} {'ratio':>6} {'listing s':>10} {'ratio':>6}")
    for setup, r in results.items():
        print(f"{setup:<14} {r['creates_per_s']:>10.0f} {r['creates_per_s'] / base['creates_per_s']:>6.2f}"
              f" {r['lookups_per_s']:>10.0f} {r['lookups_per_s'] / base['lookups_per_s']:>6.2f}"
              f" {r['listing_s']:>10.3f} {r['listing_s'] / base['listing_s']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
