"""One process of the syscall storm (test_mount_storm.py): random calls with
extreme arguments against a mounted folder, from a fixed seed.

    python storm_worker.py ROOT SEED COUNT

Every call may fail with an errno a local disk could give; what must never
happen is a dead mount (ENOTCONN, ECONNABORTED) or an EIO (nothing here is
tampered with). Prints one JSON line: counts of errnos seen and the violations."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import stat
import sys
from collections import Counter
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
BAD = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}
SIZES = [0, 1, 4095, 65536, (1 << 20) + 1, 2**31, 2**38, 2**38 + 1, 999999999999999, 2**62, 2**63 - 1]
NAME_LENGTHS = [1, 100, 254, 255, 256, 1024]


class Storm:
    def __init__(self, root: Path, seed: int):
        self.root = root
        self.rng = random.Random(seed)
        self.seen: Counter[str] = Counter()
        self.violations: list[str] = []
        self.fds: list[int] = []

    # ------------------------------------------------------------ arguments
    def name(self) -> str:
        r = self.rng.random()
        if r < 0.1:
            return "n" * self.rng.choice(NAME_LENGTHS)
        if r < 0.15:
            return "é" * self.rng.choice([127, 128])          # 254 / 256 bytes
        return self.rng.choice(["a", "b", "c", "dir", "x.txt", ".hidden", "with space", "ünï"])

    def path(self) -> Path:
        parts = [self.name() for _ in range(self.rng.choice([1, 1, 2, 3]))]
        if self.rng.random() < 0.03:
            parts = ["deep"] * self.rng.choice([50, 200, 2000])     # up to PATH_MAX and past it
        return self.root.joinpath(*parts)

    def size(self) -> int:
        return self.rng.choice(SIZES) if self.rng.random() < 0.5 else self.rng.randrange(0, 3 << 20)

    def data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 100, 4096, 131072, 1 << 20]))

    # ------------------------------------------------------------ calls
    def call(self, what: str, fn, *args) -> object:
        try:
            out = fn(*args)
            self.seen["ok"] += 1
            return out
        except OSError as exc:
            code = errno.errorcode.get(exc.errno, str(exc.errno))
            self.seen[code] += 1
            if exc.errno in BAD:
                self.violations.append(f"{what}{args!r:.200}: {code}")
        except (ValueError, OverflowError) as exc:    # refused by Python before any syscall
            self.seen[type(exc).__name__] += 1
        return None

    def renameat2(self, old: Path, new: Path, flags: int) -> None:
        if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def step(self) -> None:
        rng = self.rng
        op = rng.choice(["open", "open", "write", "write", "read", "truncate", "ftruncate", "mkdir",
                         "rmdir", "unlink", "rename", "rename2", "link", "symlink", "xattr", "chmod",
                         "chown", "utime", "stat", "listdir", "close", "fsync", "mknod"])
        p = self.path()
        if op == "open":
            # (O_NONBLOCK: a FIFO made by mknod would block an open for reading forever)
            flags = os.O_NONBLOCK | rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]) | rng.choice(
                [0, os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_TRUNC, os.O_APPEND, os.O_CREAT | os.O_APPEND])
            fd = self.call("open", os.open, p, flags, rng.choice([0o644, 0o600, 0o7777, 0]))
            if fd is not None:
                self.fds.append(fd)
        elif op in ("write", "read", "ftruncate", "fsync", "close") and self.fds:
            fd = rng.choice(self.fds)
            if op == "write":
                self.call("pwrite", os.pwrite, fd, self.data(), self.size())
            elif op == "read":
                self.call("pread", os.pread, fd, rng.choice([0, 1, 1 << 20, 1 << 30]), self.size())
            elif op == "ftruncate":
                self.call("ftruncate", os.ftruncate, fd, self.size())
            elif op == "fsync":
                self.call("fsync", os.fsync, fd)
            else:
                self.fds.remove(fd)
                self.call("close", os.close, fd)
        elif op == "truncate":
            self.call("truncate", os.truncate, p, self.size())
        elif op == "mkdir":
            self.call("mkdir", os.mkdir, p, rng.choice([0o755, 0o7777, 0]))
        elif op == "rmdir":
            self.call("rmdir", os.rmdir, p)
        elif op == "unlink":
            self.call("unlink", os.unlink, p)
        elif op == "rename":
            self.call("rename", os.rename, p, self.path())
        elif op == "rename2":
            self.call("renameat2", self.renameat2, p, self.path(), rng.choice([1, 2, 3, 4, 1 << 30]))
        elif op == "link":
            self.call("link", os.link, p, self.path())
        elif op == "symlink":
            self.call("symlink", os.symlink, "t" * rng.choice([1, 4095, 4096, 5000]), p)
        elif op == "xattr":
            name = rng.choice(["user.a", "user." + "x" * 250, "user." + "x" * 251, "trusted.z",
                               "system.posix_acl_access", "security.selinux", "user."])
            value = b"v" * rng.choice([0, 10, 65536, 65537])
            fn = rng.choice(["set", "get", "list", "remove"])
            if fn == "set":
                self.call("setxattr", os.setxattr, p, name, value, rng.choice([0, 1, 2, 3]))
            elif fn == "get":
                self.call("getxattr", os.getxattr, p, name)
            elif fn == "list":
                self.call("listxattr", os.listxattr, p)
            else:
                self.call("removexattr", os.removexattr, p, name)
        elif op == "chmod":
            self.call("chmod", os.chmod, p, rng.choice([0, 0o7777, 0o4755, 0o1777]))
        elif op == "chown":
            self.call("chown", os.chown, p, rng.choice([-1, 0, 65534, 2**32 - 2]), rng.choice([-1, 0, 65534]))
        elif op == "utime":
            t = rng.choice([0, -1, 2**31, 2**62, -(2**62), 10**18])
            self.call("utime", lambda path: os.utime(path, ns=(t, t)), p)
        elif op == "stat":
            self.call("stat", os.lstat, p)
        elif op == "listdir":
            self.call("listdir", os.listdir, p.parent)
        elif op == "mknod":
            self.call("mknod", os.mknod, p, rng.choice([stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o600,
                                                         stat.S_IFCHR | 0o600, 0o644]), os.makedev(1, 3))

    def run(self, count: int) -> None:
        for _ in range(count):
            self.step()
        for fd in self.fds:
            self.call("close", os.close, fd)


if __name__ == "__main__":
    root, seed, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    storm = Storm(root, seed)
    storm.run(count)
    print(json.dumps({"seen": storm.seen, "violations": storm.violations[:50]}))
