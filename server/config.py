"""Server settings and the signing secret.

Settings travel to uvicorn worker processes through ``ZKFS_*`` environment
variables (see :meth:`Settings.to_env` / :meth:`Settings.from_env`). The JWT
signing secret is never put in the environment: every process reads it from
``.env`` (``ZKFS_SECRET_KEY=<64 hex>``), which is created on first start with
mode 0600, race-free across workers.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent

DEFAULT_TOKEN_TTL = 12 * 3600
MAX_BLOB_BYTES = 64 * 1024 * 1024
MAX_JSON_BYTES = 192 * 1024 * 1024     # ops requests may carry inline blobs + manifests
STAGED_MAX_AGE = 3600                 # staged blobs never committed are dropped after 1 h
ORPHAN_MAX_AGE = 24 * 3600            # kept orphans are dropped after 24 h
CLEANUP_INTERVAL = 3600

LOGIN_WINDOW = 15 * 60
LOGIN_MAX_PER_USER = 5
LOGIN_MAX_PER_ADDR = 20

SECRET_VAR = "ZKFS_SECRET_KEY"
_SECRET_RE = re.compile(rf"^\s*{SECRET_VAR}\s*=\s*([0-9a-fA-F]{{64}})\s*$", re.M)


def _int_env(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else None


@dataclass(frozen=True)
class Settings:
    db_path: Path
    env_path: Path
    storage_dir: Path
    data_dir: Path | None = None
    token_ttl_seconds: int = DEFAULT_TOKEN_TTL
    quota_bytes: int | None = None
    max_blob_bytes: int = MAX_BLOB_BYTES
    secret_key: str = field(default="", repr=False)

    @classmethod
    def build(cls, data_dir: str | os.PathLike | None = None,
              quota_bytes: int | None = None,
              token_ttl_seconds: int | None = None) -> "Settings":
        """Settings for a data dir (``DIR/app.db``, ``DIR/.env``, ``DIR/storage``), or
        the repo defaults (``server/app.db``, ``server/.env``, ``storage/``)."""
        if token_ttl_seconds is None:
            token_ttl_seconds = _int_env("ZKFS_TOKEN_TTL_SECONDS") or DEFAULT_TOKEN_TTL
        if data_dir is not None:
            d = Path(data_dir).resolve()
            return cls(db_path=d / "app.db", env_path=d / ".env", storage_dir=d / "storage",
                       data_dir=d, token_ttl_seconds=token_ttl_seconds, quota_bytes=quota_bytes)
        return cls(db_path=PACKAGE_DIR / "app.db", env_path=PACKAGE_DIR / ".env",
                   storage_dir=REPO_DIR / "storage", token_ttl_seconds=token_ttl_seconds,
                   quota_bytes=quota_bytes)

    @classmethod
    def from_env(cls) -> "Settings":
        base = cls.build(os.environ.get("ZKFS_DATA_DIR") or None,
                         quota_bytes=_int_env("ZKFS_QUOTA_BYTES"))
        env = os.environ
        return cls(
            db_path=Path(env.get("ZKFS_DB_PATH") or base.db_path),
            env_path=Path(env.get("ZKFS_ENV_PATH") or base.env_path),
            storage_dir=Path(env.get("ZKFS_STORAGE_DIR") or base.storage_dir),
            data_dir=base.data_dir,
            token_ttl_seconds=base.token_ttl_seconds,
            quota_bytes=base.quota_bytes,
        )

    def to_env(self) -> dict[str, str]:
        """Environment for worker processes (no secret in here)."""
        env = {
            "ZKFS_DB_PATH": str(self.db_path),
            "ZKFS_ENV_PATH": str(self.env_path),
            "ZKFS_STORAGE_DIR": str(self.storage_dir),
            "ZKFS_TOKEN_TTL_SECONDS": str(self.token_ttl_seconds),
            "ZKFS_QUOTA_BYTES": "" if self.quota_bytes is None else str(self.quota_bytes),
        }
        if self.data_dir is not None:
            env["ZKFS_DATA_DIR"] = str(self.data_dir)
        return env

    def with_secret(self) -> "Settings":
        from dataclasses import replace
        return replace(self, secret_key=load_or_create_secret(self.env_path))


def _read_secret(path: Path) -> str | None:
    try:
        m = _SECRET_RE.search(path.read_text())
    except FileNotFoundError:
        return None
    return m.group(1).lower() if m else None


def load_or_create_secret(path: Path) -> str:
    """Return the signing secret from ``path``, creating the file (0600) if absent.

    Creation uses O_CREAT|O_EXCL so that only one of several concurrently
    starting workers writes it; the others re-read until the value is there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{SECRET_VAR}={secrets.token_hex(32)}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    # Re-read (also when we just wrote it: the file is the single source of truth).
    for _ in range(50):
        value = _read_secret(path)
        if value:
            _tighten(path)
            return value
        time.sleep(0.05)      # another process created it and is still writing
    # The file exists but has no key (e.g. a hand-written .env): append one, locked.
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        value = _read_secret(path)
        if not value:
            value = secrets.token_hex(32)
            os.write(fd, f"\n{SECRET_VAR}={value}\n".encode())
            os.fsync(fd)
        return value
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as e:   # pragma: no cover - not our file
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise
