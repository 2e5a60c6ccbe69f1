"""FastAPI dependencies giving routers the settings, metadata store and blob store."""
from __future__ import annotations

from fastapi import Request

from .config import Settings
from .db import MetadataStore
from .storage import BlobStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> MetadataStore:
    return request.app.state.db


def get_store(request: Request) -> BlobStore:
    return request.app.state.store
