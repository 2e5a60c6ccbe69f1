"""The mount's side of shared folders (zkfs/sharing.py, zkfs/domains.py).

* ``SharedFeeds``: a member's mount follows each share of another account's
  through that share's change feed (their changes show up within a poll, like
  another mount's of its own account), and reloads its shares when the account's
  feed says they changed: a folder shared with it appears under /Shared, and one
  it was removed from disappears, within a poll.
* ``SharedOps`` (mixed into ZkfsOperations): before a file is opened for writing,
  a read-only share refuses (EACCES, as the server would), and a file whose key
  dates from before its share's last key rotation gets a new key first, so the
  member removed then cannot read the new version.
"""
from __future__ import annotations

import logging
from uuid import UUID

from ..errors import ServerError, TamperedError
from ..rotation import reencrypt_file
from ..vault import Node, Vault
from . import records
from .namespace import MetaCache

log = logging.getLogger(__name__)


class SharedFeeds:
    def __init__(self, meta: MetaCache):
        self.meta, self.vault = meta, meta.vault
        self.seqs: dict[UUID, int] = {}          # each share's feed position (its owner's account's seq)
        self._shown = self._view()

    def _view(self) -> set[UUID]:
        """What the folders of others' shares are reached through: the account root,
        /Shared's folders and the shares' roots."""
        d = self.vault.domains
        return {self.vault.root, *d.virtual, *(s.root for s in d.shares.values() if not s.mine)}

    def poll(self, feed: dict) -> None:
        if self.vault.note_shares(feed.get("shares_seq", 0)):
            self._refresh_view()
        for share in [s for s in self.vault.domains.shares.values() if not s.mine]:
            try:
                self._poll_share(share.id)
            except ServerError as exc:
                if exc.code != "not_found":
                    raise
                log.info("share %s of %s is gone: reloading shares", share.name, share.owner)
                self.vault.reload_shares()
                self._refresh_view()

    def _refresh_view(self) -> None:
        now = self._view()
        for inode in self._shown | now:
            self.meta.forget(inode)
        self._shown = now
        for gone in [sid for sid in self.seqs if sid not in self.vault.domains.shares]:
            del self.seqs[gone]

    def _poll_share(self, share: UUID) -> None:
        feed = self.vault.api.changes(self.seqs.get(share, 0), share)
        own = self.vault.own_share_seqs.setdefault(share, set())
        seen = self.seqs.get(share)
        if seen is None:                   # the first poll only sets where to start
            self.seqs[share] = feed["seq"]
            return
        if feed["seq"] < max([seen, *own]):
            raise TamperedError(f"the change feed of share {share} went back from {seen} to {feed['seq']}")
        with self.meta.lock:
            for raw, seq in zip(feed["inodes"], feed["seqs"]):
                if seq not in own:
                    self.meta.forget(UUID(str(raw)))
            self.seqs[share] = feed["seq"]
            own.difference_update([s for s in list(own) if s <= feed["seq"]])


_PARENTS = ("parent", "sp", "dp", "ap", "bp")


def _ids(body: dict) -> list[UUID]:
    return [UUID(body[k]) for k in _PARENTS if k in body] + [UUID(i) for i in records.named_inodes(body)]


def stamp_record(vault: Vault, body: dict) -> None:
    """The share a record's inodes are in, written into it: a mount restarted with
    it unsent sends it into that share, sealed under its keys, before any listing
    has said where its inodes are (``adopt_record``)."""
    sid = next((s for s in map(vault.domains.share_id, _ids(body)) if s is not None), None)
    if sid is not None:
        body["share"] = str(sid)


def adopt_record(vault: Vault, body: dict) -> None:
    if "share" in body:
        for inode in _ids(body):
            vault.domains.adopt_id(inode, UUID(body["share"]))


def check_record(vault: Vault, body: dict) -> None:
    """Before a change is journaled: refused now (EACCES, EXDEV) if the server would
    refuse it later, when the caller can no longer be told."""
    t = body["t"]
    if t == "rename":
        vault.same_domain(UUID(body["sp"]), UUID(body["dp"]))
    elif t == "exchange":
        vault.same_domain(UUID(body["ap"]), UUID(body["bp"]))
    elif t == "link":
        vault.same_domain(UUID(body["inode"]), UUID(body["parent"]))
    elif t == "create":         # the new inode is in its folder's share from now on
        vault.domains.adopt(UUID(body["inode"]), vault.check_writable(UUID(body["parent"])))
    elif "parent" in body:
        vault.check_writable(UUID(body["parent"]))
    elif "inode" in body:
        vault.check_writable(UUID(body["inode"]))


class SharedOps:
    """(Mixed into ZkfsOperations.)"""

    def _before_write(self, node: Node) -> Node:
        """(Under the namespace lock.) ``node`` about to be opened for writing."""
        self.vault.check_writable(node.id)
        if not self.vault.stale_key(node):
            return node
        of = self.table.get(node.id)
        if of is not None and not of.clean:
            return node              # its unpublished changes were started under the old key
        log.info("inode %s: a new file key before writing (its share's keys rotated)", node.id)
        reencrypt_file(self.vault, node.id)
        self.meta.forget(node.id)
        return self.meta.node(node.id, fresh=True)
