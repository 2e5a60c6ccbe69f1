"""Metadata cache of the mount: verified nodes and directory entries by id, path
resolution over them, and invalidation from the server's change feed so that
other mounts' changes show up within about a second.

This mount's own changes that the server does not have yet (they wait in the
write-back journal, writeback.py) are an overlay: every answer of the cache and
every listing or node fetched from the server shows them, until the journal's
done mark passes the record that made them (``settled``). With the server away,
what the cache holds answers, however old."""
from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Callable
from uuid import UUID

from ..errors import TamperedError, Unreachable, ZkfsError
from ..format import MAX_NAME_BYTES
from ..vault import Node, Vault, split_path
from .guard import FsError

log = logging.getLogger(__name__)

# Read-ahead of listings: folders per request (small, so the first answer comes
# back before the reader gets there), and a bound on the undecoded listings held.
READ_AHEAD_BATCH = 16
READ_AHEAD_MAX_ENTRIES = 10_000     # ~1 KiB each in memory
READ_AHEAD_WAIT = 2.0           # a reader waits this long for a listing in flight


REFETCH_TRIES = 4              # an answer that crossed a settle of what it returns is asked again
SETTLED_MARKS_KEPT = 100_000


def inode_number(inode: UUID) -> int:
    """st_ino: 63 bits of the inode's id (never 0 or 1)."""
    return (inode.int & 0x7FFF_FFFF_FFFF_FFFF) | 2


class MetaCache:
    def __init__(self, vault: Vault, ttl: float = 30.0):
        self.vault = vault
        self.ttl = ttl
        self.lock = threading.RLock()
        self._nodes: dict[UUID, tuple[Node, float]] = {}
        self._entries: dict[tuple[UUID, str], tuple[UUID | None, float]] = {}
        # Directories whose complete entry list is cached: also answers "no such name".
        self._listed: dict[UUID, tuple[set[str], float]] = {}
        # Resolved paths (getattr/getxattr come by path, many per file): dropped
        # wholesale whenever any entry changes, so never stale.
        self._paths: dict[str, UUID] = {}
        self._paths_gen = 0
        # Entries that failed verification, by directory and name hash: that name
        # gives EIO, its siblings stay usable.
        self._tampered: dict[UUID, dict[str, Exception]] = {}
        self._seq: int | None = None
        # The overlay: entries and nodes as this mount's unsent changes left them,
        # each with the journal position that covers it; folders made here.
        self._local_entries: dict[UUID, dict[str, tuple[UUID | None, int]]] = {}
        self._local_nodes: dict[UUID, tuple[Node, int]] = {}
        self._local_dirs: dict[UUID, int] = {}
        self.journal_last: Callable[[], int] = lambda: 0     # the highest journal record written
        # Called with every answer of the account's change feed (shares: shared.py).
        self.after_poll: Callable[[dict], None] = lambda feed: None
        # Listings read ahead, as the server sent them: decoded (and verified)
        # only when asked for, so one never used costs no decryption.
        self._read_ahead: dict[UUID, tuple[dict, float, int, int]] = {}   # + ops_applied, ledger epoch
        self._wanted: dict[UUID, None] = {}          # ordered set: next to read ahead
        self._in_flight: set[UUID] = set()
        self._reading_ahead = False                  # the background thread runs
        self._read_ahead_ready = threading.Condition(self.lock)
        # Bumped by every entry change (ours or the change feed's); our own new
        # versions move vault.ops_applied. A listing read ahead across either is dropped.
        self._changes = 0
        # An answer the server gave before it applied our records, arriving after they
        # were settled (the overlay no longer covers them), would put back what our
        # records changed: a fetch across a settle of what it returns is made again.
        self._settles = 0
        self._settled_at: dict[UUID, int] = {}       # inode -> settle count when its overlay went
        self._settled_floor = 0                      # (older marks were forgotten)

    # ------------------------------------------------------------ nodes
    def node(self, inode: UUID, *, fresh: bool = False) -> Node:
        """``fresh``: the server's node, not this mount's unsent version of it."""
        for _ in range(REFETCH_TRIES):
            with self.lock:
                local = self._local_nodes.get(inode)
                if local and not fresh:
                    return local[0]
                hit = self._nodes.get(inode)
                if hit and not fresh and time.monotonic() - hit[1] < self.ttl:
                    return hit[0]
                since = self._settles
            try:
                node = self.vault.get(inode)
            except Unreachable:
                if hit is None or fresh:
                    raise
                return hit[0]                # offline: what the cache holds answers
            with self.lock:
                if not self._settled_since(since, [inode]):
                    self.put_node(node)
                    return node
        return node

    def nlink(self, inode: UUID) -> int:
        """Link count of a cached inode (1 when not cached: a file just created)."""
        hit = self._local_nodes.get(inode) or self._nodes.get(inode)
        return hit[0].nlink if hit else 1

    def put_node(self, node: Node) -> None:
        """Cache a node, unless the cache already holds a newer version of it
        (callers may hand back a Node object they looked up before an op)."""
        with self.lock:
            node.manifest_token = None      # manifests are fetched on open, not cached here
            held = self._nodes.get(node.id)
            if held is not None and held[0].version > node.version:
                return
            self._nodes[node.id] = (node, time.monotonic())

    def put_local(self, node: Node) -> None:
        """This mount's own new state of a node, not yet on the server (never an older
        version over a newer one: a caller may hold a node from before its last change)."""
        with self.lock:
            held = self._local_nodes.get(node.id)
            if held is not None and held[0].version > node.version:
                return
            node.manifest_token = None
            self._nodes[node.id] = (node, time.monotonic())
            self._local_nodes[node.id] = (node, self.journal_last())

    def settled(self, done: int) -> None:
        """The server has every journal record up to ``done``: the overlay's changes
        they cover are the server's now (its answers show them from here on)."""
        with self.lock:
            gone: list[UUID] = []
            for inode in [i for i, (_, seq) in self._local_nodes.items() if seq <= done]:
                node = self._local_nodes.pop(inode)[0]
                gone.append(inode)
                held = self._nodes.get(inode)
                # An answer fetched meanwhile may predate our change (the feed never
                # reports our own): ours is the server's version now. A folder's
                # version does not move here (the server counts its changes), so
                # ours is always the newer one.
                if held is not None and (node.is_dir or held[0].version <= node.version):
                    self._nodes[inode] = (node, time.monotonic())
            for d in [d for d, seq in self._local_dirs.items() if seq <= done]:
                del self._local_dirs[d]
                gone.append(d)
            for parent in list(self._local_entries):
                names = self._local_entries[parent]
                for name in [n for n, (_, seq) in names.items() if seq <= done]:
                    del names[name]
                    gone.append(parent)
                if not names:
                    del self._local_entries[parent]
            if gone:
                self._settles += 1
                if len(self._settled_at) > SETTLED_MARKS_KEPT:
                    self._settled_at.clear()
                    self._settled_floor = self._settles
                for inode in gone:
                    self._settled_at[inode] = self._settles

    def _settled_since(self, since: int, inodes) -> bool:
        """(Under the lock.) Whether the overlay of any of ``inodes`` was settled
        after settle count ``since`` (an answer asked for before may predate it)."""
        if since < self._settled_floor:
            return True
        return any(self._settled_at.get(i, 0) > since for i in inodes)

    def has_local(self, inode: UUID) -> bool:
        return inode in self._local_nodes

    def drop_local_node(self, inode: UUID) -> None:
        """Forget this mount's unsent state of a node (the server refused it)."""
        with self.lock:
            self._local_nodes.pop(inode, None)
            self.forget(inode)

    def drop_local(self, parent: UUID, name: str) -> None:
        """Forget this mount's unsent change of an entry (the server refused it)."""
        with self.lock:
            self._local_entries.get(parent, {}).pop(name, None)
            self.forget(parent)

    def _drop_paths(self) -> None:
        self._paths.clear()
        self._paths_gen += 1

    def forget(self, inode: UUID) -> None:
        with self.lock:
            self._drop_paths()
            self._changes += 1
            self._read_ahead.pop(inode, None)
            self._nodes.pop(inode, None)
            self._listed.pop(inode, None)
            for key in [k for k in self._entries if k[0] == inode]:
                del self._entries[key]

    # ------------------------------------------------------------ entries
    def lookup(self, parent: UUID, name: str) -> Node | None:
        with self.lock:
            local = self._local_entries.get(parent, {}).get(name)
            if local is not None:
                if local[0] is None:
                    return None
                node = self._local_node_or_cached(local[0])
                if node is not None:
                    return node
        if local is not None:
            return self.node(local[0])
        with self.lock:
            now = time.monotonic()
            hit = self._entries.get((parent, name))
            if hit and now - hit[1] < self.ttl:
                if hit[0] is None:
                    return None
                cached = self._fresh_node(hit[0], now)
                if cached is not None:
                    return cached
            listed = self._listed.get(parent)
            if listed and now - listed[1] < self.ttl:
                if name not in listed[0]:
                    self._raise_if_tampered(parent, name)
                    return None
                entry = self._entries.get((parent, name))
                cached = self._fresh_node(entry[0], now) if entry and entry[0] else None
                if cached is not None:
                    return cached
        # A miss loads the whole directory (one request, readdir-plus): tools that
        # stat every name of a tree (rsync, ls -l, find) then run from the cache.
        for entry_name, node in self.listdir(parent):
            if entry_name == name:
                return node
        self._raise_if_tampered(parent, name)
        return None

    def _fresh_node(self, inode: UUID, now: float) -> Node | None:
        """(Under the lock.) The overlay's node, else the cache's if still fresh."""
        local = self._local_nodes.get(inode)
        if local is not None:
            return local[0]
        hit = self._nodes.get(inode)
        return hit[0] if hit and now - hit[1] < self.ttl else None

    def _local_node_or_cached(self, inode: UUID) -> Node | None:
        """(Under the lock.) The overlay's node, else the cache's however old."""
        hit = self._local_nodes.get(inode) or self._nodes.get(inode)
        return hit[0] if hit else None

    def cached_inode(self, path: str) -> tuple[bool, UUID | None]:
        """What the cache alone says ``path`` names: ``(True, inode)``, ``(True, None)``
        for no such name, or ``(False, None)`` when only the server could say."""
        with self.lock:
            inode = self._paths.get(path)
            if inode is not None:
                return True, inode
            now = time.monotonic()
            current = self.vault.root
            for part in split_path(path):
                local = self._local_entries.get(current, {}).get(part)
                if local is not None:
                    if local[0] is None:
                        return True, None
                    current = local[0]
                    continue
                hit = self._entries.get((current, part))
                if hit and now - hit[1] < self.ttl:
                    if hit[0] is None:
                        return True, None
                    current = hit[0]
                    continue
                listed = self._listed.get(current)
                if listed and now - listed[1] < self.ttl and part not in listed[0]:
                    return True, None
                return False, None
            return True, current

    def check_listing(self, parent: UUID) -> None:
        """A listing with an entry that failed verification is an error (EIO):
        hiding the entry quietly would be a listing the server chose."""
        bad = self._tampered.get(parent)
        if bad:
            raise next(iter(bad.values()))

    def _raise_if_tampered(self, parent: UUID, name: str) -> None:
        bad = self._tampered.get(parent)
        if bad:
            exc = bad.get(self.vault.name_hash(parent, name))
            if exc is not None:
                raise exc

    def set_entry(self, parent: UUID, name: str, node: Node | None) -> None:
        """This mount's own change of an entry (the overlay has it until settled)."""
        with self.lock:
            self._drop_paths()
            self._changes += 1
            self._read_ahead.pop(parent, None)
            self._entries[(parent, name)] = (node.id if node else None, time.monotonic())
            self._local_entries.setdefault(parent, {})[name] = (node.id if node else None, self.journal_last())
            if node and node.id not in self._local_nodes:   # (a newer state of it stays)
                self.put_local(node)
            listed = self._listed.get(parent)
            if listed:
                (listed[0].add if node else listed[0].discard)(name)

    def new_dir(self, inode: UUID) -> None:
        """A directory we just created: known to be empty (and to the server, not
        before its create is sent)."""
        with self.lock:
            self._listed[inode] = (set(), time.monotonic())
            self._local_dirs[inode] = self.journal_last()

    def listdir(self, parent: UUID) -> list[tuple[str, Node]]:
        for _ in range(REFETCH_TRIES):
            with self.lock:
                hit = self._listed.get(parent)
                if hit and time.monotonic() - hit[1] < self.ttl:
                    out = self._cached_listing(parent)
                    if out is not None:
                        return out
                if parent in self._local_dirs:        # made here, unknown to the server yet
                    return self._overlaid(parent, {})
                held = self._take_read_ahead(parent)
                since = self._settles
            try:
                directory, entries, bad = self.vault.listdir_partial(parent, *(held or (None, None)))
            except Unreachable:
                with self.lock:
                    out = self._cached_listing(parent) if parent in self._listed else None
                if out is None:
                    raise
                return out                           # offline: what the cache holds answers
            with self.lock:
                raced = self._settled_since(since, [parent, directory.id, *(n.id for _, n in entries)])
            if not raced:
                break
        # (raced still: settles kept crossing it; it answers this call, the cache keeps nothing of it)
        if not raced:
            self.put_node(directory)
        for exc in bad.values():
            log.error("directory %s: an entry failed verification: %s", parent, exc)
        self._fetch_missing(parent, {name for name, _ in entries})
        with self.lock:
            if bad:
                self._tampered[parent] = bad
            else:
                self._tampered.pop(parent, None)
            # This mount's unsent changes of the folder stand over what the server said.
            entries = self._overlaid(parent, dict(entries))
            if raced:
                return entries
            now = time.monotonic()
            fresh = {name: node.id for name, node in entries}
            stale = False
            for key in [k for k in self._entries if k[0] == parent]:
                stale = stale or self._entries[key][0] not in (None, fresh.get(key[1]))
                del self._entries[key]
            if stale:     # a cached path may go through an entry that changed
                self._drop_paths()
            for name, node in entries:
                self._entries[(parent, name)] = (node.id, now)
                if node.id not in self._local_nodes:
                    self._nodes[node.id] = (node, now)
            self._listed[parent] = ({n for n, _ in entries}, now)
            self._want([node.id for _, node in entries if node.is_dir])
        return entries

    def _cached_listing(self, parent: UUID) -> list[tuple[str, Node]] | None:
        """(Under the lock.) The cached listing of ``parent`` if every node of it is
        still cached (by name, as a fetched one)."""
        out = []
        for name in sorted(self._listed[parent][0]):
            entry = self._entries.get((parent, name))
            node = self._local_node_or_cached(entry[0]) if entry and entry[0] else None
            if node is None:
                return None
            out.append((name, node))
        return out

    def _fetch_missing(self, parent: UUID, fetched: set[str]) -> None:
        """Nodes the overlay puts into ``parent`` that the cache lost (another
        machine changed them): fetched again, before the overlay is applied."""
        with self.lock:
            missing = [inode for name, (inode, _) in self._local_entries.get(parent, {}).items()
                       if inode is not None and self._local_node_or_cached(inode) is None]
        for inode in missing:
            self.node(inode)

    def _overlaid(self, parent: UUID, entries: dict[str, Node]) -> list[tuple[str, Node]]:
        """(Under the lock.) ``entries`` of ``parent`` with this mount's unsent changes
        applied, by name (find walks readdir's order, ls -R sorts; subfolders are
        read ahead in that order too)."""
        for name, (inode, _) in self._local_entries.get(parent, {}).items():
            node = self._local_node_or_cached(inode) if inode is not None else None
            if node is None:
                entries.pop(name, None)
            else:
                entries[name] = node
        return sorted(((name, self._local_nodes.get(n.id, (n,))[0]) for name, n in entries.items()),
                      key=lambda e: e[0])

    # ------------------------------------------------------------ read-ahead
    # A folder just listed is followed by its subfolders (ls -R, find, rsync, a
    # file manager's item counts): their listings come in one request from a
    # background thread instead of one round trip each when asked for.
    def _take_read_ahead(self, parent: UUID) -> tuple[dict, int] | None:
        """(Under the lock.) The listing read ahead for ``parent`` and the ledger
        epoch it was asked at, waiting a little if it is in flight; None if there
        is none (fetch it now)."""
        deadline = time.monotonic() + READ_AHEAD_WAIT
        while parent in self._in_flight and time.monotonic() < deadline:
            self._read_ahead_ready.wait(deadline - time.monotonic())
        held = self._read_ahead.pop(parent, None)
        return (held[0], held[3]) if held and self._still_valid(held, time.monotonic()) else None

    def _still_valid(self, held: tuple[dict, float, int, int], now: float) -> bool:
        """A listing read ahead is used only within the cache ttl and if none of
        our own ops was answered since it was fetched."""
        _, fetched_at, applied, _ = held
        return now - fetched_at < self.ttl and applied == self.vault.ops_applied

    def _want(self, dirs: list[UUID]) -> None:
        if not self._reading_ahead:
            return
        for d in dirs:
            if d not in self._listed and d not in self._read_ahead and d not in self._in_flight:
                self._wanted[d] = None
        if self._wanted:
            self._read_ahead_ready.notify_all()

    def _next_batch(self, stop: threading.Event) -> list[UUID]:
        with self.lock:
            while not self._wanted and not stop.is_set():
                self._read_ahead_ready.wait(1.0)
            now = time.monotonic()
            for d in [d for d, held in self._read_ahead.items() if not self._still_valid(held, now)]:
                del self._read_ahead[d]
            if sum(len(raw["entries"]) for raw, _, _, _ in self._read_ahead.values()) >= READ_AHEAD_MAX_ENTRIES:
                self._wanted.clear()             # nobody is reading these: stop
                return []
            batch = list(self._wanted)[:READ_AHEAD_BATCH]
            for d in batch:
                del self._wanted[d]
            self._in_flight.update(batch)
            return batch

    def _read_ahead_batch(self, batch: list[UUID]) -> None:
        with self.lock:
            changes, applied = self._changes, self.vault.ops_applied
        since = self.vault.ledger.epoch()
        found = {}
        try:
            found = self.vault.list_dirs(batch)
        except ZkfsError as exc:
            log.debug("listing read-ahead: %s", exc)
        finally:
            with self.lock:
                if changes == self._changes and applied == self.vault.ops_applied:
                    now = time.monotonic()
                    for d, raw in found.items():
                        if d not in self._listed:        # fetched meanwhile by a reader
                            self._read_ahead[d] = (raw, now, applied, since)
                self._in_flight.difference_update(batch)
                self._read_ahead_ready.notify_all()

    def start_read_ahead(self, stop: threading.Event) -> threading.Thread:
        def run():
            while not stop.is_set():
                batch = self._next_batch(stop)
                if batch:
                    try:
                        self._read_ahead_batch(batch)
                    except Exception:
                        log.exception("listing read-ahead failed")
        t = threading.Thread(target=run, name="zkfs-read-ahead", daemon=True)
        self._reading_ahead = True
        t.start()
        return t

    # ------------------------------------------------------------ paths
    def resolve(self, path: str) -> Node:
        with self.lock:
            inode = self._paths.get(path)
            local = self._local_nodes.get(inode) if inode else None
            if local is not None:
                return local[0]            # this mount's unsent state comes first
            hit = self._nodes.get(inode) if inode else None
            if hit and time.monotonic() - hit[1] < self.ttl:
                return hit[0]
            gen = self._paths_gen
        node = self._walk(path)
        with self.lock:
            if gen == self._paths_gen:        # no entry changed while we walked
                self._paths[path] = node.id
        return node

    def _walk(self, path: str) -> Node:
        node = self.node(self.vault.root)
        for part in split_path(path):
            if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise FsError(errno.ENAMETOOLONG)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            child = self.lookup(node.id, part)
            if child is None:
                raise FsError(errno.ENOENT)
            node = child
        return node

    def resolve_parent(self, path: str) -> tuple[Node, str]:
        parts = split_path(path)
        if not parts:
            raise FsError(errno.EBUSY)         # the root has no parent entry
        parent = self.resolve("/".join(parts[:-1]))
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        return parent, parts[-1]

    # ------------------------------------------------------------ change feed
    def poll_changes(self) -> None:
        """Drop everything another writer changed since the last poll."""
        # The account's change counter only grows: an older position than the feed or
        # our own ops showed before this request is a server replaying an old state.
        seen = max([self._seq or 0, *list(self.vault.own_seqs)])
        feed = self.vault.api.changes(self._seq or 0)
        self.vault.note_key_gen(feed["key_gen"])
        self.after_poll(feed)
        if feed["seq"] < seen:
            raise TamperedError(f"the change feed went back from position {seen} to {feed['seq']}")
        if self._seq is None:               # the first poll only sets where to start
            self._seq = feed["seq"]
            return
        own = self.vault.own_seqs
        with self.lock:
            for raw, seq in zip(feed["inodes"], feed["seqs"]):
                if seq not in own:           # our own changes are already in the cache
                    self.forget(UUID(str(raw)))
            self._seq = feed["seq"]
            own.difference_update([s for s in list(own) if s <= self._seq])

    def start_poller(self, interval: float, stop: threading.Event, on_change=None) -> threading.Thread:
        def run():
            while not stop.wait(interval):
                try:
                    before = self._seq
                    self.poll_changes()
                    if on_change and before != self._seq:
                        on_change()
                except TamperedError as exc:
                    log.error("change feed: integrity check failed: %s", exc)
                except ZkfsError as exc:
                    log.warning("change feed: %s", exc)
                except Exception:
                    log.exception("change feed failed")
        t = threading.Thread(target=run, name="zkfs-changes", daemon=True)
        t.start()
        return t
