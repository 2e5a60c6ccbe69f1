"""Byte-counting TCP relays on 127.0.0.1 between each networked client and its server.

The networked systems' clients talk to the relay, the relay to the real server, so the
harness knows exactly how many bytes went client->server ("up") and server->client
("down") during any interval, independent of how the server reads its own files.
``CountingProxy`` relays at loopback speed (zero-copy with splice(2)); ``NetemRelay``
(``--wan``) runs tests/netem.py's link emulator instead: each direction delayed by half
the round trip and capped at a bandwidth, and the link can be cut.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .util import REG

TESTS = Path(__file__).resolve().parents[2] / "tests"

F_SETPIPE_SZ = 1031
CHUNK = 1 << 20
HAVE_SPLICE = hasattr(os, "splice")


class CountingProxy:
    """The relay runs in a process of its own: in the harness's process its threads
    waited for the harness's GIL on every hop and added ~0.6 ms to each request."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._up = ctx.Value("q", 0)
        self._down = ctx.Value("q", 0)
        ready, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_relay, name="zkbench-relay", daemon=True,
                                 args=((target_host, target_port), self._up, self._down, child_end))
        self._proc.start()
        child_end.close()
        if not ready.poll(30):
            self._proc.terminate()
            raise RuntimeError("the counting relay did not start")
        self.port = ready.recv()
        self._reg = REG.add_proc(self._proc.pid, "counting relay")

    def counters(self) -> tuple[int, int]:
        return self._up.value, self._down.value

    def close(self) -> None:
        self._proc.terminate()
        self._proc.join(10)
        REG.drop_proc(self._reg)


class NetemRelay:
    """tests/netem.py's ``NetemProxy`` in a process of its own (for the same GIL reason
    as ``CountingProxy``), its byte counts copied out every 10 ms; ``set_down`` cuts the
    link (open connections dropped, new ones refused) or brings it back."""

    def __init__(self, target_port: int, rtt: float, mbit: float | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._up = ctx.Value("q", 0)
        self._down = ctx.Value("q", 0)
        self._cut = ctx.Value("b", 0)
        ready, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_netem, name="zkbench-netem", daemon=True,
                                 args=(target_port, rtt, mbit, self._up, self._down, self._cut,
                                       child_end))
        self._proc.start()
        child_end.close()
        if not ready.poll(30):
            self._proc.terminate()
            raise RuntimeError("the netem relay did not start")
        self.port = ready.recv()
        self._reg = REG.add_proc(self._proc.pid, "netem relay")

    def counters(self) -> tuple[int, int]:
        time.sleep(0.03)  # let the child publish its latest counts
        return self._up.value, self._down.value

    def set_down(self, down: bool) -> None:
        self._cut.value = int(down)
        time.sleep(0.05)

    close = CountingProxy.close


def _netem(target_port, rtt, mbit, up, down, cut, ready) -> None:
    sys.path.insert(0, str(TESTS))
    from netem import NetemProxy
    proxy = NetemProxy(target_port, rtt=rtt, mbit=mbit).start()
    ready.send(proxy.port)
    ready.close()
    is_down = False
    while True:
        time.sleep(0.01)
        up.value, down.value = proxy.bytes["up"], proxy.bytes["down"]
        if bool(cut.value) != is_down:
            is_down = bool(cut.value)
            proxy.set_down(is_down)


def make_relay(target_port: int, opts):
    """The relay the options ask for between a client and its server, or None."""
    if getattr(opts, "wan", False):
        return NetemRelay(target_port, opts.rtt_ms / 1000, opts.mbit or None)
    return None if opts.no_proxy else CountingProxy(target_port)


def _relay(target, up, down, ready) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(256)
    ready.send(lsock.getsockname()[1])
    ready.close()
    counters = {"up": up, "down": down}
    while True:
        c, _ = lsock.accept()
        try:
            s = socket.create_connection(target, timeout=10)
            s.settimeout(None)
        except OSError:
            c.close()
            continue
        for x in (c, s):
            x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = {"open": 2, "lock": threading.Lock()}
        threading.Thread(target=_pump, args=(c, s, counters["up"], state), daemon=True).start()
        threading.Thread(target=_pump, args=(s, c, counters["down"], state), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket, counter, state) -> None:
    try:
        if HAVE_SPLICE:
            r, w = os.pipe()
            try:
                try:
                    fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
                except OSError:
                    pass
                sfd, dfd = src.fileno(), dst.fileno()
                while True:
                    n = os.splice(sfd, w, CHUNK)
                    if n == 0:
                        break
                    left = n
                    while left:
                        left -= os.splice(r, dfd, left)
                    _add(counter, n)
            finally:
                os.close(r)
                os.close(w)
        else:
            while True:
                b = src.recv(CHUNK)
                if not b:
                    break
                dst.sendall(b)
                _add(counter, len(b))
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    with state["lock"]:
        state["open"] -= 1
        done = state["open"] == 0
    if done:      # (if the peer vanished, the other direction may never see EOF)
        for x in (src, dst):
            try:
                x.close()
            except OSError:
                pass


def _add(counter, n: int) -> None:
    with counter.get_lock():
        counter.value += n
