"""Whole-file upload and download for the CLI: streamed chunk by chunk with a
bounded number in flight, so memory stays flat whatever the file size."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import deque
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable
from uuid import UUID, uuid4

from . import crypto
from .errors import NotRegularFile, ServerError, ZkfsError
from .format import CHUNK_SIZE, MAX_FILE_SIZE, Manifest, seal_chunk
from .ops import Op
from .vault import Node, Vault, any_nonzero, new_attrs

IN_FLIGHT = 4
INLINE_MAX = 64 * 1024      # files this small travel inside the commit request


def ordered(pool: ThreadPoolExecutor, jobs: Iterable[Callable], window: int):
    """Run jobs on the pool, at most ``window`` at once, yielding results in order."""
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(pool.submit(job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_LOOKUP = object()


@dataclass
class PreparedUpload:
    """A file sealed and ready to publish: the ops that make it ``node``."""
    ops: list[Op]
    node: Node              # as it will be once ``ops`` are applied
    sha256: str
    inline_bytes: int
    name: str


def upload_file(vault: Vault, src: Path, parent: Node, name: str, progress=None,
                existing: Node | None = _LOOKUP) -> tuple[Node, str]:
    """Upload ``src`` as ``parent/name`` (replacing an existing file atomically).
    ``existing``: what is at that name now, if the caller already knows (else looked
    up). Returns the new node and the plaintext's sha256."""
    prepared = prepare_upload(vault, src, parent, name, progress, existing)
    publish(vault, [prepared])
    return prepared.node, prepared.sha256


def prepare_upload(vault: Vault, src: Path, parent: Node, name: str, progress=None,
                   existing: Node | None = _LOOKUP) -> PreparedUpload:
    """Encrypt ``src`` (a file up to INLINE_MAX travels inside its commit; larger ones
    are uploaded as staged chunks now) and build the ops that publish it."""
    f, st = open_regular(src)       # first: a device or FIFO fails before the server is asked
    with f:
        return _prepare(vault, f, st, parent, name, progress, existing)


def publish(vault: Vault, prepared: list[PreparedUpload]) -> None:
    """Publish prepared files in one transaction."""
    try:
        vault.apply([op for p in prepared for op in p.ops])
    except ServerError as exc:
        if exc.code == "conflict" and len(prepared) == 1:
            raise ZkfsError(f"{prepared[0].name} changed on the server while it was being uploaded; "
                            "run the upload again") from None
        raise


class BatchPublisher:
    """Publishes small files many per request (`upload -r`): prepared files gather into
    a batch of up to MAX_FILES or MAX_INLINE bytes, which a second thread sends while
    the next one is encrypted (the server's answer to one batch and the sealing of the
    next overlap). A batch the server refuses is sent again one file at a time, so
    one bad file fails alone."""

    MAX_FILES = 300                  # 2 ops each, under the server's 1,000 per request
    MAX_INLINE = 4 << 20             # inline chunk bytes (base64: ~5.5 MiB of the 16 MiB body)

    def __init__(self, vault: Vault):
        self.vault = vault
        self._batch: list[tuple[PreparedUpload, Callable[[PreparedUpload], None]]] = []
        self._bytes = 0
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="zkfs-publish")
        self._sending: Future | None = None

    def add(self, prepared: PreparedUpload, done: Callable[[PreparedUpload], None]) -> None:
        """``done`` runs (in this thread) once the server has the file."""
        self._batch.append((prepared, done))
        self._bytes += prepared.inline_bytes
        if len(self._batch) >= self.MAX_FILES or self._bytes >= self.MAX_INLINE:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Send what has gathered (after the batch in flight); ``wait``: until it is in."""
        batch, self._batch, self._bytes = self._batch, [], 0
        self._collect()
        if batch:
            self._sending = self._sender.submit(self._send, batch)
        if wait:
            self._collect()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._sender.shutdown(wait=True)

    def _collect(self) -> None:
        if self._sending is not None:
            sending, self._sending = self._sending, None
            for prepared, done in sending.result():
                done(prepared)

    def _send(self, batch: list[tuple[PreparedUpload, Callable]]) -> list[tuple[PreparedUpload, Callable]]:
        try:
            publish(self.vault, [p for p, _ in batch])
        except ServerError:
            if len(batch) == 1:
                raise
            for prepared, _ in batch:
                publish(self.vault, [prepared])
        return batch


def _prepare(vault: Vault, f, st: os.stat_result, parent: Node, name: str, progress,
             existing) -> PreparedUpload:
    if st.st_size > MAX_FILE_SIZE:
        raise ZkfsError(f"{name}: {st.st_size} bytes is over the largest file zkfs stores "
                        f"({MAX_FILE_SIZE >> 30} GiB)", errno=errno.EFBIG)
    if existing is _LOOKUP:
        existing = vault.lookup(parent.id, name)
    if existing is not None and not existing.attrs.is_reg:
        raise ZkfsError(f"{name}: exists on the server and is not a regular file")
    inode = existing.id if existing else uuid4()
    new_key = None
    if existing and vault.stale_key(existing):
        # Its key dates from before its share's last key rotation (a member removed
        # may hold it): the new version gets a new key.
        cipher, new_key = vault.new_file_key(inode, parent.id)
        file_key = None
    elif existing:
        cipher, file_key = vault.file_cipher(inode, existing.attrs.key_id), None
    else:
        cipher, file_key = vault.new_file_key(inode, parent.id)
    sha = hashlib.sha256()
    inline: list[tuple[UUID, bytes]] = []
    size = 0

    def chunks():
        nonlocal size
        while data := f.read(CHUNK_SIZE):
            sha.update(data)
            size += len(data)
            if progress:
                progress(len(data))
            yield data

    if st.st_size <= INLINE_MAX:
        refs = []
        for data in chunks():
            if any_nonzero(data):
                token, ref = seal_chunk(cipher, data, uuid4())
                inline.append((ref.blob_id, token))
                refs.append(ref)
            else:
                refs.append(vault.upload_chunk(inode, cipher, data))
    else:
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            jobs = (lambda d=d: vault.upload_chunk(inode, cipher, d) for d in chunks())
            refs = list(ordered(pool, jobs, IN_FLIGHT * 2))
    manifest = Manifest(inode=inode, size=size, chunks=refs)
    if existing:
        attrs = existing.attrs.evolve()
        base = existing.version
        ops = []
    else:
        attrs = new_attrs(stat.S_IFREG | stat.S_IMODE(st.st_mode))
        attrs.key_id = crypto.key_id(file_key)
        ops = [vault.op_create(parent.id, name, inode, attrs.evolve(), file_key)]
        base = 1
    attrs.mtime_ns = st.st_mtime_ns
    ops.append(vault.op_commit(inode, base, attrs, manifest, inline, new_key=new_key))
    node = Node(inode, False, base + 1, existing.nlink if existing else 1, attrs)
    return PreparedUpload(ops, node, sha.hexdigest(), sum(len(t) for _, t in inline), name)


def download_file(vault: Vault, node: Node, dest: Path, progress=None) -> str:
    """Download ``node`` to ``dest`` via a temp file renamed at the end, so an
    interrupted or tampered download never leaves a partial file. Returns sha256."""
    manifest = vault.manifest(node)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        jobs = (lambda i=i: vault.read_chunk(node.id, manifest, i) for i in range(len(manifest.chunks)))
        # The permission bits only, as cp and tar do without -p: a file someone else
        # wrote (or a server, with a stolen key) must not become a setuid program here.
        return save_atomically(dest, ordered(pool, jobs, IN_FLIGHT * 2), stat.S_IMODE(node.attrs.mode) & 0o777,
                               (node.attrs.atime_ns, node.attrs.mtime_ns), progress)


def save_atomically(dest: Path, pieces: Iterable[bytes], mode: int, times_ns: tuple[int, int],
                    progress=None, *, replace: bool = True) -> str:
    """Write ``pieces`` to ``dest`` through a temp file renamed over it once all of them
    arrived (and reached the disk), so a failure on the way (an integrity error, a lost
    connection, Ctrl-C) leaves nothing, not half a file (``replace``: see
    ``check_download_target``). Returns the sha256."""
    sha = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.zkfs-partial")
    tmp.unlink(missing_ok=True)     # a stale one from a killed run; never write through a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for data in pieces:
                out.write(data)
                sha.update(data)
                if progress:
                    progress(len(data))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.utime(tmp, ns=times_ns)
        check_download_target(dest, replace)      # again: the download may have taken a while
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha.hexdigest()


def check_download_target(dest: Path, replace: bool = True) -> None:
    """Replace only a regular file: os.replace would swap a device (/dev/null), a
    FIFO or a symlink for a plain file; and nothing at all unless ``replace``."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if not replace:
        raise ZkfsError(f"{dest} exists: not replacing it (name it with -o to replace it)")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{dest} exists and is {kind_of(dest)}, not a regular file: not replacing it")


def kind_of(path: Path) -> str:
    """What a local path that is not a regular file is, for a message (not following
    a symlink: a symlink is named as one)."""
    mode = path.lstat().st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symlink" if path.exists() else "a broken symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path):
    """``(file, stat)`` of ``path`` opened for reading, if it is a regular file.
    O_NONBLOCK so a FIFO swapped in after the caller's check cannot hang open();
    fstat then says what was really opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(f"{path} is not a regular file")
    return os.fdopen(fd, "rb"), st


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    f, _ = open_regular(path)
    with f:
        while data := f.read(CHUNK_SIZE):
            sha.update(data)
    return sha.hexdigest()
