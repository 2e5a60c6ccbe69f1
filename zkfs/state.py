"""Local client state in $ZKFS_HOME (default ~/.zkfs), every file mode 0600.

- config.json        server URL, download directory, token, username (the seed's layout),
                     insecure_http (login was told --insecure-http for that server)
- keys.json          user id, auth key and key-encryption key (what `login` saves)
- uploaded_file.json remote path -> {uuid, sha256, size, version}: makes re-uploads no-ops
- versions.db        highest version seen per inode, and the highest master key generation
                     per account: detects a server rolling files or keys back
- pinned_keys.json   server URL -> username -> the public identity key first seen for it
                     (trust on first use: sharing refuses a key that changed)
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

from .crypto import KEY_BYTES
from .errors import CorruptState, NotLoggedIn, StateDirError, TamperedError, ZkfsError

DEFAULT_SERVER = "http://127.0.0.1:8000"
# `login` replaces whatever it cannot read, so this advice always works
RELOGIN = "run `client.py login USERNAME` again (add --server URL if not the default)"


def home() -> Path:
    path = Path(os.environ.get("ZKFS_HOME") or Path.home() / ".zkfs")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"cannot use {path} as the zkfs state folder (ZKFS_HOME): "
                            f"{exc.strerror or exc}") from None
    return path


def _read_json(path: Path, default: Any, valid: Callable[[Any], bool]) -> Any:
    """The file's data; ``default`` if it does not exist; CorruptState if it is not
    JSON or not the shape ``valid`` expects (so no caller trips over a null or a list)."""
    try:
        data = json.loads(path.read_text())
        ok = valid(data)
    except FileNotFoundError:
        return default
    except ValueError:          # bad JSON, or bytes that are not UTF-8
        ok = False
    if not ok:
        raise CorruptState(f"{path} is corrupt; {RELOGIN}")
    return data


def _str_fields(data: dict, *names: str) -> bool:
    return all(isinstance(data.get(n, ""), str) for n in names)


def _valid_config(data: Any) -> bool:
    return isinstance(data, dict) and _str_fields(data, "server", "download_dir", "username") \
        and (data.get("token") is None or isinstance(data["token"], str)) \
        and isinstance(data.get("insecure_http", False), bool)


def _valid_uploads(data: Any) -> bool:
    return isinstance(data, dict) and all(
        isinstance(r, dict) and isinstance(r.get("uuid"), str) and isinstance(r.get("sha256"), str)
        and type(r.get("size")) is int for r in data.values())


def _valid_pins(data: Any) -> bool:
    return isinstance(data, dict) and all(
        isinstance(users, dict) and all(isinstance(k, str) for k in users.values()) for users in data.values())


def _write_json(path: Path, data: Any) -> None:
    # A temp name of its own: two commands saving at once must not share one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalState:
    def __init__(self, root: Path | None = None):
        self.root = root or home()
        self.config_path = self.root / "config.json"
        self.keys_path = self.root / "keys.json"
        self.uploads_path = self.root / "uploaded_file.json"
        self.ledger_path = self.root / "versions.db"
        self.pins_path = self.root / "pinned_keys.json"

    # config.json
    def config(self) -> dict:
        cfg = _read_json(self.config_path, {}, _valid_config)
        cfg.setdefault("server", DEFAULT_SERVER)
        # relative: the folder `download` runs in, not the one `login` ran in
        cfg.setdefault("download_dir", ".")
        return cfg

    def insecure_http(self, server: str) -> bool:
        """Whether `login` was told --insecure-http for ``server`` (the saved one)."""
        cfg = self.config()
        return bool(cfg.get("insecure_http")) and cfg["server"].rstrip("/") == server.rstrip("/")

    def saved_server(self) -> str:
        """The server URL for `login`, which must work even when config.json is corrupt."""
        try:
            return self.config()["server"]
        except CorruptState:
            return DEFAULT_SERVER

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
        data = _read_json(self.keys_path, None, lambda d: isinstance(d, dict))
        if data is None:
            raise NotLoggedIn("not logged in: run `client.py login USERNAME` first")
        try:
            keys = {"user_id": UUID(data["user_id"]), "username": data["username"],
                    "auth_key": base64.b64decode(data["auth_key"], validate=True),
                    "kek": base64.b64decode(data["kek"], validate=True)}
        except (KeyError, TypeError, ValueError, AttributeError):
            keys = None
        if keys is None or not isinstance(keys["username"], str) \
                or len(keys["auth_key"]) != KEY_BYTES or len(keys["kek"]) != KEY_BYTES:
            raise CorruptState(f"{self.keys_path} is corrupt; {RELOGIN}")
        return keys

    def forget_login(self) -> None:
        self.keys_path.unlink(missing_ok=True)
        try:
            cfg = self.config()
        except CorruptState:
            cfg = {}        # nothing in it can be trusted; logout must still work
        cfg.pop("token", None)
        cfg.pop("device", None)
        _write_json(self.config_path, cfg)

    def reset_corrupt(self) -> list[Path]:
        """Remove every state file that cannot be read, so `login` starts clean.
        Returns the files removed."""
        removed = []
        for path, read in ((self.config_path, self.config), (self.keys_path, self.keys),
                           (self.uploads_path, self.uploads),
                           (self.pins_path, lambda: _read_json(self.pins_path, {}, _valid_pins))):
            try:
                read()
            except CorruptState:
                path.unlink()
                removed.append(path)
            except NotLoggedIn:
                pass            # no keys.json: nothing to reset
        if self.ledger_path.exists():
            try:
                VersionLedger(self.ledger_path).close()
            except CorruptState:
                for extra in ("", "-wal", "-shm"):
                    Path(f"{self.ledger_path}{extra}").unlink(missing_ok=True)
                removed.append(self.ledger_path)
        return removed

    # pinned_keys.json
    def pinned_key(self, server: str, username: str) -> bytes | None:
        pins = _read_json(self.pins_path, {}, _valid_pins)
        found = pins.get(server.rstrip("/"), {}).get(username.lower())
        return base64.b64decode(found) if found else None

    def pin_key(self, server: str, username: str, public: bytes) -> None:
        with open(self.root / ".pins.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            pins = _read_json(self.pins_path, {}, _valid_pins)
            pins.setdefault(server.rstrip("/"), {})[username.lower()] = base64.b64encode(public).decode()
            _write_json(self.pins_path, pins)

    # uploaded_file.json
    def uploads(self) -> dict:
        return _read_json(self.uploads_path, {}, _valid_uploads)

    def update_uploads(self, changes: dict[str, dict | None]) -> None:
        """Apply ``changes`` (None removes a record) to uploaded_file.json as it is
        now: commands running at once each add their own records, none lost."""
        if not changes:
            return
        with open(self.root / ".uploads.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            uploads = self.uploads()
            for remote, record in changes.items():
                if record is None:
                    uploads.pop(remote, None)
                else:
                    uploads[remote] = record
            _write_json(self.uploads_path, uploads)


class VersionLedger:
    """Highest inode version this client has seen (CryFS-style rollback check), and
    the highest master key generation of each account (``check_key_gen``).

    A read answered while one of this client's own commits was in flight may
    carry the version before that commit: not a rollback, just an answer that
    crossed ours. So every read notes ``epoch()`` before it is sent; an answer
    older than what is known now, for an inode whose version rose after the
    request was sent, is stale and the caller asks again. The second answer (sent
    after the rise) must not be older: if it is, that is a rollback."""

    _FORGET_RAISES_AFTER = 600.0     # seconds: no request waits that long

    def __init__(self, path: Path):
        fresh = not path.exists()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise ZkfsError(f"cannot open {path}: {exc}") from None
        if fresh:
            os.chmod(path, 0o600)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")   # survives a process crash; cheap per commit
            self._db.execute("CREATE TABLE IF NOT EXISTS versions (inode BLOB PRIMARY KEY, version INTEGER)")
            self._db.execute("CREATE TABLE IF NOT EXISTS key_gens (account BLOB PRIMARY KEY, gen INTEGER)")
            self._db.execute("SELECT inode, version FROM versions LIMIT 1").fetchall()
        except sqlite3.DatabaseError:       # not a database, or another one's tables
            self._db.close()
            raise CorruptState(f"{path} is corrupt; {RELOGIN}") from None
        self._lock = threading.Lock()
        self._seen: dict[UUID, int] = {}
        self._dirty: set[UUID] = set()
        self._epoch = 0
        self._last_raise: dict[UUID, tuple[int, float]] = {}   # inode -> (epoch, monotonic time)

    def epoch(self) -> int:
        """Note this before sending a read; pass it to ``check`` with the answer."""
        with self._lock:
            return self._epoch

    def check(self, inode: UUID, version: int, since: int | None = None) -> bool:
        """Record ``version`` of ``inode``. Returns False for a stale answer to a
        request sent at epoch ``since`` (ask again); raises TamperedError for a
        rollback; True otherwise. ``since=None``: a request sent just now."""
        with self._lock:
            known = self._seen.get(inode)
            if known is None:
                row = self._db.execute("SELECT version FROM versions WHERE inode=?", (inode.bytes,)).fetchone()
                known = self._seen[inode] = row[0] if row else 0
                if since is not None and version < known:
                    # Another process on this machine may have recorded ``known`` after
                    # this request left (two uploads into one folder): ask once more; a
                    # second older answer is a rollback.
                    self._epoch += 1
                    self._last_raise[inode] = (self._epoch, time.monotonic())
                    return False
            if version > known:
                self._epoch += 1
                self._last_raise[inode] = (self._epoch, time.monotonic())
                self._dirty.add(inode)
                self._seen[inode] = version
            elif version < known:
                if since is not None and self._last_raise.get(inode, (-1,))[0] > since:
                    return False
                raise TamperedError(f"the server rolled inode {inode} back from version {known} to {version}")
            return True

    def check_key_gen(self, account: UUID, gen: int) -> None:
        """The account's current master key generation as the server states it: lower
        than one seen here is a rollback to a retired (perhaps leaked) key. ``account``:
        its root inode id. Written at once, like an acknowledged version."""
        with self._lock:
            row = self._db.execute("SELECT gen FROM key_gens WHERE account=?", (account.bytes,)).fetchone()
            if row and gen < row[0]:
                raise TamperedError(f"the server rolled the master key back from generation {row[0]} to {gen}")
            if not row or gen > row[0]:
                self._db.execute("INSERT OR REPLACE INTO key_gens VALUES (?, ?)", (account.bytes, gen))

    def flush(self) -> None:
        with self._lock:
            rows = [(i.bytes, self._seen[i]) for i in self._dirty]
            self._dirty.clear()
            old = time.monotonic() - self._FORGET_RAISES_AFTER
            for inode in [i for i, (_, at) in self._last_raise.items() if at < old]:
                del self._last_raise[inode]
            if rows:
                with self._db:       # one transaction for the batch
                    self._db.execute("BEGIN")
                    self._db.executemany("INSERT OR REPLACE INTO versions VALUES (?, ?)", rows)

    def close(self) -> None:
        self.flush()
        self._db.close()
