"""Administration from the server's own machine: ``python -m server migrate`` and
``python -m server users list|add-invite|set-quota|delete``. They work on the
database and blob store directly (no API node needs to run)."""
from __future__ import annotations

import argparse
import datetime
import hashlib
import secrets
import sys

from .config import Settings
from .db import MetadataStore, UserRecord
from .migrations import SchemaError, check, migrate
from .sqldb import open_database
from .storage import open_blob_store


def invite_hash(code: str) -> str:
    return hashlib.sha256(b"zkfs-invite\0" + code.strip().encode()).hexdigest()


def _find(db: MetadataStore, username: str) -> UserRecord:
    user = db.get_user_by_name(username)
    if user is None:
        raise LookupError(f"no account named {username!r}")
    return user


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        store = open_blob_store(settings.blobs_url)
        database = open_database(settings.database_url)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            start, end = migrate(database, getattr(store, "legacy_key", None))
            print(f"schema: version {start} -> {end}" if start != end else f"schema: version {end}, up to date")
            return 0
        check(database, upgrade=False)
        db = MetadataStore(database, settings.quota_bytes)
        if args.action == "list":
            print(f"{'username':<24} {'used bytes':>16} {'quota':>16}  created")
            for user, used, created in db.list_users():
                when = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
                print(f"{user.username:<24} {used:>16,} {_size(db.quota_of(user)):>16}  {when}")
        elif args.action == "add-invite":
            code = secrets.token_urlsafe(18)
            db.add_invite(invite_hash(code))
            print(code)
        elif args.action == "set-quota":
            quota = None if args.bytes.lower() == "none" else int(args.bytes)
            if quota is not None and quota < 0:
                raise ValueError("the quota must be >= 0 bytes, or none")
            db.set_quota(_find(db, args.username).id, quota)
            print(f"{args.username}: quota {_size(quota) if quota is not None else 'the server default'}")
        elif args.action == "delete":
            user = _find(db, args.username)
            db.delete_user(user.id)
            store.delete_user(user.id)
            print(f"deleted {user.username} and all its files")
        return 0
    except (SchemaError, LookupError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"error: {args.bytes!r} is not a number of bytes (or none)", file=sys.stderr)
        return 2
    finally:
        database.close()
