"""The client's grouping of upload-URL requests (zkfs/api.py ``_Coalescer``): pure
logic, with a fake fetch standing in for the server."""
from __future__ import annotations

import threading
import time
import uuid

from zkfs.api import _Coalescer
from zkfs.errors import ServerError


def test_parallel_callers_share_requests_and_each_gets_its_own_url():
    calls: list[int] = []

    def fetch(keys):
        calls.append(len(keys))
        time.sleep(0.05)                 # a request in flight while others arrive
        return {k[:2]: f"url-{k[1]}" for k in keys}

    c = _Coalescer(fetch)
    inode = uuid.uuid4()
    keys = [(inode, uuid.uuid4(), 100) for _ in range(16)]
    got: dict = {}
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, c.get(k))) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == {k: f"url-{k[1]}" for k in keys}
    assert sum(calls) == 16 and len(calls) < 16, calls


def test_a_refused_blob_fails_alone():
    bad = (uuid.uuid4(), uuid.uuid4(), 5)

    def fetch(keys):
        time.sleep(0.02)
        if bad in keys:
            raise ServerError(409, "exists", "blob already stored")
        return {k[:2]: "ok" for k in keys}

    c = _Coalescer(fetch)
    keys = [(uuid.uuid4(), uuid.uuid4(), 5) for _ in range(6)] + [bad]
    results: dict = {}

    def call(k):
        try:
            results[k] = c.get(k)
        except ServerError as exc:
            results[k] = exc.code

    threads = [threading.Thread(target=call, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results[bad] == "exists"
    assert all(results[k] == "ok" for k in keys if k != bad)


def test_more_waiters_than_a_batch_holds_all_get_served():
    def fetch(keys):
        assert len(keys) <= 64
        time.sleep(0.01)
        return {k[:2]: "u" for k in keys}

    c = _Coalescer(fetch)
    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get((uuid.uuid4(), uuid.uuid4(), 1))))
               for _ in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out == ["u"] * 150


def test_a_single_caller_is_one_request():
    calls = []
    c = _Coalescer(lambda keys: calls.append(keys) or {k[:2]: "u" for k in keys})
    assert c.get((uuid.uuid4(), uuid.uuid4(), 3)) == "u"
    assert len(calls) == 1
