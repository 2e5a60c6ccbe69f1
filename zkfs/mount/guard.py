"""The error boundary of every FUSE operation: a failure becomes the right errno
and one log line; an unexpected exception is logged with its traceback and
answered with EIO, and the daemon stays up."""
from __future__ import annotations

import errno
import functools
import logging

from ..errors import ServerError, TamperedError, ZkfsError

log = logging.getLogger("zkfs.mount.fs")


class FsError(OSError):
    def __init__(self, code: int):
        super().__init__(code, "")


def guarded(method):
    """For a method of ZkfsOperations (``self.describe`` names what a call is about)."""
    @functools.wraps(method)
    def wrapper(self, path, *args):
        try:
            return method(self, path, *args)
        except OSError:
            raise
        except TamperedError as exc:
            log.error("%s %s: integrity check failed: %s", method.__name__, self.describe(path, args), exc)
            raise FsError(errno.EIO) from None
        except ServerError as exc:
            if exc.errno == errno.EIO or exc.code == "no_space":
                log.error("%s %s: server: %s", method.__name__, self.describe(path, args), exc)
            raise FsError(exc.errno) from None
        except ZkfsError as exc:
            log.error("%s %s: %s", method.__name__, self.describe(path, args), exc)
            raise FsError(exc.errno) from None
        except Exception:
            log.exception("%s %s failed", method.__name__, self.describe(path, args))
            raise FsError(errno.EIO) from None
    return wrapper
