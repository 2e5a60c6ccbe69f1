"""Local client state in $ZKFS_HOME (default ~/.zkfs), every file mode 0600.

- config.json        server URL, download directory, token, username (the seed's layout)
- keys.json          user id, auth key and key-encryption key (what `login` saves)
- uploaded_file.json remote path -> {uuid, sha256, size}: makes re-uploads no-ops
- versions.db        highest version seen per inode: detects a server rolling files back
"""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

from .errors import NotLoggedIn, TamperedError

DEFAULT_SERVER = "http://127.0.0.1:8000"


def home() -> Path:
    path = Path(os.environ.get("ZKFS_HOME") or Path.home() / ".zkfs")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError:
        raise NotLoggedIn(f"{path} is corrupt; run `client.py login` again") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LocalState:
    def __init__(self, root: Path | None = None):
        self.root = root or home()
        self.config_path = self.root / "config.json"
        self.keys_path = self.root / "keys.json"
        self.uploads_path = self.root / "uploaded_file.json"

    # config.json
    def config(self) -> dict:
        cfg = _read_json(self.config_path, {})
        cfg.setdefault("server", DEFAULT_SERVER)
        cfg.setdefault("download_dir", str(Path.cwd()))
        return cfg

    def save_config(self, **changes) -> dict:
        cfg = self.config() | changes
        _write_json(self.config_path, cfg)
        return cfg

    # keys.json
    def save_keys(self, *, user_id: UUID, username: str, auth_key: bytes, kek: bytes) -> None:
        _write_json(self.keys_path, {
            "user_id": str(user_id), "username": username,
            "auth_key": base64.b64encode(auth_key).decode(), "kek": base64.b64encode(kek).decode(),
        })

    def keys(self) -> dict:
        data = _read_json(self.keys_path, None)
        if not data:
            raise NotLoggedIn("not logged in: run `client.py login USERNAME` first")
        return {"user_id": UUID(data["user_id"]), "username": data["username"],
                "auth_key": base64.b64decode(data["auth_key"]), "kek": base64.b64decode(data["kek"])}

    def forget_login(self) -> None:
        self.keys_path.unlink(missing_ok=True)
        cfg = self.config()
        cfg.pop("token", None)
        _write_json(self.config_path, cfg)

    # uploaded_file.json
    def uploads(self) -> dict:
        return _read_json(self.uploads_path, {})

    def save_uploads(self, uploads: dict) -> None:
        _write_json(self.uploads_path, uploads)

    def forget_upload(self, remote_path: str) -> None:
        uploads = self.uploads()
        if uploads.pop(remote_path, None) is not None:
            _write_json(self.uploads_path, uploads)


class VersionLedger:
    """Highest inode version this client has seen (CryFS-style rollback check)."""

    def __init__(self, path: Path):
        fresh = not path.exists()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if fresh:
            os.chmod(path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")   # survives a process crash; cheap per commit
        self._db.execute("CREATE TABLE IF NOT EXISTS versions (inode BLOB PRIMARY KEY, version INTEGER)")
        self._lock = threading.Lock()
        self._seen: dict[UUID, int] = {}
        self._dirty: set[UUID] = set()

    def check(self, inode: UUID, version: int) -> None:
        with self._lock:
            known = self._seen.get(inode)
            if known is None:
                row = self._db.execute("SELECT version FROM versions WHERE inode=?", (inode.bytes,)).fetchone()
                known = row[0] if row else 0
            if version < known:
                raise TamperedError(f"the server rolled inode {inode} back from version {known} to {version}")
            if version != known:
                self._dirty.add(inode)
            self._seen[inode] = version

    def flush(self) -> None:
        with self._lock:
            rows = [(i.bytes, self._seen[i]) for i in self._dirty]
            self._dirty.clear()
            if rows:
                with self._db:       # one transaction for the batch
                    self._db.execute("BEGIN")
                    self._db.executemany("INSERT OR REPLACE INTO versions VALUES (?, ?)", rows)

    def close(self) -> None:
        self.flush()
        self._db.close()
