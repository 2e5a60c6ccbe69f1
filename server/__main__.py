"""``python -m server`` / ``zkfs-server``: run the API with uvicorn."""
from __future__ import annotations

import argparse
import copy
import logging
import logging.config
import os
import sys

from .config import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zkfs-server", description="zkfs storage server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None,
                   help="holds app.db, .env and storage/ (default: server/ and ./storage in the repo)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--quota-bytes", type=int, default=None, help="per-user blob quota")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def _log_config(level: str) -> dict:
    """uvicorn's logging config plus the ``zkfs`` loggers (applied in every worker)."""
    from uvicorn.config import LOGGING_CONFIG
    cfg = copy.deepcopy(LOGGING_CONFIG)
    lvl = "DEBUG" if level == "trace" else level.upper()
    cfg["loggers"]["zkfs"] = {"handlers": ["default"], "level": lvl, "propagate": False}
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if argv is None and "MALLOC_ARENA_MAX" not in os.environ:
        # glibc reads this only at start: one arena per thread lets bursts of 19 MiB
        # argon2 hashes and 1 MiB blob buffers pin memory for good (the load test
        # saw 419 MiB for two workers without it).
        os.environ["MALLOC_ARENA_MAX"] = "2"
        os.execv(sys.executable, [sys.executable, "-m", "server", *sys.argv[1:]])
    if args.workers < 1:
        sys.exit("--workers must be >= 1")
    if args.quota_bytes is not None and args.quota_bytes < 0:
        sys.exit("--quota-bytes must be >= 0")
    log_config = _log_config(args.log_level)
    logging.config.dictConfig(log_config)

    settings = Settings.build(args.data_dir, quota_bytes=args.quota_bytes)
    os.environ.update(settings.to_env())        # read by every worker's create_app()

    # One-time preparation in this process, before any worker serves: secret,
    # schema (WAL), temp-file and stale-object cleanup.
    from . import maintenance
    from .app import SKIP_STARTUP_ENV
    from .db import SqliteMetadataStore
    from .storage import LocalBlobStore
    from .config import load_or_create_secret

    load_or_create_secret(settings.env_path)
    db = SqliteMetadataStore(settings.db_path)
    db.init_schema()
    maintenance.startup(db, LocalBlobStore(settings.storage_dir))
    db.close()
    os.environ[SKIP_STARTUP_ENV] = "1"

    import uvicorn
    uvicorn.run("server.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, loop="auto", http="auto",
                timeout_graceful_shutdown=10, server_header=False, log_config=log_config)


if __name__ == "__main__":
    main()
