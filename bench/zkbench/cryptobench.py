"""The crypto ceiling: Fernet (and zkfs's BinaryFernet, if present) on 1 MiB messages,
one thread and os.cpu_count() threads (ThreadPool)."""
from __future__ import annotations

import os
import sys
import threading
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path

from .util import log

MiB = 1 << 20
MSG = 1 * MiB


def _rate(fn, arg, seconds: float, threads: int) -> float:
    """MB/s (10^6 bytes/s) of plaintext through fn over `threads` threads for ~seconds."""
    barrier = threading.Barrier(threads)

    def worker(_i: int) -> int:
        barrier.wait()
        n = 0
        end = time.perf_counter() + seconds
        while n < 2 or time.perf_counter() < end:
            fn(arg)
            n += 1
        return n

    fn(arg)  # warm up
    t0 = time.perf_counter()
    if threads == 1:
        counts = [worker(0)]
    else:
        with ThreadPool(threads) as pool:
            counts = pool.map(worker, range(threads))
    dt = time.perf_counter() - t0
    return sum(counts) * MSG / 1e6 / dt


def crypto_ceiling(seconds: float = 1.5) -> dict:
    threads = os.cpu_count() or 1
    out: dict = {"threads": threads, "message_bytes": MSG, "results": {}, "notes": []}
    msg = os.urandom(MSG)
    impls = []
    from cryptography.fernet import Fernet
    fer = Fernet(Fernet.generate_key())
    impls.append(("fernet", fer.encrypt, fer.decrypt))
    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        from zkfs.crypto import BinaryFernet  # type: ignore
        bf = BinaryFernet(os.urandom(32))
        tok = bf.encrypt(msg)
        if bf.decrypt(tok) != msg:
            raise ValueError("BinaryFernet round trip mismatch")
        impls.append(("zkfs_binary_fernet", bf.encrypt, bf.decrypt))
    except Exception as e:  # noqa: BLE001 - absent or broken: skip gracefully
        out["notes"].append(f"zkfs.crypto.BinaryFernet skipped: {type(e).__name__}: {e}")
    for name, enc, dec in impls:
        token = enc(msg)
        assert dec(token) == msg
        for op, fn, arg in (("encrypt", enc, msg), ("decrypt", dec, token)):
            for t in sorted({1, threads}):
                key = f"{name}_{op}_{'1t' if t == 1 else f'{t}t'}"
                out["results"][key] = _rate(fn, arg, seconds, t)
                log(f"crypto {key}: {out['results'][key]:.0f} MB/s")
    return out
