"""Application factory: ``uvicorn --factory server.app:create_app``.

Routers live under ``/api/v1``; the metadata store, blob store and settings hang
off ``app.state`` and reach endpoints through the dependencies in
:mod:`server.deps`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from . import auth, errors, maintenance
from .config import CLEANUP_INTERVAL, Settings
from .db import MetadataStore
from .linklimit import LinkLimiter
from .linkstore import LinkStore
from .models import HealthResponse
from .routers import accounts, blobs, fs, keys, links, public_links, shares
from .sqldb import open_database
from .storage import open_blob_store

log = logging.getLogger("zkfs.server")

API_PREFIX = "/api/v1"
SKIP_STARTUP_ENV = "ZKFS_STARTUP_DONE"

# JSON bodies are refused above these sizes before anything reads them. An ops
# batch's largest real parts: one manifest of a ~150 GiB file (8 MiB of base64),
# small files' inline chunks (64 KiB each) and attribute changes.
MAX_OPS_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_BYTES = 1024 * 1024


async def _periodic_cleanup(app: FastAPI) -> None:
    while True:
        await asyncio.sleep(CLEANUP_INTERVAL)
        try:
            await run_in_threadpool(maintenance.expire, app.state.db, app.state.store)
        except Exception:   # pragma: no cover - keep the loop alive
            log.exception("periodic cleanup failed")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    if os.environ.get(SKIP_STARTUP_ENV) != "1":
        await run_in_threadpool(maintenance.startup, app.state.db, app.state.store)
    task = asyncio.create_task(_periodic_cleanup(app))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        app.state.db.close()


def open_stores(settings: Settings) -> tuple[MetadataStore, "object"]:
    """The metadata store (schema checked) and the blob store the settings name."""
    from .migrations import check
    store = open_blob_store(settings.blobs_url)
    db = open_database(settings.database_url)
    check(db, upgrade=db.kind == "sqlite", legacy_keys=getattr(store, "legacy_key", None))
    return MetadataStore(db, settings.quota_bytes), store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = (settings or Settings.from_env()).with_secret()
    auth.dummy_hash()      # computed up front so the first unknown-user login is not faster
    db, store = open_stores(settings)

    # redirect_slashes off: its 307 is built from the Host header (an open redirect).
    app = FastAPI(title="zkfs", version="1", lifespan=_lifespan, redoc_url=None, redirect_slashes=False,
                  description="Zero-knowledge storage API: every stored value is opaque "
                              "ciphertext. Semantics: docs/API.md.")
    app.state.settings = settings
    app.state.db = db
    app.state.store = store
    app.state.links = LinkStore(db)
    app.state.link_limiter = LinkLimiter(settings.link_opens_per_minute, settings.link_fetches_per_minute)
    errors.install(app)
    app.add_middleware(errors.BodyLimitMiddleware, default=MAX_JSON_BYTES,
                       limits={f"{API_PREFIX}/fs/ops": MAX_OPS_JSON_BYTES},
                       exempt_prefix=f"{API_PREFIX}/blobs/")

    # Routers are included flat and the busiest first: a request is matched against
    # every route before its own, through each level of nesting (a sixth of the
    # server's time per chunk request when blobs came last under a nested router).
    for router in (blobs.router, fs.router, keys.router, accounts.router, links.router, shares.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(public_links.router)      # /s/<id>: links for anyone, no account

    @app.get(f"{API_PREFIX}/health", response_model=HealthResponse, tags=["health"])
    def health():
        return HealthResponse()

    return app
