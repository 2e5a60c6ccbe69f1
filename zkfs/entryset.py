"""Authenticated directory listings: a keyed, incremental digest of a directory's
entry set, sealed in the directory's own attributes (docs/FORMAT.md §5).

Each entry (parent, name, inode, is-directory) maps to a 256-bit number under a
key the server never sees (``NamespaceKey.entry_element``); the digest is their
sum modulo 2**256, so adding or removing one entry costs one HMAC whatever the
directory's size, and every change to a directory's entries travels in the same
compare-and-swap transaction as the new sealed digest. A listing whose entries do
not add up to the sealed digest was edited by the server: an entry hidden, one
brought back, one swapped for another. The server sees neither the elements nor
the sums (they are inside encrypted attributes), so it cannot aim for a collision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
from uuid import UUID

from .crypto import NamespaceKey

_MOD = 1 << 256


def _element(ns: NamespaceKey, parent: UUID, name: str, inode: UUID, is_dir: bool) -> int:
    # The name itself, not its hash: a rotate-key --full re-hashes every name under
    # the new namespace key, and an entry must stay the same element meanwhile.
    return ns.entry_element(parent, name.encode("utf-8", "surrogateescape"), inode, is_dir)


@dataclass(frozen=True)
class EntrySet:
    digest: int = 0
    count: int = 0
    subdirs: int = 0          # a directory's link count is 2 + this

    def add(self, ns: NamespaceKey, parent: UUID, name: str, inode: UUID, is_dir: bool) -> "EntrySet":
        return EntrySet((self.digest + _element(ns, parent, name, inode, is_dir)) % _MOD,
                        self.count + 1, self.subdirs + is_dir)

    def remove(self, ns: NamespaceKey, parent: UUID, name: str, inode: UUID, is_dir: bool) -> "EntrySet":
        return EntrySet((self.digest - _element(ns, parent, name, inode, is_dir)) % _MOD,
                        self.count - 1, self.subdirs - is_dir)

    @classmethod
    def of(cls, ns: NamespaceKey, parent: UUID, entries: Iterable[tuple[str, UUID, bool]]) -> "EntrySet":
        """The set of ``(name, inode, is_dir)`` entries of directory ``parent``."""
        out = cls()
        for name, inode, is_dir in entries:
            out = out.add(ns, parent, name, inode, is_dir)
        return out

    def to_json(self) -> list:
        return [f"{self.digest:064x}", self.count, self.subdirs]

    @classmethod
    def from_json(cls, doc: list) -> "EntrySet":
        digest, count, subdirs = doc
        if not (isinstance(count, int) and isinstance(subdirs, int) and 0 <= subdirs <= count):
            raise ValueError("bad entry set")
        return cls(int(digest, 16), count, subdirs)
