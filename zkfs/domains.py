"""Which keys seal which inode: the account's own, or one of its shared folders'.

An inode's domain is known from where it was reached, never from the server's
word: the account's root and what is reached through its listings are the
account's, a share's root folder is the share's (the grant that opened the
share's keys names it), and every other inode is in the domain of the folder
whose listing named it. So a folder shared with others cannot pass one of the
account's private inodes off as its own: that inode's records would have to open
under the share's keys, which a member holds, and they are sealed under the
account's, which no member holds.

A member reaches a share through a read-only folder that exists on no server,
``/Shared/<owner>/<folder>`` (``VirtualDir``), next to its own files.
"""
from __future__ import annotations

import errno
import threading
from dataclasses import dataclass, field
from uuid import UUID, uuid5

from .errors import ZkfsError
from .sharekeys import Share

SHARED_NAME = "Shared"          # the folder at a member's root holding what others share
_IDS = UUID("6f1c0e52-5a8e-4d7e-9a37-3b1f7c2d0a11")      # uuid5 namespace of the virtual folders


class ShareRefused(ZkfsError):
    """A change no server would take from this account: in /Shared, in a share
    that is read-only for it, across a share's edge, or in one it left."""


class NoLongerShared(ShareRefused):
    errno = errno.ENOENT


@dataclass
class VirtualDir:
    id: UUID
    entries: dict[str, UUID] = field(default_factory=dict)     # name -> a virtual folder or a share's root


class Domains:
    def __init__(self, account_root: UUID):
        self.account_root = account_root
        self.shares: dict[UUID, Share] = {}
        self._roots: dict[UUID, UUID] = {}          # a share's root folder -> the share
        self._inode_share: dict[UUID, UUID] = {}    # inodes known to be in a share -> the share
        self.virtual: dict[UUID, VirtualDir] = {}
        self.generation = 0                         # moves with every change of the shares
        self._lock = threading.Lock()

    @property
    def shared_dir(self) -> UUID:
        return uuid5(_IDS, f"{self.account_root}/{SHARED_NAME}")

    def set_shares(self, shares: dict[UUID, Share]) -> None:
        with self._lock:
            self.shares = shares
            self._roots = {s.root: s.id for s in shares.values()}
            for s in shares.values():
                self._inode_share[s.root] = s.id
            self.virtual = self._virtual_tree([s for s in shares.values() if not s.mine])
            self.generation += 1

    def _virtual_tree(self, received: list[Share]) -> dict[UUID, VirtualDir]:
        if not received:
            return {}
        top = VirtualDir(self.shared_dir)
        tree = {top.id: top}
        for share in sorted(received, key=lambda s: (s.owner.lower(), str(s.id))):
            owner = top.entries.get(share.owner)
            if owner is None:
                owner = top.entries[share.owner] = uuid5(_IDS, f"{self.account_root}/{SHARED_NAME}/{share.owner}")
                tree[owner] = VirtualDir(owner)
            folder, name, n = tree[owner], share.name, 1
            while name in folder.entries:         # two folders of one name: "Projects (2)"
                n += 1
                name = f"{share.name} ({n})"
            folder.entries[name] = share.root
        return tree

    def share_of(self, inode: UUID) -> Share | None:
        """The share ``inode`` is in (None: the account's own). NoLongerShared for an
        inode of a share this account has since been removed from."""
        sid = self._inode_share.get(inode)
        if sid is None:
            return None
        share = self.shares.get(sid)
        if share is None:
            raise NoLongerShared(f"inode {inode} is in a folder no longer shared with this account")
        return share

    def child_share(self, parent_share: Share | None, child: UUID) -> Share | None:
        """The domain of an inode a listing of a folder in ``parent_share`` names (a
        share's root starts its share), remembered for later requests about it."""
        sid = self._roots.get(child)
        share = self.shares.get(sid) if sid is not None else parent_share
        if share is not None:
            self._inode_share[child] = share.id
        return share

    def adopt(self, inode: UUID, share: Share | None) -> None:
        """A new inode (not yet listed anywhere) in ``share``."""
        if share is not None:
            self._inode_share[inode] = share.id

    def share_id(self, inode: UUID) -> UUID | None:
        """The share ``inode`` is known to be in (None: the account's, or not known)."""
        return self._inode_share.get(inode)

    def adopt_id(self, inode: UUID, share: UUID) -> None:
        """``inode`` is in the share of that id (a journal record says so)."""
        self._inode_share[inode] = share

    def is_virtual(self, inode: UUID) -> bool:
        return inode in self.virtual

    def share_rooted_at(self, inode: UUID) -> Share | None:
        sid = self._roots.get(inode)
        return self.shares.get(sid) if sid is not None else None
