"""A byte-counting TCP relay on 127.0.0.1 (zero-copy with splice(2)).

The networked systems' clients talk to the relay, the relay to the real server, so the
harness knows exactly how many bytes went client->server ("up") and server->client
("down") during any interval, independent of how the server reads its own files.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading

F_SETPIPE_SZ = 1031
CHUNK = 1 << 20
HAVE_SPLICE = hasattr(os, "splice")


class CountingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(256)
        self.port = self.lsock.getsockname()[1]
        self.up = 0
        self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept").start()

    def counters(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=10)
                s.settimeout(None)
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.update((c, s))
                self.connections += 1
            state = {"open": 2}
            threading.Thread(target=self._pump, args=(c, s, "up", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "down", state), daemon=True).start()

    def _add(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.up += n
            else:
                self.down += n

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, state) -> None:
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
                        self._add(direction, n)
                finally:
                    os.close(r)
                    os.close(w)
            else:
                while True:
                    b = src.recv(CHUNK)
                    if not b:
                        break
                    dst.sendall(b)
                    self._add(direction, len(b))
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            state["open"] -= 1
            done = state["open"] == 0
        if done:
            for x in (src, dst):
                with self._lock:
                    self._socks.discard(x)
                try:
                    x.close()
                except OSError:
                    pass
        else:
            # the other direction may never see EOF if the peer vanished; don't hang forever
            pass

    def close(self) -> None:
        self._closed = True
        try:
            self.lsock.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                x.close()
            except OSError:
                pass
