"""``python -m server`` / ``zkfs-server``: run the API with uvicorn, or administer.

    python -m server [--database URL] [--blobs URL] [--host H] [--port P] ...   serve
    python -m server migrate                      create or upgrade the database schema
    python -m server users list | add-invite | set-quota USER BYTES|none | delete USER
"""
from __future__ import annotations

import argparse
import copy
import logging
import logging.config
import os
import sys

from .config import REGISTRATION_POLICIES, ConfigError, Settings


def _common(p: argparse.ArgumentParser, default) -> None:
    """Where the data is: accepted before and after a subcommand."""
    p.add_argument("--config", dest="config_file", default=default,
                   help="TOML file with database, blobs, secret_key, ... (env ZKFS_CONFIG)")
    p.add_argument("--database", dest="database_url", default=default,
                   help="sqlite:///PATH or postgresql://USER@HOST/DB (env ZKFS_DATABASE_URL; "
                        "default: sqlite in the data dir)")
    p.add_argument("--blobs", dest="blobs_url", default=default,
                   help="a folder or s3://BUCKET/PREFIX?endpoint=URL&region=R (env ZKFS_BLOBS_URL; "
                        "credentials: the AWS environment variables)")
    p.add_argument("--data-dir", default=default,
                   help="holds app.db, .env and storage/ (default: server/ and ./storage in the repo)")
    p.add_argument("--secret-file", default=default,
                   help="file with a ZKFS_SECRET_KEY=<64 hex> line (env ZKFS_SECRET_FILE); every "
                        "node sharing a database needs the same secret")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zkfs-server", description="zkfs storage server")
    _common(p, None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quota-bytes", type=int, default=None,
                   help="default per-account quota (blobs and metadata)")
    p.add_argument("--registration", choices=REGISTRATION_POLICIES, default=None,
                   help="who may create accounts (default: open)")
    p.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=None,
                   metavar="ADDR", help="a load balancer whose X-Forwarded-For is believed (repeat)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    sub = p.add_subparsers(dest="command", metavar="{migrate,users}")
    _common(sub.add_parser("migrate", help="create or upgrade the database schema"), argparse.SUPPRESS)
    users = sub.add_parser("users", help="list and manage accounts")
    _common(users, argparse.SUPPRESS)
    usub = users.add_subparsers(dest="action", required=True)
    usub.add_parser("list", help="every account with its usage and quota")
    usub.add_parser("add-invite", help="print a new single-use invite code (--registration invite)")
    q = usub.add_parser("set-quota", help="an account's own quota in bytes, or 'none' for the default")
    q.add_argument("username")
    q.add_argument("bytes")
    d = usub.add_parser("delete", help="delete an account with all its files")
    d.add_argument("username")
    for action in usub.choices.values():
        _common(action, argparse.SUPPRESS)
    return p


def _log_config(level: str) -> dict:
    """uvicorn's logging config plus the ``zkfs`` loggers (applied in every worker)."""
    from uvicorn.config import LOGGING_CONFIG
    cfg = copy.deepcopy(LOGGING_CONFIG)
    lvl = "DEBUG" if level == "trace" else level.upper()
    cfg["loggers"]["zkfs"] = {"handlers": ["default"], "level": lvl, "propagate": False}
    return cfg


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("config_file", "database_url", "blobs_url", "data_dir", "secret_file", "quota_bytes",
            "registration", "trusted_proxies")
    return Settings.resolve({k: getattr(args, k, None) for k in keys})


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if argv is None and args.command is None and "MALLOC_ARENA_MAX" not in os.environ:
        # glibc reads this only at start: one arena per thread lets bursts of 19 MiB
        # argon2 hashes and 1 MiB blob buffers pin memory for good (the load test
        # saw 419 MiB for two workers without it).
        os.environ["MALLOC_ARENA_MAX"] = "2"
        os.execv(sys.executable, [sys.executable, "-m", "server", *sys.argv[1:]])
    try:
        settings = _settings(args)
        if args.command is not None:
            from .admin import run
            sys.exit(run(args, settings))
        if args.workers < 1:
            raise ConfigError("--workers must be >= 1")
        settings = settings.with_secret()
    except ConfigError as e:
        sys.exit(f"error: {e}")
    log_config = _log_config(args.log_level)
    logging.config.dictConfig(log_config)
    os.environ.update(settings.to_env())        # read by every worker's create_app()

    # One-time preparation in this process, before any worker serves: secret,
    # schema, temp-file and stale-object cleanup.
    from . import maintenance
    from .app import SKIP_STARTUP_ENV, open_stores
    from .migrations import SchemaError

    try:
        db, store = open_stores(settings)
    except (SchemaError, ValueError) as e:
        sys.exit(f"error: {e}")
    logging.getLogger("zkfs.server").info("metadata in %s, blobs in %s", db.db.describe(), store.describe())
    maintenance.startup(db, store)
    db.close()
    os.environ[SKIP_STARTUP_ENV] = "1"

    import uvicorn
    # X-Forwarded-For is believed only from the configured proxies (uvicorn's
    # default trusts any loopback caller, who could then pick its own address).
    uvicorn.run("server.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, loop="auto", http="auto",
                timeout_graceful_shutdown=10, server_header=False, log_config=log_config,
                proxy_headers=bool(settings.trusted_proxies),
                forwarded_allow_ips=list(settings.trusted_proxies) or None)


if __name__ == "__main__":
    main()
