"""FastAPI dependencies giving routers the settings, metadata store and blob store.

They are ``async def`` because FastAPI runs a plain ``def`` dependency on the
threadpool: a hop per dependency per request, for a field read."""
from __future__ import annotations

from fastapi import Request

from .config import Settings
from .db import MetadataStore
from .linklimit import LinkLimiter
from .linkstore import LinkStore
from .storage import BlobStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> MetadataStore:
    return request.app.state.db


async def get_store(request: Request) -> BlobStore:
    return request.app.state.store


async def get_links(request: Request) -> LinkStore:
    return request.app.state.links


async def get_link_limiter(request: Request) -> LinkLimiter:
    return request.app.state.link_limiter
