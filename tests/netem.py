"""A TCP proxy that makes 127.0.0.1 look like a user's network link (this kernel has
no netem): each direction is delayed by half the round trip and capped at a
bandwidth, and the link can be cut (``down``: open connections are dropped, new
ones refused) and brought back. For the offline tests and for bench/.

    with NetemProxy(port, rtt=0.020, mbit=200) as proxy:
        ... proxy.url ...
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time


class NetemProxy:
    def __init__(self, target_port: int, *, rtt: float = 0.0, mbit: float | None = None,
                 target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.one_way = rtt / 2
        self.rate = mbit * 1e6 / 8 if mbit else None        # bytes per second, each direction
        self.down = False
        self.bytes = {"up": 0, "down": 0}
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._loop.run_forever, name="netem", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "NetemProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "NetemProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock)

    def set_down(self, down: bool) -> None:
        """Cut the link (every connection dropped, new ones refused) or restore it."""
        self.down = down
        if down:
            asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop).result()

    async def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def close(self) -> None:
        async def stop():
            await self._drop_all()
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.down:
            client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        await asyncio.gather(self._pump(client_r, server_w, "up"), self._pump(server_r, client_w, "down"),
                             return_exceptions=True)
        for w in (client_w, server_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Bytes leave the link after their transmission time (the bandwidth) and
        arrive one-way delay later, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        busy_until = 0.0

        async def deliver():
            while True:
                at, data = await queue.get()
                if not data:
                    writer.write_eof() if writer.can_write_eof() else None
                    return
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(64 << 10)
                now = time.monotonic()
                if data:
                    self.bytes[direction] += len(data)
                    if self.rate:
                        busy_until = max(now, busy_until) + len(data) / self.rate
                        # Hold the sender back while the link is busy: TCP's own
                        # flow control then keeps the queue short.
                        if busy_until - now > 0.05:
                            await asyncio.sleep(busy_until - now - 0.05)
                    else:
                        busy_until = now
                await queue.put((max(busy_until, now) + self.one_way, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
