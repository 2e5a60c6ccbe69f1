"""HAProxy (Debian's package) in front of several zkfs API nodes on 127.0.0.1,
started and stopped by its PID. ``url``: round robin over the nodes.
``node_urls[i]``: node *i* first, the others as its backups (a client "on node
i" that fails over). Health-checked: a node that dies is taken out within a
second; a request that cannot connect to one node is sent to another."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from backends import free_port


class LoadBalancer:
    def __init__(self, ports: list[int], root: Path) -> None:
        self.ports = ports
        self.root = Path(root)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.node_ports = [free_port() for _ in ports]
        self.node_urls = [f"http://127.0.0.1:{p}" for p in self.node_ports]
        self.proc: subprocess.Popen | None = None

    def _servers(self, first: int | None = None) -> str:
        return "\n".join(f"    server node{i} 127.0.0.1:{p} check inter 300ms fall 2 rise 2"
                         + (" backup" if first is not None and i != first else "")
                         for i, p in enumerate(self.ports))

    def config(self) -> str:
        per_node = "".join(f"""
frontend node{i}
    bind 127.0.0.1:{port}
    default_backend node{i}_first
backend node{i}_first
    option httpchk GET /api/v1/health
    http-check expect status 200
{self._servers(i)}
""" for i, port in enumerate(self.node_ports))
        return f"""global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    retries 3
    option redispatch
    option forwardfor
frontend zkfs
    bind 127.0.0.1:{self.port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /api/v1/health
    http-check expect status 200
{self._servers()}
{per_node}"""

    def start(self) -> "LoadBalancer":
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(haproxy):
            raise RuntimeError("HAProxy is not installed (Debian: apt-get install haproxy)")
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(self.config())
        log = open(self.root / "haproxy.log", "ab")
        try:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {(self.root / 'haproxy.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("haproxy did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
