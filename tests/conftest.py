"""Shared fixtures: real zkfs servers (``python -m server``) on 127.0.0.1.

* ``make_server(**kw)`` - factory; starts a fresh server per call (own data dir).
* ``server``            - one fresh server for the test (function scope).
* ``shared_server``     - one server per test module, for tests that do not care
                          about server-wide state (use unique usernames).

Every process started here is terminated by its PID (its whole process group,
so ``--workers`` children go too) at teardown, even when the test fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1"
if str(REPO) not in sys.path:      # `server` and `zkfs` importable however pytest is started
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``python -m server`` subprocess bound to one port and one data dir.

    ``url`` is the base (``http://127.0.0.1:PORT``; the API is under ``/api/v1``).
    ``start()`` (re)starts it on the same port/data dir, ``stop()`` sends SIGTERM
    and waits, ``kill()`` sends SIGKILL. Output goes to ``log_path``.
    """

    def __init__(self, data_dir: Path, *, quota_bytes: int | None = None, workers: int = 1,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = self.url + API
        self.log_path = self.data_dir / "server.log"
        self.quota_bytes = quota_bytes
        self.workers = workers
        self.env = dict(env or {})
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def args(self) -> list[str]:
        a = [sys.executable, "-m", "server", "--data-dir", str(self.data_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
             "--log-level", "info"]
        if self.quota_bytes is not None:
            a += ["--quota-bytes", str(self.quota_bytes)]
        return a + self.extra_args

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args(), cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.api + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)        # our own session: pgid == pid
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._signal_group(signal.SIGKILL)   # stray workers, if any
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:   # pragma: no cover
            pass

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=kw.pop("timeout", 30), **kw)


@pytest.fixture
def make_server(tmp_path_factory):
    """Factory: ``make_server(quota_bytes=None, workers=1, env={...}, extra_args=[...])``
    starts a server with a fresh data dir and returns the running ServerProcess."""
    started: list[ServerProcess] = []

    def factory(**kw) -> ServerProcess:
        srv = ServerProcess(tmp_path_factory.mktemp("zkfs-server"), **kw)
        started.append(srv)
        return srv.start()

    yield factory
    for srv in started:
        srv.stop()


@pytest.fixture
def server(request, make_server) -> ServerProcess:
    """A fresh server (own data dir) for this test only. Parametrize it indirectly
    with a dict of ``make_server`` keyword arguments to customise it, e.g.
    ``@pytest.mark.parametrize("server", [{"quota_bytes": 10_000}], indirect=True)``."""
    return make_server(**getattr(request, "param", {}))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server shared by a test module (tests must use unique usernames and must
    not depend on server-wide state such as login throttling per address)."""
    srv = ServerProcess(tmp_path_factory.mktemp("zkfs-shared"))
    try:
        yield srv.start()
    finally:
        srv.stop()


# Client machines and FUSE mounts (see harness.py); the lying proxy (lying_proxy.py).
from harness import account, make_machine, make_mount  # noqa: E402,F401
from lying_proxy import lying_proxy  # noqa: E402,F401
