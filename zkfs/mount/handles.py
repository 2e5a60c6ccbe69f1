"""The open-file table: one ``OpenFile`` per inode on this mount, however many
descriptors, processes or O_APPEND opens share it (they see each other's writes
at once, and the last close publishes them all), and the handles FUSE passes
back on every read, write and close.

Changed only under the mount's namespace lock, except ``handle()``, the lock-free
lookup of the read/write path."""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from .openfile import OpenFile


@dataclass(frozen=True)
class Handle:
    file: OpenFile
    opener: int | None       # the process (thread group) that opened it
    append: bool             # O_APPEND: writes land at the file's end


@dataclass(frozen=True)
class DirHandle:
    inode: UUID
    parent: UUID             # for ".."
    path: str


class OpenFileTable:
    def __init__(self):
        self._files: dict[UUID, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, DirHandle] = {}       # opendir handles
        self._next_fh = 1

    def get(self, inode: UUID) -> OpenFile | None:
        return self._files.get(inode)

    def files(self) -> list[OpenFile]:
        return list(self._files.values())

    def add(self, of: OpenFile) -> None:
        self._files[of.id] = of

    def drop(self, of: OpenFile) -> bool:
        """Forget ``of`` if it is still this inode's state (a newer open may have
        replaced it)."""
        if self._files.get(of.id) is of:
            del self._files[of.id]
            return True
        return False

    def creating(self) -> list[OpenFile]:
        """New files the server has not seen yet (published with the next batch)."""
        return [of for of in self._files.values() if of.pending is not None and not of.unlinked]

    def open(self, of: OpenFile, path: str | None, opener: int | None, append: bool) -> int:
        if path is not None:
            of.last_path = path
        fh = self._new_fh()
        self._handles[fh] = Handle(of, opener, append)
        of.handles += 1
        return fh

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open_dir(self, folder: DirHandle) -> int:
        fh = self._new_fh()
        self._dirs[fh] = folder
        return fh

    def dir(self, fh: int) -> DirHandle:
        return self._dirs[fh]

    def close_dir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def handle(self, fh: int) -> Handle:
        return self._handles[fh]

    def close(self, fh: int) -> OpenFile:
        of = self._handles.pop(fh).file
        of.handles -= 1
        return of
