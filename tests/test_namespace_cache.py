"""The mount's metadata cache and its overlay of unsent changes (pure logic, no
server, no FUSE): an answer the server gave before it applied this mount's
records must never put back what those records changed once they are settled."""
from __future__ import annotations

import stat
from uuid import UUID, uuid4

import pytest

from zkfs.errors import TamperedError
from zkfs.format import Attrs
from zkfs.mount.namespace import MetaCache
from zkfs.vault import Node


def node(inode: UUID, *, is_dir: bool, uid: int, version: int = 1) -> Node:
    mode = (stat.S_IFDIR | 0o755) if is_dir else (stat.S_IFREG | 0o644)
    return Node(inode, is_dir, version, 2 if is_dir else 1, Attrs(mode=mode, uid=uid, version=version))


class FakeServer:
    """Answers from its current state; ``between`` runs after an answer is read and
    before it reaches the cache (the server applying our records, the uploader
    settling them: a slow answer)."""

    def __init__(self):
        self.root = uuid4()
        self.nodes: dict[UUID, Node] = {self.root: node(self.root, is_dir=True, uid=0)}
        self.names: dict[UUID, dict[str, UUID]] = {self.root: {}}
        self.ops_applied = 0
        self.between = None
        self.requests = 0
        self.bad: dict[str, Exception] = {}       # entries that fail verification, by name hash

    def _answered(self):
        self.requests += 1
        step, self.between = self.between, None
        if step:
            step()

    def get(self, inode: UUID) -> Node:
        answer = self.nodes[inode]
        self._answered()
        return answer

    def listdir_partial(self, parent: UUID, raw=None, epoch=None):
        answer = (self.nodes[parent], [(n, self.nodes[i]) for n, i in sorted(self.names[parent].items())],
                  dict(self.bad))
        self._answered()
        return answer


def setup():
    server = FakeServer()
    f, d = uuid4(), uuid4()
    server.nodes[f] = node(f, is_dir=False, uid=0)
    server.nodes[d] = node(d, is_dir=True, uid=0)
    server.names[server.root] = {"f": f, "d": d}
    server.names[d] = {}
    cache = MetaCache(server)
    cache.journal_last = lambda: 1
    return server, cache, f, d


def chown_unsent(server, cache, inode: UUID) -> Node:
    """This mount chowns ``inode``: the overlay has it (journal record 1), the server not yet."""
    held = server.nodes[inode]
    ours = node(inode, is_dir=held.is_dir, uid=65534, version=held.version if held.is_dir else held.version + 1)
    cache.put_local(ours)
    return ours


def apply_and_settle(server, cache, ours: Node):
    def step():
        version = server.nodes[ours.id].version + 1      # the server counts every change
        server.nodes[ours.id] = node(ours.id, is_dir=ours.is_dir, uid=ours.attrs.uid, version=version)
        cache.settled(1)
    server.between = step


def test_a_listing_that_crossed_the_settle_of_a_chown_does_not_undo_it():
    server, cache, f, d = setup()
    ours = chown_unsent(server, cache, f)
    apply_and_settle(server, cache, ours)
    listed = dict(cache.listdir(server.root))
    assert listed["f"].attrs.uid == 65534
    assert cache.lookup(server.root, "f").attrs.uid == 65534


def test_a_folder_fetched_across_the_settle_of_its_chown_keeps_the_chown():
    server, cache, f, d = setup()
    ours = chown_unsent(server, cache, d)
    apply_and_settle(server, cache, ours)
    assert cache.node(d, fresh=True).attrs.uid == 65534
    assert cache.node(d).attrs.uid == 65534


def test_a_folder_fetched_before_its_chown_was_settled_is_replaced_by_ours_at_the_settle():
    """A folder's version does not move on this mount (the server counts its
    changes), so an answer from before our change holds the same version as ours."""
    server, cache, f, d = setup()
    chown_unsent(server, cache, d)
    cache.put_node(server.nodes[d])           # fetched while the chown was unsent
    cache.settled(1)
    assert cache.node(d).attrs.uid == 65534


def test_a_listing_that_keeps_crossing_settles_answers_the_call_and_is_not_cached():
    server, cache, f, d = setup()

    def churn():                                  # every answer crosses a settle of the folder
        cache.set_entry(server.root, "gone", None)
        cache.settled(1)
        server.between = churn

    server.between = churn
    server.bad = {"hash": TamperedError("an entry the server edited")}
    assert [name for name, _ in cache.listdir(server.root)] == ["d", "f"]
    with pytest.raises(TamperedError):
        cache.check_listing(server.root)          # the edited entry is an error, not hidden
    server.between, server.bad = None, {}
    asked = server.requests
    cache.listdir(server.root)
    assert server.requests == asked + 1           # nothing of the raced answers was kept
    cache.listdir(server.root)
    assert server.requests == asked + 1           # this one was
