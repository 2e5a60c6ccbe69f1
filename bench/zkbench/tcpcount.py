"""A byte-counting TCP relay on 127.0.0.1 (zero-copy with splice(2)).

The networked systems' clients talk to the relay, the relay to the real server, so the
harness knows exactly how many bytes went client->server ("up") and server->client
("down") during any interval, independent of how the server reads its own files.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import os
import socket
import threading

from .util import REG

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
