"""Shared fixtures: real zkfs servers (``python -m server``) on 127.0.0.1.

* ``make_server(**kw)`` - factory; starts a fresh server per call (own data dir).
* ``server``            - one fresh server for the test (function scope).
* ``shared_server``     - one server per test module, for tests that do not care
                          about server-wide state (use unique usernames).

Servers run on sqlite + a local folder unless the test is marked
``@pytest.mark.backends``: then it runs twice, also on PostgreSQL + S3
(``backend`` is "sqlite" or "postgres"; see backends.py for the real processes).

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
import uuid
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
                 port: int | None = None, database_url: str | None = None,
                 blobs_url: str | None = None, repo: Path = REPO) -> None:
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
        self.database_url = database_url          # None: sqlite in data_dir
        self.blobs_url = blobs_url                # None: data_dir/storage
        self.repo = Path(repo)                    # whose server code runs (benchmarks compare)
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
        if self.database_url:
            a += ["--database", self.database_url]
        if self.blobs_url:
            a += ["--blobs", self.blobs_url]
        return a + self.extra_args

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        # Tests register many accounts from 127.0.0.1: the per-address registration
        # throttle is tested on its own (a test sets a small value in ``env``).
        env = {**os.environ, "ZKFS_REGISTRATIONS_PER_HOUR": "1000000", **self.env}
        env["PYTHONPATH"] = str(self.repo) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args(), cwd=self.repo, env=env, stdout=log,
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

    def metadata(self):
        """The server's metadata store, opened directly (out of band)."""
        from server.db import MetadataStore
        from server.sqldb import open_database
        return MetadataStore(open_database(self.database_url or str(self.data_dir / "app.db")))

    def query(self, sql: str, *args) -> list[tuple]:
        """Run one SQL statement (``?`` placeholders) on the server's database, out of band."""
        from server.sqldb import open_database
        db = open_database(self.database_url or str(self.data_dir / "app.db"))
        try:
            return db.transaction(lambda tx: tx.all(sql, args) if sql.lstrip().upper().startswith(
                ("SELECT", "WITH")) or " RETURNING " in sql.upper() else tx.run(sql, args) and [])
        finally:
            db.close()

    def blob_store(self):
        from server.storage import open_blob_store
        return open_blob_store(self.blobs_url or str(self.data_dir / "storage"))

    def stored_objects(self, user=None) -> set[str]:
        """Every object the blob store holds (of one user): ``user/inode/blob`` paths,
        temp files included for a local folder (nothing partial may stay behind)."""
        if self.blobs_url:
            return {f"{u}/{i}/{b}" for u, i, b in self.blob_store().list_blobs(user)}
        root = self.data_dir / "storage"
        base = root / str(user) if user else root
        return {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()}

    def read_object(self, user, inode, blob) -> bytes:
        return b"".join(self.blob_store().open_range(user, inode, blob, 0, 1 << 40))

    def write_object(self, user, inode, blob, data: bytes) -> None:
        """Put bytes under a blob's name behind the server's back (a tampering host)."""
        store = self.blob_store()
        staged = store.stage_bytes(user, inode, blob, data)
        staged.commit()

    def secret(self) -> str:
        """The token-signing secret this server was given or made."""
        configured = {**os.environ, **self.env}.get("ZKFS_SECRET_KEY")
        return configured or (self.data_dir / ".env").read_text().split("=", 1)[1].strip()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=kw.pop("timeout", 30), **kw)


BACKENDS = ("sqlite", "postgres")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends: run on sqlite + folder and on PostgreSQL + S3")
    config.addinivalue_line("markers", "slow: a stress, fault or load test of 10 s or more (`./zkfs.sh test` runs "
                                       "them after the quick tier: -m 'not slow', then -m slow)")
    config.addinivalue_line("markers", "sqlite_only: in a `backends` module, about sqlite + folder only")


def pytest_generate_tests(metafunc):
    d = metafunc.definition
    if "backend" in metafunc.fixturenames and d.get_closest_marker("backends") \
            and not d.get_closest_marker("sqlite_only"):
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="session")
def pg_cluster():
    from backends import PostgresCluster
    cluster = PostgresCluster().init().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def s3_endpoint():
    from backends import S3Endpoint
    endpoint = S3Endpoint().start()
    saved = {k: os.environ.get(k) for k in endpoint.env()}
    os.environ.update(endpoint.env())          # for the out-of-band looks of tests (blob_store())
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        endpoint.destroy()


@pytest.fixture(scope="module")
def backend(request) -> str:
    return getattr(request, "param", "sqlite")


TEST_SECRET = "5eed" * 16      # the signing secret nodes sharing a PostgreSQL database are given


def backend_kwargs(request, backend: str) -> dict:
    """``ServerProcess`` arguments putting a fresh server on ``backend``."""
    if backend == "sqlite":
        return {}
    pg, s3 = request.getfixturevalue("pg_cluster"), request.getfixturevalue("s3_endpoint")
    return {"database_url": pg.new_database(), "blobs_url": s3.blobs_url("t" + uuid.uuid4().hex[:10]),
            "env": {**s3.env(), "ZKFS_SECRET_KEY": TEST_SECRET}}


@pytest.fixture
def make_server(request, tmp_path_factory, backend):
    """Factory: ``make_server(quota_bytes=None, workers=1, env={...}, extra_args=[...])``
    starts a server with a fresh data dir (and fresh database and bucket prefix on
    the PostgreSQL backend) and returns the running ServerProcess."""
    started: list[ServerProcess] = []

    def factory(**kw) -> ServerProcess:
        more = backend_kwargs(request, backend)
        kw["env"] = {**more.pop("env", {}), **kw.get("env", {})}
        srv = ServerProcess(tmp_path_factory.mktemp("zkfs-server"), **more, **kw)
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
def shared_server(request, tmp_path_factory, backend):
    """One server shared by a test module (tests must use unique usernames and must
    not depend on server-wide state such as login throttling per address)."""
    more = backend_kwargs(request, backend)
    srv = ServerProcess(tmp_path_factory.mktemp("zkfs-shared"), **more)
    try:
        yield srv.start()
    finally:
        srv.stop()


# Client machines and FUSE mounts (see harness.py); the lying proxy (lying_proxy.py).
from harness import account, make_machine, make_mount  # noqa: E402,F401
from lying_proxy import lying_proxy  # noqa: E402,F401
