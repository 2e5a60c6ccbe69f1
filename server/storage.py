"""Blob storage: opaque, immutable chunk objects addressed by (user, inode, blob)
UUIDs. Only chunks: wrapped file keys live in the metadata database. What a store
does is a streamed put, a ranged get, delete and list; an object store can also
hand out short-lived URLs so chunk bytes skip the API nodes (:mod:`server.s3store`).

Layout of :class:`LocalBlobStore`::

    <root>/<user_uuid>/<inode_uuid>/<blob_uuid>   chunk objects

Paths are only ever built from :class:`uuid.UUID` objects. Every write goes to a
``*.tmp`` file in the target directory, is fsynced, then renamed into place.
Writes happen in two steps (:meth:`BlobStore.stage_stream` / ``stage_bytes`` give
a :class:`Staged` object; :meth:`Staged.commit` renames it in place) so that the
metadata transaction that makes an object visible can decide whether it lands.
"""
from __future__ import annotations

import abc
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator
from urllib.parse import unquote, urlsplit
from uuid import UUID

import anyio

from .errors import ApiError, no_space, not_found, too_large

log = logging.getLogger("zkfs.server")

LEGACY_KEY_OBJECT = "key"       # where schema version 1 kept an inode's wrapped file key
_WRITE_BUFFER = 1024 * 1024
_READ_CHUNK = 1024 * 1024


class Staged(abc.ABC):
    """An object written durably but not yet visible under its final name."""

    size: int

    @abc.abstractmethod
    def commit(self) -> None:
        """Make it visible (atomic replace). Idempotent."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Undo it, whether or not it was committed. Never raises."""


class BlobStore(abc.ABC):
    """Narrow interface: a local folder or an S3 bucket."""

    # Whether clients may move chunk bytes with URLs from presign_* (no bytes
    # through the API nodes).
    direct = False

    # -- writes
    @abc.abstractmethod
    async def stage_stream(self, user: UUID, inode: UUID, blob: UUID,
                           chunks: AsyncIterator[bytes], max_bytes: int) -> Staged: ...

    @abc.abstractmethod
    def stage_bytes(self, user: UUID, inode: UUID, blob: UUID, data: bytes) -> Staged: ...

    def sync_inode(self, user: UUID, inode: UUID) -> None:
        """Make every streamed blob of this inode durable under its final name."""

    # -- reads
    @abc.abstractmethod
    def open_range(self, user: UUID, inode: UUID, blob: UUID,
                   start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)``. Opens eagerly: raises not_found if missing."""

    @abc.abstractmethod
    def sizes(self, user: UUID, inode: UUID) -> dict[UUID, int]:
        """Every stored chunk of one inode with its size (one listing)."""

    @abc.abstractmethod
    def list_blobs(self, user: UUID | None = None) -> Iterator[tuple[UUID, UUID, UUID]]:
        """(user, inode, blob) of every stored chunk (of one user)."""

    @abc.abstractmethod
    def copy_blob(self, user: UUID, inode: UUID, blob: UUID, to: UUID) -> None:
        """Copy a stored chunk to ``(user, to, blob)`` (a link's own copy, docs/FORMAT.md
        §8), durable once ``sync_inode(user, to)`` returns; not_found if it is not there."""

    # -- direct transfers
    def presign_put(self, user: UUID, inode: UUID, blob: UUID, size: int, ttl: int) -> str:
        raise NotImplementedError

    def presign_get(self, user: UUID, inode: UUID, blob: UUID, ttl: int) -> str:
        raise NotImplementedError

    # -- deletes
    @abc.abstractmethod
    def delete_blobs(self, user: UUID, inode: UUID, blobs: Iterable[UUID]) -> None: ...

    @abc.abstractmethod
    def delete_inode(self, user: UUID, inode: UUID) -> None: ...

    @abc.abstractmethod
    def delete_user(self, user: UUID) -> None: ...

    # -- maintenance
    def free_bytes(self) -> int | None:
        """Space left (None: the store does not say)."""
        return None

    def cleanup_temp(self) -> int:
        """Remove every leftover temp file (call at start only). Returns count."""
        return 0

    def describe(self) -> str:
        return type(self).__name__


def _u(value: UUID) -> str:
    if not isinstance(value, UUID):
        raise TypeError("storage paths are built from uuid.UUID objects only")
    return str(value)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:   # pragma: no cover
        log.warning("could not remove %s: %s", path, e.strerror)


def _rmdir_if_empty(path: Path) -> None:
    """Remove an inode directory left empty (a concurrent writer re-creates it)."""
    try:
        os.rmdir(path)
    except OSError:
        pass


class _LocalStaged(Staged):
    def __init__(self, tmp: Path, final: Path, size: int, sync_dir: bool = True) -> None:
        self.tmp, self.final, self.size = tmp, final, size
        self.sync_dir = sync_dir
        self.committed = False
        self.discarded = False

    def commit(self) -> None:
        if self.committed:
            return
        try:
            os.replace(self.tmp, self.final)
            if self.sync_dir:
                _fsync_dir(self.final.parent)
        except OSError as e:
            raise _as_no_space(e) from None
        self.committed = True

    def discard(self) -> None:
        if self.discarded:
            return
        self.discarded = True
        _unlink(self.final if self.committed else self.tmp)
        _rmdir_if_empty(self.final.parent)


def _as_no_space(e: OSError) -> ApiError:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage write failed: %s", e.strerror)
    return no_space("server storage is full" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                    else "storage write failed")


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    # -- paths
    def _inode_dir(self, user: UUID, inode: UUID) -> Path:
        return self.root / _u(user) / _u(inode)

    def _path(self, user: UUID, inode: UUID, blob: UUID) -> Path:
        return self._inode_dir(user, inode) / _u(blob)

    def _open_tmp(self, final: Path) -> tuple[Path, int]:
        """Create the temp file next to ``final`` (directory created as needed)."""
        for attempt in range(3):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.tmp"
            try:
                return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                if attempt == 2:      # directory removed concurrently, retry
                    raise
        raise AssertionError("unreachable")

    # -- writes
    async def stage_stream(self, user, inode, blob, chunks, max_bytes) -> Staged:
        final = self._path(user, inode, blob)
        try:
            tmp, fd = self._open_tmp(final)
        except OSError as e:
            raise _as_no_space(e) from None
        size = 0
        buf = bytearray()
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large(f"blob larger than {max_bytes} bytes")
                    buf += chunk
                    if len(buf) >= _WRITE_BUFFER:
                        data, buf = bytes(buf), bytearray()
                        await anyio.to_thread.run_sync(_write_all, fd, data)
                if buf:
                    await anyio.to_thread.run_sync(_write_all, fd, bytes(buf))
                await anyio.to_thread.run_sync(os.fsync, fd)
            finally:
                os.close(fd)
        except BaseException as e:
            _unlink(tmp)
            _rmdir_if_empty(final.parent)
            if isinstance(e, OSError):
                raise _as_no_space(e) from None
            raise
        # The rename is made durable by sync_inode() before a commit references it:
        # one directory fsync per committed file instead of one per chunk.
        return _LocalStaged(tmp, final, size, sync_dir=False)

    def stage_bytes(self, user, inode, blob, data) -> Staged:
        final = self._path(user, inode, blob)
        try:
            tmp, fd = self._open_tmp(final)
        except OSError as e:
            raise _as_no_space(e) from None
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            _unlink(tmp)
            _rmdir_if_empty(final.parent)
            if isinstance(e, OSError):
                raise _as_no_space(e) from None
            raise
        return _LocalStaged(tmp, final, len(data))

    def sync_inode(self, user, inode) -> None:
        try:
            _fsync_dir(self._inode_dir(user, inode))
        except FileNotFoundError:
            pass

    # -- reads
    def open_range(self, user, inode, blob, start, end) -> Iterator[bytes]:
        try:
            f = open(self._path(user, inode, blob), "rb")
        except FileNotFoundError:
            raise not_found("blob not found") from None
        return _RangeReader(f, start, end)

    def copy_blob(self, user, inode, blob, to) -> None:
        src, dst = self._path(user, inode, blob), self._path(user, to, blob)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)         # chunks are immutable: a second name costs no space
        except FileNotFoundError:
            raise not_found("blob not found") from None
        except FileExistsError:
            pass                      # a retry: the same immutable bytes
        except OSError:               # no hard links here: a real copy, then the rename
            tmp, fd = self._open_tmp(dst)
            try:
                try:
                    with open(src, "rb") as f:
                        while data := f.read(_READ_CHUNK):
                            _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, dst)
            except BaseException as e:
                _unlink(tmp)
                if isinstance(e, FileNotFoundError):
                    raise not_found("blob not found") from None
                if isinstance(e, OSError):
                    raise _as_no_space(e) from None
                raise

    def sizes(self, user, inode) -> dict[UUID, int]:
        out = {}
        try:
            entries = list(os.scandir(self._inode_dir(user, inode)))
        except FileNotFoundError:
            return out
        for e in entries:
            try:
                out[UUID(e.name)] = e.stat().st_size
            except (ValueError, FileNotFoundError):   # temp files, or gone meanwhile
                continue
        return out

    def list_blobs(self, user=None):
        users = [self.root / _u(user)] if user is not None else sorted(self.root.iterdir())
        for udir in users:
            for idir in sorted(udir.iterdir()) if udir.is_dir() else ():
                for f in sorted(idir.iterdir()) if idir.is_dir() else ():
                    try:
                        yield UUID(udir.name), UUID(idir.name), UUID(f.name)
                    except ValueError:      # temp files, legacy key objects
                        continue

    def legacy_key(self, user: UUID, inode: UUID) -> bytes | None:
        """The wrapped file key schema version 1 kept next to the chunks."""
        try:
            return (self._inode_dir(user, inode) / LEGACY_KEY_OBJECT).read_bytes()
        except FileNotFoundError:
            return None

    def remove_legacy_keys(self) -> int:
        """Delete the key objects a migration copied into the database."""
        n = 0
        for p in self.root.glob(f"*/*/{LEGACY_KEY_OBJECT}"):
            _unlink(p)
            _rmdir_if_empty(p.parent)
            n += 1
        return n

    # -- deletes
    def delete_blobs(self, user, inode, blobs) -> None:
        d = self._inode_dir(user, inode)
        for b in blobs:
            _unlink(d / _u(b))
        _rmdir_if_empty(d)     # e.g. staged chunks of an inode that was never created

    def delete_inode(self, user, inode) -> None:
        shutil.rmtree(self._inode_dir(user, inode), ignore_errors=True)

    def delete_user(self, user) -> None:
        shutil.rmtree(self.root / _u(user), ignore_errors=True)

    # -- maintenance
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def cleanup_temp(self) -> int:
        n = 0
        for p in self.root.rglob("*.tmp"):
            if p.is_file() or p.is_symlink():
                _unlink(p)
                n += 1
        return n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _RangeReader:
    """Iterator over a byte range of an open file; closes the file when done."""

    def __init__(self, f, start: int, end: int) -> None:
        self.f = f
        self.remaining = max(0, end - start)
        f.seek(start)

    def __iter__(self) -> Iterator[bytes]:
        try:
            while self.remaining > 0:
                data = self.f.read(min(_READ_CHUNK, self.remaining))
                if not data:
                    break
                self.remaining -= len(data)
                yield data
        finally:
            self.close()

    def close(self) -> None:
        self.f.close()


def open_blob_store(url: str) -> BlobStore:
    """A folder (a path or ``file:///path``) or a bucket
    (``s3://bucket/prefix?endpoint=https://...&region=...``)."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        from .s3store import S3BlobStore
        return S3BlobStore.from_url(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(unquote(parts.path)))
    if parts.scheme == "":
        return LocalBlobStore(Path(url))
    raise ValueError(f"unsupported blob store URL scheme {parts.scheme!r} (a folder, file:///PATH "
                     "or s3://BUCKET/PREFIX)")
