"""libfuse3 through mfusepy (fusepy's API, maintained), plus what its high-level
binding leaves out: rename(2) flags, the file handle of ftruncate, fchmod,
fchown and futimens, and a Python thread state kept per libfuse worker."""
from __future__ import annotations

import ctypes
import os
import threading

from ..errors import ZkfsError

# mfusepy loads the first libfuse it finds, libfuse2 included; zkfs needs 3
# (rename flags, file handles on setattr).
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
try:
    import mfusepy
except OSError as exc:        # no libfuse at all
    raise ZkfsError(f"libfuse3 is needed to mount (Debian: apt-get install fuse3): {exc}") from None
if mfusepy.fuse_version_major != 3:
    raise ZkfsError(f"libfuse3 is needed to mount, found libfuse {mfusepy.fuse_version_major}"
                    f".{mfusepy.fuse_version_minor} (Debian: apt-get install fuse3)")

Operations = mfusepy.Operations
fuse_get_context = mfusepy.fuse_get_context

# fuse_conn_info.want bits (fuse_common.h)
CAP_HANDLE_KILLPRIV = 1 << 20

_pinned = threading.local()
_pins = threading.BoundedSemaphore(32)


class Fuse3(mfusepy.FUSE):
    def _wrapper(self, func, *args, **kwargs):
        # libfuse's worker threads call in through ctypes, which makes a Python
        # thread state for each call and destroys it after: a quarter of the
        # mount's time in `ls -lR`. One extra PyGILState_Ensure, never released,
        # keeps a worker's state for its lifetime. That state leaks when the worker
        # exits, and under parallel load libfuse starts and ends workers by the
        # hundred, so only the first 32 workers are pinned (the long-lived ones that
        # serve a single busy reader); the rest pay the per-call cost.
        if not getattr(_pinned, "done", False):
            _pinned.done = True
            if _pins.acquire(blocking=False):
                ctypes.pythonapi.PyGILState_Ensure()
        return super()._wrapper(func, *args, **kwargs)

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    @staticmethod
    def _fh(fip) -> int | None:
        return fip.contents.fh if fip else None

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(self._path(old), self._path(new), flags)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip) -> int:
        return self.operations.truncate(self._path(path), length, self._fh(fip))

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip) -> int:
        return self.operations.chmod(self._path(path), mode, self._fh(fip))

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip) -> int:
        # (uid_t)-1 arrives as 2**32 - 1: "leave unchanged"
        uid = -1 if ctypes.c_uint32(uid + 1).value == 0 else uid
        gid = -1 if ctypes.c_uint32(gid + 1).value == 0 else gid
        return self.operations.chown(self._path(path), uid, gid, self._fh(fip))

    def utimens_fuse_3(self, path: bytes | None, buf, fip) -> int:
        times = None
        if buf:
            times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                     mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(self._path(path), times, self._fh(fip))


def serve(operations, mountpoint: str, *, read_only: bool, allow_other: bool) -> None:
    """Run the filesystem in this thread until it is unmounted."""
    # nosuid, nodev: stored modes are the server's word as far as the kernel is
    # concerned: no setuid program and no device node from the store acts as one here.
    options = dict(foreground=True, nothreads=False, fsname="zkfs", subtype="zkfs", nosuid=True, nodev=True)
    if read_only:
        options["ro"] = True
    if allow_other:
        options.update(allow_other=True, default_permissions=True)
    Fuse3(operations, mountpoint, **options)


def configure(conn, config) -> None:
    """The libfuse3 settings zkfs runs with (called from ``init``)."""
    # inode numbers are ours; attributes come from our own cache, so the kernel
    # asks each time (attr_timeout 0): it keeps one node per path, and a hard
    # link's cached attributes would go stale. Names are cached for a second.
    config.use_ino = 1
    config.attr_timeout = 0.0
    config.entry_timeout = 1.0
    config.negative_timeout = 0.0
    config.auto_cache = 1
    # Operations on a descriptor come by file handle alone. (An unlinked open file
    # keeps a hidden path all the same, hard_remove off: the kernel sends fchmod,
    # fchown and fgetxattr by path; see orphans.py.)
    config.nullpath_ok = 1
    # The kernel clears setuid/setgid on write and chown itself (a setattr).
    conn.want &= ~CAP_HANDLE_KILLPRIV
