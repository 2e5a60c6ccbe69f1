"""The SQL engines the metadata store runs on: sqlite (the embedded default) and
PostgreSQL (any number of API nodes).

Everything above this module writes one SQL: ``?`` placeholders and statements
both engines accept (``ON CONFLICT``, ``RETURNING``, partial and expression
indexes). What differs lives here: connecting, opening a transaction, locking,
placeholders, and what a lost connection means.

A transaction is a function of a :class:`Tx`, run by :meth:`Database.transaction`;
on PostgreSQL it is run again when the connection was lost before ``COMMIT`` was
sent (a restarted database: the request stalls, then goes through), and
:class:`Unavailable` is raised when the database stays away.
"""
from __future__ import annotations

import abc
import logging
import os
import sqlite3
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

log = logging.getLogger("zkfs.server")

T = TypeVar("T")


class Unavailable(Exception):
    """The database cannot be reached (or a transaction's outcome is unknown)."""


class UniqueViolation(Exception):
    """An insert hit a unique index (e.g. a username taken concurrently)."""


class Tx(abc.ABC):
    """One open transaction: queries in ``?`` style."""

    @abc.abstractmethod
    def one(self, sql: str, args: Sequence = ()) -> tuple | None: ...

    @abc.abstractmethod
    def all(self, sql: str, args: Sequence = ()) -> list[tuple]: ...

    @abc.abstractmethod
    def run(self, sql: str, args: Sequence = ()) -> int:
        """Execute; returns the number of rows changed."""

    @abc.abstractmethod
    def many(self, sql: str, rows: Iterable[Sequence]) -> None: ...

    @abc.abstractmethod
    def lock_row(self, sql: str, args: Sequence) -> tuple | None:
        """``sql`` (a SELECT of one row) holding that row until the transaction
        ends, so transactions that lock it run one after another."""

    @abc.abstractmethod
    def lock_key(self, key: str) -> None:
        """Serialise with every other transaction that locks ``key``."""


class Database(abc.ABC):
    kind: str

    @abc.abstractmethod
    def transaction(self, fn: Callable[[Tx], T], *, write: bool = True,
                    durable: bool = True) -> T:
        """``fn`` in one transaction (a consistent snapshot when ``write`` is false).
        ``durable=False``: the commit may be lost in a power cut (harmless records only)."""

    @abc.abstractmethod
    def one(self, sql: str, args: Sequence = ()) -> tuple | None:
        """A single read statement, outside any transaction (the hot paths)."""

    @abc.abstractmethod
    def all(self, sql: str, args: Sequence = ()) -> list[tuple]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where it is, without credentials (for logs)."""


# ------------------------------------------------------------------ sqlite
class _SqliteTx(Tx):
    __slots__ = ("c",)

    def __init__(self, c: sqlite3.Connection) -> None:
        self.c = c

    def one(self, sql, args=()):
        return self.c.execute(sql, args).fetchone()

    def all(self, sql, args=()):
        return self.c.execute(sql, args).fetchall()

    def run(self, sql, args=()):
        return self.c.execute(sql, args).rowcount

    def many(self, sql, rows):
        self.c.executemany(sql, rows)

    def lock_row(self, sql, args):
        return self.one(sql, args)      # a write transaction already excludes every other

    def lock_key(self, key):
        pass


class SqliteDatabase(Database):
    """One sqlite file: WAL, ``busy_timeout``, ``BEGIN IMMEDIATE`` for writes (one
    writer at a time, across uvicorn worker processes too), one connection per thread."""

    kind = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = 30_000) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:    # the database holds auth hashes: keep it private
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA temp_store = MEMORY")
            self._local.conn = conn
        return conn

    def transaction(self, fn, *, write=True, durable=True):
        conn = self._conn()
        if not durable:
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn(_SqliteTx(conn))
            conn.execute("COMMIT")
            return result
        except sqlite3.IntegrityError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "UNIQUE" in str(e):
                raise UniqueViolation(str(e)) from None
            raise
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            if not durable:
                conn.execute("PRAGMA synchronous = FULL")

    def one(self, sql, args=()):
        return self._conn().execute(sql, args).fetchone()

    def all(self, sql, args=()):
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# ------------------------------------------------------------------ PostgreSQL
@lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PgTx(Tx):
    __slots__ = ("cur",)

    def __init__(self, cur) -> None:
        self.cur = cur

    def one(self, sql, args=()):
        self.cur.execute(_pg_sql(sql), args)
        return self.cur.fetchone() if self.cur.description else None

    def all(self, sql, args=()):
        self.cur.execute(_pg_sql(sql), args)
        return self.cur.fetchall()

    def run(self, sql, args=()):
        self.cur.execute(_pg_sql(sql), args)
        return self.cur.rowcount

    def many(self, sql, rows):
        self.cur.executemany(_pg_sql(sql), list(rows))

    def lock_row(self, sql, args):
        return self.one(sql + " FOR UPDATE", args)

    def lock_key(self, key):
        self.cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


class PostgresDatabase(Database):
    """A PostgreSQL database through a psycopg 3 connection pool. Writes run at READ
    COMMITTED and take the row lock of the account they change first (so one
    account's transactions run one after another, whichever node sends them);
    reads run at REPEATABLE READ (one snapshot)."""

    kind = "postgresql"

    def __init__(self, url: str, *, max_connections: int = 16, wait_seconds: float = 30.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout
        self._psycopg = psycopg
        self._pool_timeout = PoolTimeout
        self.url = url
        self.wait_seconds = wait_seconds
        # The pool checks nothing on checkout (a round trip per transaction): a
        # connection found broken is dropped by the pool and the transaction re-run.
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False,
                                   kwargs={"autocommit": True}, timeout=wait_seconds,
                                   reconnect_timeout=wait_seconds)
        self.pool.open(wait=False)

    def describe(self) -> str:
        u = urlsplit(self.url)
        return f"postgresql://{u.hostname or ''}{':' + str(u.port) if u.port else ''}{u.path}"

    def transaction(self, fn, *, write=True, durable=True):
        return self._run(fn, "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def one(self, sql, args=()):
        return self._run(lambda tx: tx.one(sql, args), None)

    def all(self, sql, args=()):
        return self._run(lambda tx: tx.all(sql, args), None)

    def _run(self, fn, begin: str | None):
        """``fn`` after ``begin`` (None: one autocommitted statement), run again
        while the connection is lost before COMMIT, for up to ``wait_seconds``."""
        psycopg = self._psycopg
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.02
        while True:
            committing = False
            try:
                with self.pool.connection() as conn:
                    with conn.cursor() as cur:
                        if begin is None:
                            return fn(_PgTx(cur))
                        cur.execute(begin)
                        try:
                            result = fn(_PgTx(cur))
                            committing = True
                            cur.execute("COMMIT")
                            return result
                        except BaseException:
                            if not conn.closed and not committing:
                                try:
                                    cur.execute("ROLLBACK")
                                except psycopg.Error:
                                    pass
                            raise
            except psycopg.errors.UniqueViolation as e:
                raise UniqueViolation(str(e).splitlines()[0]) from None
            except psycopg.OperationalError as e:
                # COMMIT sent and the connection lost: the outcome is unknown, so
                # the transaction must not run again.
                if committing or time.monotonic() > deadline:
                    raise Unavailable(f"database unavailable ({type(e).__name__})") from None
            except self._pool_timeout:
                if time.monotonic() > deadline:
                    raise Unavailable("database unavailable (no connection)") from None
            log.info("database connection lost: retrying")
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def close(self) -> None:
        self.pool.close()


# ------------------------------------------------------------------ URLs
def open_database(url: str) -> Database:
    """``sqlite:///abs/path.db`` (or a plain path) or ``postgresql://user:pw@host/db``."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    if scheme == "sqlite":
        return SqliteDatabase(Path(unquote(urlsplit(url).path)))
    if scheme == "":
        return SqliteDatabase(Path(url))
    raise ValueError(f"unsupported database URL scheme {scheme!r} (sqlite:///PATH or postgresql://...)")


