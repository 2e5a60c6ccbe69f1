"""Server settings, one way for all of them.

Each setting comes from, in this order: the command line (``--database URL``),
the environment (``ZKFS_DATABASE_URL``), a TOML config file (``--config FILE`` or
``ZKFS_CONFIG``; keys as in :data:`FILE_KEYS`), then the default: sqlite in
``app.db`` and blobs in a local ``storage/`` folder, as an embedded server has
always had. S3 credentials follow the AWS conventions (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...), read by the AWS SDK itself.

Settings travel to uvicorn worker processes through ``ZKFS_*`` environment
variables (:meth:`Settings.to_env` / :meth:`Settings.from_env`). The JWT signing
secret is configured (``ZKFS_SECRET_KEY`` / ``secret_key`` / ``--secret-file``),
which every node sharing a database must do; an embedded server with none keeps
one in ``.env`` (``ZKFS_SECRET_KEY=<64 hex>``), created on first start with mode
0600, race-free across workers, and never put in the environment.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent

DEFAULT_TOKEN_TTL = 12 * 3600
MAX_BLOB_BYTES = 64 * 1024 * 1024
# Staged blobs never committed are dropped after a week: a mount's write-back journal may
# hold the commit of a file's staged chunks that long (offline, or stopped with changes).
STAGED_MAX_AGE = 7 * 24 * 3600
BATCH_RESULT_MAX_AGE = 7 * 24 * 3600  # answers kept for batches sent again (POST /fs/ops batch_id)
ORPHAN_MAX_AGE = 24 * 3600            # kept orphans are dropped after 24 h
CLEANUP_INTERVAL = 3600
DIRECT_URL_TTL = 300                  # presigned blob URLs (at most): well under STAGED_MAX_AGE

# Login throttling (server/throttle.py): failures counted in a sliding window per
# account and address, per account from anywhere (not for known devices), and per
# address whatever the account.
LOGIN_WINDOW = 15 * 60
LOGIN_MAX_PER_USER_ADDR = 5
LOGIN_MAX_PER_USER = 100
LOGIN_MAX_PER_ADDR = 20
REGISTRATION_WINDOW = 3600
REGISTRATIONS_PER_ADDR = 20           # per hour and address (ZKFS_REGISTRATIONS_PER_HOUR)
# Links for anyone (server/linklimit.py), per client address and API node: openings (the
# page, the record) and answers for unknown or ended links, and requests for a link's
# manifest and chunks (1 MiB each: 6,000 a minute is 100 MiB/s).
LINK_OPENS_PER_MINUTE = 60
LINK_FETCHES_PER_MINUTE = 6000

SECRET_VAR = "ZKFS_SECRET_KEY"
_SECRET_RE = re.compile(rf"^\s*{SECRET_VAR}\s*=\s*([0-9a-fA-F]{{64}})\s*$", re.M)

REGISTRATION_POLICIES = ("open", "invite", "closed")

# setting -> (environment variable, config file key)
_SOURCES = {
    "database_url": ("ZKFS_DATABASE_URL", "database"),
    "blobs_url": ("ZKFS_BLOBS_URL", "blobs"),
    "quota_bytes": ("ZKFS_QUOTA_BYTES", "quota_bytes"),
    "token_ttl_seconds": ("ZKFS_TOKEN_TTL_SECONDS", "token_ttl_seconds"),
    "registration": ("ZKFS_REGISTRATION", "registration"),
    "trusted_proxies": ("ZKFS_TRUSTED_PROXIES", "trusted_proxies"),
    "secret_key": (SECRET_VAR, "secret_key"),
    "secret_file": ("ZKFS_SECRET_FILE", "secret_file"),
    "registrations_per_hour": ("ZKFS_REGISTRATIONS_PER_HOUR", "registrations_per_hour"),
    "direct_url_ttl": ("ZKFS_DIRECT_URL_TTL", "direct_url_ttl"),
    "link_opens_per_minute": ("ZKFS_LINK_OPENS_PER_MINUTE", "link_opens_per_minute"),
    "link_fetches_per_minute": ("ZKFS_LINK_FETCHES_PER_MINUTE", "link_fetches_per_minute"),
}
FILE_KEYS = sorted(key for _env, key in _SOURCES.values())


class ConfigError(Exception):
    """A setting that cannot work: said in one line."""


def _int(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None
    if n < 0:
        raise ConfigError(f"{name} must be >= 0")
    return n


def _proxies(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(p).strip() for p in items if str(p).strip())


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)} "
                          f"(known: {', '.join(FILE_KEYS)})")
    return data


def _redacted(url: str) -> str:
    """A URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(":" + parts.password + "@", ":***@", 1)
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str
    blobs_url: str
    env_path: Path                     # where an embedded server keeps its own secret
    data_dir: Path | None = None
    token_ttl_seconds: int = DEFAULT_TOKEN_TTL
    quota_bytes: int | None = None     # default per-account quota (accounts may have their own)
    max_blob_bytes: int = MAX_BLOB_BYTES
    direct_url_ttl: int = DIRECT_URL_TTL
    registration: str = "open"
    registrations_per_hour: int = REGISTRATIONS_PER_ADDR
    link_opens_per_minute: int = LINK_OPENS_PER_MINUTE
    link_fetches_per_minute: int = LINK_FETCHES_PER_MINUTE
    trusted_proxies: tuple[str, ...] = ()
    config_file: str | None = None
    secret_file: str | None = None
    secret_key: str = field(default="", repr=False)

    @property
    def shared_database(self) -> bool:
        """Several nodes may serve this database (anything but sqlite)."""
        return urlsplit(self.database_url).scheme not in ("", "sqlite")

    @classmethod
    def resolve(cls, cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
                ) -> "Settings":
        """Settings from the command line (``cli``: setting -> value or None), the
        environment, the config file, then the defaults."""
        cli = {k: v for k, v in (cli or {}).items() if v is not None}
        env = os.environ if env is None else env
        config_file = cli.get("config_file") or env.get("ZKFS_CONFIG") or None
        file = read_config_file(config_file) if config_file else {}

        def pick(name: str) -> Any:
            if name in cli:
                return cli[name]
            var, key = _SOURCES[name]
            if env.get(var, "") != "":
                return env[var]
            return file.get(key)

        data_dir = cli.get("data_dir") or env.get("ZKFS_DATA_DIR") or None
        if data_dir:
            d = Path(data_dir).resolve()
            default_db, env_path, default_blobs = d / "app.db", d / ".env", d / "storage"
        else:
            d = None
            default_db, env_path, default_blobs = PACKAGE_DIR / "app.db", PACKAGE_DIR / ".env", REPO_DIR / "storage"
        registration = pick("registration") or "open"
        if registration not in REGISTRATION_POLICIES:
            raise ConfigError(f"registration must be one of {', '.join(REGISTRATION_POLICIES)}, "
                              f"not {registration!r}")
        database_url = str(pick("database_url") or "sqlite://" + str(default_db))
        blobs_url = str(pick("blobs_url") or default_blobs)
        if urlsplit(database_url).scheme not in ("", "sqlite", "postgresql", "postgres"):
            raise ConfigError(f"unsupported database URL {_redacted(database_url)} "
                              "(sqlite:///PATH or postgresql://USER@HOST/DB)")
        if urlsplit(blobs_url).scheme not in ("", "file", "s3"):
            raise ConfigError(f"unsupported blob store URL {_redacted(blobs_url)} "
                              "(a folder, file:///PATH or s3://BUCKET/PREFIX)")
        secret = (pick("secret_key") or "").strip().lower()
        if secret and not re.fullmatch(r"[0-9a-f]{64}", secret):
            raise ConfigError("the secret key must be 64 hex digits (e.g. `openssl rand -hex 32`)")
        settings = cls(
            database_url=database_url,
            blobs_url=blobs_url,
            env_path=Path(env.get("ZKFS_ENV_PATH") or env_path),
            data_dir=d,
            token_ttl_seconds=_int("token_ttl_seconds", pick("token_ttl_seconds")) or DEFAULT_TOKEN_TTL,
            quota_bytes=_int("quota_bytes", pick("quota_bytes")),
            registration=registration,
            registrations_per_hour=_int("registrations_per_hour", pick("registrations_per_hour"))
            or REGISTRATIONS_PER_ADDR,
            link_opens_per_minute=_int("link_opens_per_minute", pick("link_opens_per_minute"))
            or LINK_OPENS_PER_MINUTE,
            link_fetches_per_minute=_int("link_fetches_per_minute", pick("link_fetches_per_minute"))
            or LINK_FETCHES_PER_MINUTE,
            direct_url_ttl=min(_int("direct_url_ttl", pick("direct_url_ttl")) or DIRECT_URL_TTL, DIRECT_URL_TTL),
            trusted_proxies=_proxies(pick("trusted_proxies")),
            config_file=str(config_file) if config_file else None,
            secret_file=pick("secret_file") or None,
            secret_key=secret,
        )
        return settings

    @classmethod
    def from_env(cls) -> "Settings":
        return cls.resolve()

    def to_env(self) -> dict[str, str]:
        """Environment for worker processes (a secret only if it came from there)."""
        env = {
            "ZKFS_DATABASE_URL": self.database_url,
            "ZKFS_BLOBS_URL": self.blobs_url,
            "ZKFS_ENV_PATH": str(self.env_path),
            "ZKFS_TOKEN_TTL_SECONDS": str(self.token_ttl_seconds),
            "ZKFS_QUOTA_BYTES": "" if self.quota_bytes is None else str(self.quota_bytes),
            "ZKFS_REGISTRATION": self.registration,
            "ZKFS_REGISTRATIONS_PER_HOUR": str(self.registrations_per_hour),
            "ZKFS_DIRECT_URL_TTL": str(self.direct_url_ttl),
            "ZKFS_LINK_OPENS_PER_MINUTE": str(self.link_opens_per_minute),
            "ZKFS_LINK_FETCHES_PER_MINUTE": str(self.link_fetches_per_minute),
            "ZKFS_TRUSTED_PROXIES": ",".join(self.trusted_proxies),
        }
        if self.data_dir is not None:
            env["ZKFS_DATA_DIR"] = str(self.data_dir)
        if self.config_file:
            env["ZKFS_CONFIG"] = self.config_file
        if self.secret_file:
            env["ZKFS_SECRET_FILE"] = self.secret_file
        return env

    def with_secret(self) -> "Settings":
        """The signing secret: configured, from ``secret_file``, or (one node only)
        the embedded server's own ``.env``."""
        if self.secret_key:
            return self
        if self.secret_file:
            value = _read_secret(Path(self.secret_file))
            if value is None:
                raise ConfigError(f"{self.secret_file} has no {SECRET_VAR}=<64 hex digits> line")
            return replace(self, secret_key=value)
        if self.shared_database:
            raise ConfigError("with a shared database every node must sign tokens with the same secret: "
                              f"set {SECRET_VAR} (64 hex digits), secret_key in the config file, "
                              "or --secret-file")
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
