"""Client-side errors: each carries one clear line for the CLI and an errno for the mount."""
from __future__ import annotations

import errno as E


class ZkfsError(Exception):
    errno = E.EIO

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class ServerError(ZkfsError):
    """The server answered with an error body {detail, code}."""

    ERRNO_BY_CODE = {
        "invalid": E.EINVAL, "validation": E.EINVAL, "bad_credentials": E.EACCES,
        "token_invalid": E.EACCES, "token_expired": E.EACCES, "not_found": E.ENOENT,
        "exists": E.EEXIST, "conflict": E.EAGAIN, "not_empty": E.ENOTEMPTY,
        "not_dir": E.ENOTDIR, "is_dir": E.EISDIR, "invalid_move": E.EINVAL,
        "in_use": E.EBUSY, "too_large": E.EFBIG, "throttled": E.EAGAIN, "no_space": E.ENOSPC,
        "stale": E.ESTALE, "read_only": E.EACCES, "cross_share": E.EXDEV,
    }

    def __init__(self, status: int, code: str, detail: str, *, op_index: int | None = None):
        super().__init__(detail, errno=self.ERRNO_BY_CODE.get(code, E.EIO))
        self.status = status
        self.code = code
        self.op_index = op_index        # POST /fs/ops: which op of the batch failed


class Unreachable(ZkfsError):
    """No answer from the server (down, refused, timed out)."""


class TamperedError(ZkfsError):
    """Ciphertext or metadata from the server failed verification."""


class StaleAnswer(ZkfsError):
    """A read answered with a version older than one of our own commits that it
    crossed: asked again, never used (see VersionLedger)."""


class StaleError(ZkfsError):
    """What an open file was reading is gone: deleted or replaced by another client."""
    errno = E.ESTALE


class NotLoggedIn(ZkfsError):
    errno = E.EACCES


class CorruptState(NotLoggedIn):
    """A file in $ZKFS_HOME cannot be used (bad JSON, wrong shape, not a database)."""


class StateDirError(ZkfsError):
    """$ZKFS_HOME cannot be used as the state folder."""


class NotRegularFile(ZkfsError):
    """A local path is a device, FIFO, socket, symlink or folder where a file was expected."""


def drop_frames(exc: BaseException | None) -> None:
    """Cut a caught error, and the errors it chains to, from their frames. Libraries
    keep errors in locals of frames those errors' tracebacks hold (urllib3, a retry
    loop's state): cycles that keep every caller's frame, with its buffers (a
    chunk's plaintext and ciphertext), until the cycle collector runs; a mount
    writing with the server away seldom makes it run."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
