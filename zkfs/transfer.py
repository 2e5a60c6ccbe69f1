"""Whole-file upload and download for the CLI: streamed chunk by chunk with a
bounded number in flight, so memory stays flat whatever the file size."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable
from uuid import UUID, uuid4

from . import crypto
from .errors import NotRegularFile, ServerError, ZkfsError
from .format import CHUNK_SIZE, MAX_FILE_SIZE, Manifest, seal_chunk
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


def upload_file(vault: Vault, src: Path, parent: Node, name: str, progress=None,
                existing: Node | None = _LOOKUP) -> tuple[Node, str]:
    """Upload ``src`` as ``parent/name`` (replacing an existing file atomically).
    ``existing``: what is at that name now, if the caller already knows (else looked
    up). Returns the new node and the plaintext's sha256."""
    f, st = open_regular(src)       # first: a device or FIFO fails before the server is asked
    with f:
        return _upload(vault, f, st, parent, name, progress, existing)


def _upload(vault: Vault, f, st: os.stat_result, parent: Node, name: str, progress,
            existing) -> tuple[Node, str]:
    if st.st_size > MAX_FILE_SIZE:
        raise ZkfsError(f"{name}: {st.st_size} bytes is over the largest file zkfs stores "
                        f"({MAX_FILE_SIZE >> 30} GiB)", errno=errno.EFBIG)
    if existing is _LOOKUP:
        existing = vault.lookup(parent.id, name)
    if existing is not None and not existing.attrs.is_reg:
        raise ZkfsError(f"{name}: exists on the server and is not a regular file")
    inode = existing.id if existing else uuid4()
    if existing:
        cipher, file_key = vault.file_cipher(inode, existing.attrs.key_id), None
    else:
        cipher, file_key = vault.new_file_key(inode)
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
    ops.append(vault.op_commit(inode, base, attrs, manifest, inline))
    try:
        version = vault.apply(ops)[-1]["version"]
    except ServerError as exc:
        if exc.code == "conflict":
            raise ZkfsError(f"{name} changed on the server while it was being uploaded; "
                            "run the upload again") from None
        raise
    return Node(inode, False, version, existing.nlink if existing else 1, attrs), sha.hexdigest()


def download_file(vault: Vault, node: Node, dest: Path, progress=None) -> str:
    """Download ``node`` to ``dest`` via a temp file renamed at the end, so an
    interrupted or tampered download never leaves a partial file. Returns sha256."""
    manifest = vault.manifest(node)
    sha = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.zkfs-partial")
    tmp.unlink(missing_ok=True)     # a stale one from a killed run; never write through a link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, ThreadPoolExecutor(IN_FLIGHT) as pool:
            jobs = (lambda i=i: vault.read_chunk(node.id, manifest, i) for i in range(len(manifest.chunks)))
            for data in ordered(pool, jobs, IN_FLIGHT * 2):
                out.write(data)
                sha.update(data)
                if progress:
                    progress(len(data))
            out.flush()
            os.fsync(out.fileno())
        # The permission bits only, as cp and tar do without -p: a file someone else
        # wrote (or a server, with a stolen key) must not become a setuid program here.
        os.chmod(tmp, stat.S_IMODE(node.attrs.mode) & 0o777)
        os.utime(tmp, ns=(node.attrs.atime_ns, node.attrs.mtime_ns))
        check_download_target(dest)         # again: the download may have taken a while
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha.hexdigest()


def check_download_target(dest: Path) -> None:
    """Replace only a regular file: os.replace would swap a device (/dev/null), a
    FIFO or a symlink for a plain file."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
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
