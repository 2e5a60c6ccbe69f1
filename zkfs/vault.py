"""The encrypted namespace and content, as the CLI and the mount both see it.

A ``Vault`` turns server records into verified plaintext (``Node``s, names,
chunks) and plaintext intentions into server ops. Every record from the server
is authenticated and checked against the version ledger before it is used.

Inodes in a shared folder are sealed under that share's keys and, for a member,
reached in the owner's account through the share (zkfs/domains.py says which
inode is whose); a member sees the folders shared with it under ``/Shared``.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, TypeVar
from uuid import UUID, uuid4

from . import crypto
from .account import Keyring
from .api import ApiClient
from .crypto import BinaryFernet, IntegrityError, NamespaceKey
from .domains import SHARED_NAME, Domains, ShareRefused
from .errors import ServerError, StaleAnswer, StaleError, TamperedError, ZkfsError
from .entryset import EntrySet
from .format import (CHUNK_SIZE, SEGMENT_SIZE, Attrs, ChunkRef, HOLE_REF, Manifest, b64decode, b64encode,
                     open_chunk, open_name, open_segments, seal_chunk, seal_name, segment_span, encode_name)
from .ops import EntryChange, Op, Plan, plan
from .sharekeys import Share, ShareBook
from .state import VersionLedger

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Node:
    id: UUID
    is_dir: bool
    version: int
    nlink: int
    attrs: Attrs
    manifest_token: bytes | None = None
    old_seal: bool = False                # attributes sealed under a retired namespace key
    sealed_by: NamespaceKey | None = field(default=None, repr=False, compare=False)
    virtual: bool = False                 # /Shared and its owners' folders: on no server

    @property
    def link_count(self) -> int:
        """A directory's from its sealed entry set (2 + subdirectories); a file's
        (and a directory's sealed before entry sets) is the server's count."""
        entries = self.attrs.entries
        return 2 + entries.subdirs if self.is_dir and entries is not None else self.nlink


_SAME = object()


class Vault:
    def __init__(self, api: ApiClient, keyring: Keyring, root: UUID, ledger: VersionLedger,
                 unlock: Callable[[], Keyring], book: ShareBook | None = None):
        self.api = api
        self.keyring = keyring
        self._unlock = unlock            # fetches and unlocks the account's keys again
        self.root = root
        self.ledger = ledger
        self.book = book                 # loads the shares (None: none are used)
        self.domains = Domains(root)
        self.shares_seq: int | None = None    # the feed's shares counter when they were loaded
        # By inode: the cipher of the file key last fetched, that key's id and generation.
        self._file_keys: OrderedDict[UUID, tuple[BinaryFernet, bytes, int | None]] = OrderedDict()
        # While a rotate-key --full runs, entries found under a retired namespace
        # key keep their old name hash until they are re-sealed: ops on them name it.
        self._old_hashes: dict[tuple[UUID, str], str] = {}
        self._keys_lock = threading.Lock()
        self.own_seqs: set[int] = set()      # change-feed seqs of our own ops
        self.own_share_seqs: dict[UUID, set[int]] = {}   # ... in shares of other accounts (their seqs)
        # Directories as last verified: the base of the next change of their entries.
        self._dirs: OrderedDict[UUID, Node] = OrderedDict()
        # Told of every directory state newer than the one held (the mount's cache).
        self.on_dir_change: Callable[[Node], None] = lambda node: None
        # Counts batches of ops once they are answered (or failed): a listing
        # fetched before the count moved may predate one of our own changes.
        self.ops_applied = 0
        # Verified manifests by (inode, digest of the token): a file reopened, or read
        # with the server away, or whose attributes alone changed, needs no fetch.
        self._manifests: OrderedDict[tuple[UUID, bytes], Manifest] = OrderedDict()
        if book is not None:
            self.reload_shares()

    @property
    def ns(self) -> NamespaceKey:
        """The namespace key new names and attributes of the account are sealed under."""
        return self.keyring.namespace

    # ------------------------------------------------------------ domains
    def reload_shares(self) -> None:
        """Load (again) the shares this account owns or belongs to."""
        if self.book is not None:
            self.domains.set_shares(self.book.load(self.keyring))

    def note_shares(self, seq: int) -> bool:
        """The feed's shares counter: when it moved, the shares are loaded again.
        Returns whether they were."""
        if seq == self.shares_seq:
            return False
        first = self.shares_seq is None
        self.shares_seq = seq
        if first:
            return False
        log.info("shares changed: reloading them")
        self.reload_shares()
        return True

    def share_of(self, inode: UUID) -> Share | None:
        return self.domains.share_of(inode)

    def keys_of(self, inode: UUID) -> Keyring:
        """The keys sealing ``inode``: its share's, or the account's."""
        share = self.domains.share_of(inode)
        return share.keys if share is not None else self.keyring

    def ns_of(self, inode: UUID) -> NamespaceKey:
        """The namespace key ``inode``'s new names and attributes are sealed under."""
        return self.keys_of(inode).namespace

    def scope_of(self, inode: UUID) -> UUID | None:
        """The share requests about ``inode`` go into (None: the account's own)."""
        share = self.domains.share_of(inode)
        return share.scope if share is not None else None

    def check_writable(self, inode: UUID) -> Share | None:
        """The share of ``inode`` (a folder to change, or an inode), if this account
        may change it: not /Shared's folders, not a read-only share (the server
        refuses too)."""
        if self.domains.is_virtual(inode):
            raise ShareRefused(f"{SHARED_NAME} holds the folders others share with you: nothing can be "
                            "created, moved or changed there", errno=errno.EACCES)
        share = self.domains.share_of(inode)
        if share is not None and share.read_only:
            raise ShareRefused(f"{share.owner} shares {share.name} with you read-only", errno=errno.EACCES)
        return share

    def same_domain(self, a: UUID, b: UUID) -> Share | None:
        """Both folders' share (they must have the same): nothing moves into or out
        of a shared folder, it is copied (EXDEV: mv and file managers copy)."""
        share = self.check_writable(a)
        if self.check_writable(b) is not share:
            raise ShareRefused("nothing moves into or out of a shared folder: copy it instead", errno=errno.EXDEV)
        return share

    def stale_key(self, node: Node) -> bool:
        """Whether a new version of this file must get a new key: its key dates from
        before its share's keys last rotated (an unshare), so a removed member may
        hold it."""
        share = self.domains.share_of(node.id)
        if share is None or not node.attrs.is_reg:
            return False
        self.file_cipher(node.id, node.attrs.key_id)
        with self._keys_lock:
            held = self._file_keys.get(node.id)
        return held is not None and held[2] is not None and held[2] < share.current_gen

    def _virtual_node(self, inode: UUID) -> Node:
        vdir = self.domains.virtual[inode]
        now = time.time_ns()
        attrs = Attrs(mode=stat.S_IFDIR | 0o555, uid=os.getuid(), gid=os.getgid(), atime_ns=now,
                      mtime_ns=now, ctime_ns=now)
        return Node(inode, True, self.domains.generation, 2 + len(vdir.entries), attrs, virtual=True)

    def _virtual_listing(self, inode: UUID) -> list[tuple[str, Node]]:
        out = []
        for name, child in self.domains.virtual[inode].entries.items():
            if self.domains.is_virtual(child):
                out.append((name, self._virtual_node(child)))
                continue
            try:
                out.append((name, self.get(child)))
            except ServerError as exc:      # removed meanwhile: the next reload drops it
                if exc.code != "not_found":
                    raise
        return out

    def _with_shared(self, inode: UUID, entries: list[tuple[str, Node]]) -> list[tuple[str, Node]]:
        """The account root's entries plus /Shared, when others share folders with it
        (it stands in for a real folder of that name, which it hides)."""
        if inode != self.root or not self.domains.virtual:
            return entries
        return [e for e in entries if e[0] != SHARED_NAME] + \
            [(SHARED_NAME, self._virtual_node(self.domains.shared_dir))]

    # ------------------------------------------------------------ reading
    def open_attrs(self, inode: UUID, token: bytes, version: int, keys: Keyring | None = None
                   ) -> tuple[Attrs, NamespaceKey]:
        """Attributes and the namespace key that sealed them (the current one, or
        one a rotate-key --full has not yet moved them from). ``keys``: the domain's
        (default: as known for ``inode``)."""
        keys = keys or self.keys_of(inode)
        errors = []
        for attempt in range(2):
            for ns in keys.readers:
                try:
                    return Attrs.decrypt(ns, token, inode, version), ns
                except IntegrityError as exc:
                    errors.append(str(exc))
            keys = self._newer_share_keys(keys) if attempt == 0 else None
            if keys is None:
                break
        why = next((e for e in errors if e != "authentication failed"), errors[0])
        raise TamperedError(f"attributes of inode {inode} failed verification: {why}")

    def _newer_share_keys(self, keys: Keyring) -> Keyring | None:
        """A record did not open under a share's keys: the share's keys loaded again,
        if a new generation came meanwhile (an unshare elsewhere re-sealed it)."""
        if keys.share is None:
            return None
        now = self.domains.shares.get(keys.share)
        if now is None or now.current_gen == keys.current_gen:     # not loaded again since
            self.reload_shares()
            now = self.domains.shares.get(keys.share)
        return now.keys if now is not None and now.current_gen != keys.current_gen else None

    def node_from_wire(self, d: dict, since: int | None = None, share: Share | None | object = _SAME) -> Node:
        """A verified node. ``since``: the ledger epoch when the request was sent
        (StaleAnswer if the answer crossed one of our own commits). ``share``: its
        domain, when the caller knows it (from the listing that named it)."""
        inode = UUID(d["id"])
        keys = self.keys_of(inode) if share is _SAME else share.keys if share is not None else self.keyring
        attrs, ns = self.open_attrs(inode, b64decode(d["meta"]), d["version"], keys)
        if all(ns is not k for k in keys.readers):
            keys = self.keys_of(inode)          # its share's keys were loaded again meanwhile
        if attrs.is_dir != d["is_dir"]:
            raise TamperedError(f"inode {inode}: server's type disagrees with its attributes")
        if not self.ledger.check(inode, d["version"], since):
            raise StaleAnswer(f"inode {inode}: an answer older than our own commit")
        manifest = d.get("manifest")
        node = Node(inode, d["is_dir"], d["version"], d["nlink"], attrs, b64decode(manifest) if manifest else None,
                    ns is not keys.namespace, ns)
        if node.is_dir:
            self._note_dir(node)
        return node

    def _fresh(self, fetch: Callable[[], object], decode: Callable[[object, int], T]) -> T:
        """``decode(fetch(), since)``, asked again while the answer crossed one of our
        own commits (a second stale answer is a rollback: the ledger raises)."""
        while True:
            since = self.ledger.epoch()
            try:
                return decode(fetch(), since)
            except StaleAnswer:
                continue

    def get(self, inode: UUID) -> Node:
        if self.domains.is_virtual(inode):
            return self._virtual_node(inode)
        scope = self.scope_of(inode)
        return self._fresh(lambda: self.api.get_inode(inode, scope), self.node_from_wire)

    def _entry(self, parent: UUID, d: dict, since: int | None, share: Share | None) -> tuple[str, Node]:
        node = self.node_from_wire(d["inode"], since, self.domains.child_share(share, UUID(d["inode"]["id"])))
        return self.open_entry_name(parent, d, node.id)[0], node

    def open_entry_name(self, parent: UUID, d: dict, inode: UUID) -> tuple[str, NamespaceKey]:
        """An entry's name and the namespace key that sealed it (see open_attrs)."""
        errors = []
        keys = self.keys_of(parent)
        for attempt in range(2):
            for ns in keys.readers:
                try:
                    name = open_name(ns, b64decode(d["name"]), parent=parent, inode=inode, name_hash=d["name_hash"])
                except IntegrityError as exc:
                    errors.append(str(exc))
                    continue
                if ns is keys.namespace:
                    self._old_hashes.pop((parent, name), None)
                else:
                    self._old_hashes[(parent, name)] = d["name_hash"]
                return name, ns
            keys = self._newer_share_keys(keys) if attempt == 0 else None
            if keys is None:
                break
        why = next((e for e in errors if e != "authentication failed"), errors[0])
        raise TamperedError(f"an entry of directory {parent} failed verification: {why}")

    def lookup(self, parent: UUID, name: str) -> Node | None:
        """From the directory's verified listing: a single-entry answer could be an
        entry the server brought back or the absence of one it hides."""
        for found, node in self.listdir(parent):
            if found == name:
                return node
        return None

    def listdir(self, inode: UUID) -> list[tuple[str, Node]]:
        if self.domains.is_virtual(inode):
            return self._virtual_listing(inode)

        def decode(listing: dict, since: int) -> list[tuple[str, Node]]:
            _, entries, bad = self._listing(inode, listing, since)
            if bad:
                raise next(iter(bad.values()))
            return self._with_shared(inode, entries)
        scope = self.scope_of(inode)
        return self._fresh(lambda: self.api.list_dir(inode, scope), decode)

    def list_dirs(self, inodes: list[UUID]) -> dict[UUID, dict]:
        """The server's listings of several folders (``api.list_dirs``), one request
        per share they are in; /Shared's folders are left out (no server has them)."""
        by_scope: dict[UUID | None, list[UUID]] = {}
        for inode in inodes:
            if not self.domains.is_virtual(inode):
                by_scope.setdefault(self.scope_of(inode), []).append(inode)
        found = {}
        for scope, batch in by_scope.items():
            found |= self.api.list_dirs(batch, scope)
        return found

    def listdir_partial(self, inode: UUID, listing: dict | None = None, since: int | None = None
                        ) -> tuple[Node, list[tuple[str, Node]], dict[str, TamperedError]]:
        """The directory's node and its entries, with the entries that fail
        verification returned apart (by name hash) instead of failing the whole
        directory (then its completeness is unproven: the caller must not take a
        name's absence from it); a listing that does not add up to the directory's
        sealed entry set fails whole. ``listing``: the server's answer when already
        fetched (``api.list_dirs``) at ledger epoch ``since``."""
        if self.domains.is_virtual(inode):
            return self._virtual_node(inode), self._virtual_listing(inode), {}

        def decode(raw: dict, since: int | None):
            directory, entries, bad = self._listing(inode, raw, since)
            return directory, self._with_shared(inode, entries), bad
        if listing is not None:
            try:
                return decode(listing, since)
            except StaleAnswer:
                pass                 # read ahead before one of our own commits: ask again
        scope = self.scope_of(inode)
        return self._fresh(lambda: self.api.list_dir(inode, scope), decode)

    def _listing(self, inode: UUID, listing: dict, since: int | None
                 ) -> tuple[Node, list[tuple[str, Node]], dict[str, TamperedError]]:
        """Decode a listing: the directory (ledger-checked), its verified entries, and
        those that fail apart. If all entries open, they must add up to the entry set
        sealed in the directory's attributes (FORMAT.md §5)."""
        share = self.share_of(inode)
        try:
            directory, raw = self.node_from_wire(listing["dir"], since, share), listing["entries"]
        except (KeyError, TypeError, ValueError) as exc:
            raise TamperedError(f"malformed listing of directory {inode} ({exc.__class__.__name__})") from None
        if directory.id != inode or not directory.is_dir:
            raise TamperedError(f"the listing of directory {inode} came with another inode")
        good, bad = [], {}
        for d in raw:
            try:
                good.append(self._entry(inode, d, since, share))
            except TamperedError as exc:
                bad[d["name_hash"]] = exc
        sealed = directory.attrs.entries
        if not bad and sealed is not None and sealed != self._entry_set(directory, good):
            raise TamperedError(f"the listing of directory {inode} does not match its sealed entry set: "
                                f"the server hid, added or swapped an entry")
        return directory, good, bad

    def _entry_set(self, directory: Node, entries: list[tuple[str, Node]]) -> EntrySet:
        """The entry set of ``entries``, under the key that sealed the directory."""
        return EntrySet.of(directory.sealed_by or self.ns_of(directory.id), directory.id,
                           ((name, node.id, node.is_dir) for name, node in entries))

    def resolve(self, path: str) -> Node:
        node = self.get(self.root)
        for part in split_path(path):
            if not node.is_dir:
                raise ZkfsError(f"{path}: not a directory", errno=20)
            child = self.lookup(node.id, part)
            if child is None:
                raise ZkfsError(f"{path}: no such file or directory on the server", errno=2)
            node = child
        return node

    def name_hash(self, parent: UUID, name: str) -> str:
        """The hash a new entry ``name`` in ``parent`` gets."""
        return self.ns_of(parent).name_hash(parent, encode_name(name))

    def has_old_name(self, parent: UUID, name: str) -> bool:
        """Whether entry ``name`` of ``parent`` was last seen sealed under a retired
        namespace key (rotate-key --full re-seals it)."""
        return (parent, name) in self._old_hashes

    def entry_hash(self, parent: UUID, name: str) -> str:
        """The hash of the existing entry ``name`` in ``parent``, as last seen here,
        for an op that removes or moves it (so it is forgotten: after the op the
        name is gone or sealed under the current key; a refused op's next listing
        finds it again)."""
        return self._old_hashes.pop((parent, name), None) or self.name_hash(parent, name)

    # ------------------------------------------------------------ content
    def file_cipher(self, inode: UUID, key_id: bytes | None = None) -> BinaryFernet:
        """The cipher of a file's key. ``key_id``: the key the version at hand names
        in its attributes (a rotate-key --full replaces file keys): a cached key of
        another id is fetched again, and a fetched one must be it."""
        with self._keys_lock:
            held = self._file_keys.get(inode)
            if held is not None and key_id in (None, held[1]):
                self._file_keys.move_to_end(inode)
                return held[0]
        return self.remember_file_key(inode, *self._fetch_key(inode, key_id))

    def file_key(self, inode: UUID, key_id: bytes | None = None) -> bytes:
        """A file's key, fetched and unwrapped (``key_id``: see ``file_cipher``)."""
        return self._fetch_key(inode, key_id)[0]

    def _fetch_key(self, inode: UUID, key_id: bytes | None) -> tuple[bytes, int]:
        """(a file's key, the generation of its domain's keys it is wrapped under)."""
        d = self.api.get_key(inode, self.scope_of(inode))
        if d["gen"] not in self.keys_of(inode).masters:
            self.refresh_keyring()       # re-wrapped by a rotate-key since we unlocked
            if self.share_of(inode) is not None:
                self.reload_shares()     # a new generation of the share's keys
        key = self.keys_of(inode).unwrap_file_key(inode, d["gen"], b64decode(d["wrapped_key"]))
        if key_id is not None and crypto.key_id(key) != key_id:
            raise TamperedError(f"the key of file {inode} is not the one its attributes name")
        return key, d["gen"]

    def remember_file_key(self, inode: UUID, key: bytes, gen: int | None = None) -> BinaryFernet:
        """Cache ``key`` as the file's key (a new file's, or a re-encrypted one's),
        wrapped under generation ``gen`` (default: its domain's current one)."""
        cipher = BinaryFernet(key)
        gen = gen if gen is not None else self.keys_of(inode).current_gen
        with self._keys_lock:
            self._file_keys[inode] = (cipher, crypto.key_id(key), gen)
            self._file_keys.move_to_end(inode)
            while len(self._file_keys) > 4096:
                self._file_keys.popitem(last=False)
        return cipher

    def new_file_key(self, inode: UUID, parent: UUID | None = None) -> tuple[BinaryFernet, bytes]:
        """A fresh per-file key and its cipher (``op_create`` stores it wrapped).
        ``parent``: the folder the new file goes into (its chunks are uploaded into
        that folder's share before the create names it)."""
        if parent is not None:
            self.domains.adopt(inode, self.check_writable(parent))
        key = crypto.random_key()
        return self.remember_file_key(inode, key), key

    def refresh_keyring(self) -> None:
        """Fetch and unlock the account's master keys again: another client ran
        rotate-key (new generation current, old ones deleted once unused)."""
        keyring = self._unlock()
        if keyring.current_gen == self.keyring.current_gen and keyring.namespace.raw != self.ns.raw:
            raise TamperedError("the server sent another namespace key for this account")
        if keyring.current_gen < self.keyring.current_gen:
            # New file keys would be wrapped under a retired (perhaps leaked) key.
            raise TamperedError(f"the server rolled the master key back from generation "
                                f"{self.keyring.current_gen} to {keyring.current_gen}")
        self.ledger.check_key_gen(self.root, keyring.current_gen)
        self.keyring = keyring

    def note_key_gen(self, gen: int) -> None:
        """The server's current master key generation, from the change feed."""
        if gen != self.keyring.current_gen:
            log.info("master key generation %d -> %d (rotate-key elsewhere): reloading keys",
                     self.keyring.current_gen, gen)
            self.refresh_keyring()

    def manifest(self, node: Node) -> Manifest:
        if node.attrs.manifest_digest is None:
            return Manifest(inode=node.id)
        with self._keys_lock:
            held = self._manifests.get((node.id, node.attrs.manifest_digest))
        if held is not None:
            return held
        if node.manifest_token is None:
            node = self.get(node.id)
        token = node.manifest_token or b""
        if crypto.digest(token) != node.attrs.manifest_digest:
            raise TamperedError(f"manifest of inode {node.id} does not match its attributes")
        try:
            manifest = Manifest.decrypt(self.file_cipher(node.id, node.attrs.key_id), token, node.id)
            manifest.key_id = node.attrs.key_id
        except IntegrityError as exc:
            raise TamperedError(f"manifest of inode {node.id} failed verification: {exc}") from None
        if manifest.size != node.attrs.size:
            raise TamperedError(f"inode {node.id}: manifest size disagrees with its attributes")
        self.remember_manifest(node, manifest)
        return manifest

    def remember_manifest(self, node: Node, manifest: Manifest) -> None:
        """A manifest this client sealed itself (the mount's journal): no fetch, also
        with the server away."""
        with self._keys_lock:
            self._manifests[(node.id, node.attrs.manifest_digest)] = manifest
            while len(self._manifests) > 4096:
                self._manifests.popitem(last=False)

    def urls_ahead(self, inode: UUID, manifest: Manifest, index: int) -> None:
        """Let the API client fetch, in one request, the read URLs of the 64 chunks
        around this one (servers on an object store; a no-op elsewhere or when known).
        Aligned windows: parallel readers of nearby chunks ask for the same batch."""
        start = index - index % 64
        ids = [r.blob_id for r in manifest.chunks[start:start + 64] if not r.is_hole]
        self.api.blob_urls_ahead(inode, ids, self.scope_of(inode))

    def fetch_chunk_token(self, inode: UUID, ref: ChunkRef, start: int | None = None,
                          end: int | None = None) -> bytes:
        """A chunk token, or its bytes ``[start, end)``."""
        try:
            return self.api.get_blob(inode, ref.blob_id, start, end, self.scope_of(inode))
        except ServerError as exc:
            if exc.code == "not_found":
                raise self._missing_chunk(inode, ref) from None
            raise

    def _missing_chunk(self, inode: UUID, ref: ChunkRef) -> ZkfsError:
        """A chunk the server does not have. If the file is gone or its current version
        no longer uses that chunk, another client deleted or replaced it while it was
        open here (ESTALE); missing from the current version, it is tampering (EIO)."""
        try:
            current = self.manifest(self.get(inode))
        except ServerError as exc:
            if exc.code != "not_found":
                raise
            return StaleError(f"inode {inode} was deleted elsewhere while open")
        if ref in current.chunks:
            return TamperedError(f"a chunk of inode {inode} is missing on the server")
        return StaleError(f"inode {inode} was replaced elsewhere while open")

    def open_chunk(self, inode: UUID, manifest: Manifest, index: int, token: bytes) -> bytes:
        try:
            return open_chunk(self.file_cipher(inode, manifest.key_id), token, manifest.chunks[index],
                              manifest.chunk_length(index))
        except IntegrityError as exc:
            raise TamperedError(f"chunk {index} of inode {inode} failed verification: {exc}") from None

    def read_chunk_range(self, inode: UUID, manifest: Manifest, index: int, lo: int, hi: int) -> bytes:
        """Plaintext bytes ``[lo, hi)`` of chunk ``index``, fetching and checking only
        the segments that cover them."""
        ref, n = manifest.chunks[index], manifest.chunk_length(index)
        first, start, end = segment_span(n, lo, hi)
        self.urls_ahead(inode, manifest, index)
        data = self.fetch_chunk_token(inode, ref, start, end)
        try:
            plain = open_segments(self.file_cipher(inode, manifest.key_id), data, ref, n, lo, hi)
        except IntegrityError as exc:
            raise TamperedError(f"chunk {index} of inode {inode} failed verification: {exc}") from None
        base = first * SEGMENT_SIZE
        return plain[lo - base:hi - base]

    def read_chunk(self, inode: UUID, manifest: Manifest, index: int) -> bytes:
        ref = manifest.chunks[index]
        if ref.is_hole:
            return bytes(manifest.chunk_length(index))
        self.urls_ahead(inode, manifest, index)
        return self.open_chunk(inode, manifest, index, self.fetch_chunk_token(inode, ref))

    def upload_chunk(self, inode: UUID, cipher: BinaryFernet, plain: bytes) -> ChunkRef:
        """Encrypt and store one chunk as a new (staged) blob; all-zero chunks are holes."""
        return self.upload_chunk_token(inode, cipher, plain)[0]

    def upload_chunk_token(self, inode: UUID, cipher: BinaryFernet, plain: bytes) -> tuple[ChunkRef, bytes | None]:
        if not any_nonzero(plain):
            return HOLE_REF, None
        token, ref = seal_chunk(cipher, plain, uuid4())
        self.api.put_blob(inode, ref.blob_id, token, self.scope_of(inode))
        return ref, token

    # ------------------------------------------------------------ ops
    _SEAL_ATTEMPTS = 8          # a directory changed by another client meanwhile: read it, try again

    def apply(self, ops: list[Op]) -> list[dict]:
        """Send ``ops`` as one transaction, with the sealed attributes of every
        directory whose entries they change (zkfs/ops.py). Returns their results.
        A member's ops on its own files and on a share of another account's cannot
        share a transaction (they are in two accounts): one each, in order."""
        scopes = list(dict.fromkeys(op.scope for op in ops))
        if len(scopes) > 1:
            results: list[dict] = [{}] * len(ops)
            for scope in scopes:
                picked = [i for i, op in enumerate(ops) if op.scope == scope]
                for i, res in zip(picked, self.apply([ops[i] for i in picked])):
                    results[i] = res
            return results
        for attempt in range(self._SEAL_ATTEMPTS):
            batch = self.plan_batch(ops)
            try:
                return self.send(batch)
            except ServerError as exc:
                if not self.folder_changed_meanwhile(batch, exc) or attempt + 1 == self._SEAL_ATTEMPTS:
                    raise
                time.sleep(random.uniform(0, 0.01 * attempt))    # two clients in one folder
        raise AssertionError("unreachable")

    def plan_batch(self, ops: list[Op]) -> Plan:
        """``ops`` planned as one transaction: all of one account (one ``scope``)."""
        scopes = {op.scope for op in ops}
        if len(scopes) > 1:
            raise ValueError("ops in two accounts cannot be one transaction")
        batch = plan(ops, self.ns_of, self._dir_state)
        batch.scope = next(iter(scopes), None)
        return batch

    def folder_changed_meanwhile(self, batch: Plan, exc: ServerError) -> bool:
        """Whether ``exc`` is the CAS of one of the folders ``batch`` sealed: another
        client changed it since (it is read afresh for the next plan)."""
        if exc.code != "conflict" or exc.op_index is None or exc.op_index < batch.count:
            return False
        self._dirs.pop(batch.appended[exc.op_index - batch.count], None)
        return True

    def send(self, batch: Plan, batch_id: UUID | None = None) -> list[dict]:
        """Send a planned batch (``batch_id``: applied once however often it is sent)
        and return the results of its ops. Raises ServerError if it was refused
        (then nothing of it was applied)."""
        try:
            resp = self._send_ops(batch.wires, batch_id, batch.scope)
        finally:
            self.ops_applied += 1
        (self.own_seqs if batch.scope is None else self.own_share_seqs.setdefault(batch.scope, set())).add(resp["seq"])
        results = resp["results"]
        wrong = record_written_versions(self.ledger, batch.wires, results)
        # Persist at once: a crash must not forget versions the server acknowledged,
        # or it could roll them back unnoticed.
        self.ledger.flush()
        if wrong:
            raise TamperedError(wrong)
        for d, version, attrs in batch.sealed:
            self._note_dir(Node(d, True, version, 2 + attrs.entries.subdirs, attrs, sealed_by=self.ns_of(d)))
        return results[:batch.count]

    def _note_dir(self, node: Node) -> None:
        """The newest verified state of a directory: the base of the next change of
        its entries. Listeners (the mount's cache) learn of our own changes."""
        with self._keys_lock:
            held = self._dirs.get(node.id)
            if held is not None and held.version > node.version:
                return
            self._dirs[node.id] = node
            self._dirs.move_to_end(node.id)
            while len(self._dirs) > 10_000:
                self._dirs.popitem(last=False)
        if held is None or held.version < node.version:
            self.on_dir_change(node)

    def _dir_state(self, d: UUID) -> tuple[int, Attrs]:
        """A directory's version and attributes, as the base of a change of its entries:
        with its entry set under the current namespace key."""
        with self._keys_lock:
            node = self._dirs.get(d)
        if node is None:
            node = self.get(d)
        if not node.is_dir:
            raise ServerError(409, "not_dir", f"{d} is not a directory")
        if node.attrs.entries is not None and not node.old_seal:
            return node.version, node.attrs
        # Sealed under a retired namespace key (rotate-key --full), or before entry
        # sets existed: its set is computed afresh from a listing (verified against
        # the old set if it has one; trust on first use if not).
        if node.attrs.entries is None:
            log.info("directory %s: sealing the digest of its entries for the first time", d)
        directory, entries, bad = self.listdir_partial(d)
        if bad:
            raise next(iter(bad.values()))
        if directory.version != node.version:
            return self._dir_state(d)            # changed meanwhile: from the newer one
        entry_set = EntrySet.of(self.ns_of(d), d, ((name, n.id, n.is_dir) for name, n in entries if not n.virtual))
        return directory.version, directory.attrs.evolve(entries=entry_set)

    def _send_ops(self, wires: list[dict], batch_id: UUID | None = None, scope: UUID | None = None) -> dict:
        try:
            return self.api.ops(wires, batch_id, share=scope)
        except ServerError as exc:
            if exc.code != "unknown_key_gen":
                raise
        # A rotate-key (or an unshare) elsewhere retired the generation a new file's
        # key was wrapped under, between building the op and sending it (refused:
        # nothing applied).
        return self.api.ops(self._rewrapped(wires), batch_id, share=scope)

    def _rewrapped(self, wires: list[dict]) -> list[dict]:
        """``wires`` with each file key wrapped under a retired generation unwrapped
        with the keyring that wrapped it and wrapped again under the current one."""
        before = {UUID(op["inode"]): self.keys_of(UUID(op["inode"])) for op in wires if op.get("key_gen")}
        self.refresh_keyring()
        self.reload_shares()
        out = []
        for op in wires:
            if op.get("key_gen") is not None:
                inode = UUID(op["inode"])
                if op["key_gen"] != self.keys_of(inode).current_gen:
                    key = before[inode].unwrap_file_key(inode, op["key_gen"], b64decode(op["wrapped_key"]))
                    op = op | self._wrapped_key_fields(inode, key)
            out.append(op)
        return out

    def op_create(self, parent: UUID, name: str, inode: UUID, attrs: Attrs, file_key: bytes | None = None,
                  *, at_ns: int | None = None) -> Op:
        """``file_key`` is wrapped here, under the generation current when the op is
        built: a file created before a rotate-key is published under the new one."""
        share = self.check_writable(parent)
        self.domains.adopt(inode, share)
        attrs.version = 1
        if attrs.is_dir:
            attrs.entries = EntrySet()
        if file_key is not None:
            attrs.key_id = crypto.key_id(file_key)
        wire = {"op": "create", "inode": str(inode), "is_dir": attrs.is_dir, "parent": str(parent),
                "name_hash": self.name_hash(parent, name),
                "name": b64encode(seal_name(self.ns_of(parent), inode, name))}
        if file_key is not None:
            wire |= self._wrapped_key_fields(inode, file_key)
        return Op(wire, inode, attrs, (EntryChange(parent, name, inode, attrs.is_dir, True),), at_ns or time.time_ns(),
                  scope=self._scope(share))

    @staticmethod
    def _scope(share: Share | None) -> UUID | None:
        return share.scope if share is not None else None

    def _wrapped_key_fields(self, inode: UUID, file_key: bytes) -> dict:
        """A create op's fields storing ``file_key`` wrapped under the current generation."""
        gen, wrapped = self.keys_of(inode).wrap_file_key(inode, file_key)
        return {"key_gen": gen, "wrapped_key": b64encode(wrapped)}

    def op_link(self, inode: UUID, parent: UUID, name: str, *, at_ns: int | None = None) -> Op:
        share = self.same_domain(inode, parent)
        wire = {"op": "link", "inode": str(inode), "parent": str(parent), "name_hash": self.name_hash(parent, name),
                "name": b64encode(seal_name(self.ns_of(parent), inode, name))}
        return Op(wire, entries=(EntryChange(parent, name, inode, False, True),), at_ns=at_ns or time.time_ns(),
                  scope=self._scope(share))

    def op_unlink(self, parent: UUID, name: str, inode: UUID, *, keep_orphan: bool = False,
                  at_ns: int | None = None) -> Op:
        share = self.check_writable(parent)
        wire = {"op": "unlink", "parent": str(parent), "name_hash": self.entry_hash(parent, name),
                "keep_orphan": keep_orphan, "expect_inode": str(inode)}
        return Op(wire, entries=(EntryChange(parent, name, inode, False, False),), at_ns=at_ns or time.time_ns(),
                  scope=self._scope(share))

    def op_rmdir(self, parent: UUID, name: str, inode: UUID, *, at_ns: int | None = None) -> Op:
        share = self.check_writable(parent)
        wire = {"op": "rmdir", "parent": str(parent), "name_hash": self.entry_hash(parent, name),
                "expect_inode": str(inode)}
        return Op(wire, entries=(EntryChange(parent, name, inode, True, False),), at_ns=at_ns or time.time_ns(),
                  removes_dir=inode, scope=self._scope(share))

    def op_rename(self, node: Node, src_parent: UUID, src_name: str, dst_parent: UUID, dst_name: str,
                  *, replaces: Node | None = None, keep_orphan: bool = False, at_ns: int | None = None) -> Op:
        """Renames ``node``; ``replaces``: what the target is now (None: there is none,
        and if one appeared meanwhile the server refuses with ``exists``)."""
        share = self.same_domain(src_parent, dst_parent)
        src_hash = self.entry_hash(src_parent, src_name)
        dst_hash = (self.entry_hash if replaces is not None else self.name_hash)(dst_parent, dst_name)
        wire = {"op": "rename", "src_parent": str(src_parent), "src_hash": src_hash,
                "dst_parent": str(dst_parent), "dst_hash": dst_hash,
                "dst_name": b64encode(seal_name(self.ns_of(dst_parent), node.id, dst_name)),
                "noreplace": replaces is None, "keep_orphan": keep_orphan, "src_inode": str(node.id)}
        changes = [EntryChange(src_parent, src_name, node.id, node.is_dir, False)]
        if replaces is not None:
            wire["dst_inode"] = str(replaces.id)
            changes.append(EntryChange(dst_parent, dst_name, replaces.id, replaces.is_dir, False))
        changes.append(EntryChange(dst_parent, dst_name, node.id, node.is_dir, True))
        return Op(wire, entries=tuple(changes), at_ns=at_ns or time.time_ns(),
                  removes_dir=replaces.id if replaces is not None and replaces.is_dir else None,
                  scope=self._scope(share))

    def op_exchange(self, a: Node, a_parent: UUID, a_name: str, b: Node, b_parent: UUID, b_name: str,
                    *, at_ns: int | None = None) -> Op:
        """rename(2) with RENAME_EXCHANGE: ``a`` and ``b`` swap names."""
        share = self.same_domain(a_parent, b_parent)
        a_hash, b_hash = self.entry_hash(a_parent, a_name), self.entry_hash(b_parent, b_name)
        wire = {"op": "exchange", "a_parent": str(a_parent), "a_hash": a_hash, "a_inode": str(a.id),
                "a_name": b64encode(seal_name(self.ns_of(a_parent), b.id, a_name)),
                "b_parent": str(b_parent), "b_hash": b_hash, "b_inode": str(b.id),
                "b_name": b64encode(seal_name(self.ns_of(b_parent), a.id, b_name))}
        changes = (EntryChange(a_parent, a_name, a.id, a.is_dir, False),
                   EntryChange(b_parent, b_name, b.id, b.is_dir, False),
                   EntryChange(a_parent, a_name, b.id, b.is_dir, True),
                   EntryChange(b_parent, b_name, a.id, a.is_dir, True))
        return Op(wire, entries=changes, at_ns=at_ns or time.time_ns(), scope=self._scope(share))

    def op_setmeta(self, node_id: UUID, base_version: int, attrs: Attrs, *, at_ns: int | None = None) -> Op:
        share = self.check_writable(node_id)
        attrs.version = base_version + 1
        return Op({"op": "setmeta", "inode": str(node_id), "base_version": base_version}, node_id, attrs,
                  at_ns=at_ns or time.time_ns(), scope=self._scope(share))

    def op_commit(self, node_id: UUID, base_version: int, attrs: Attrs, manifest: Manifest,
                  inline: list[tuple[UUID, bytes]] = (), *, new_key: bytes | None = None,
                  token: bytes | None = None) -> Op:
        """``new_key``: this version's content is sealed under a new file key (rotate-key
        --full), stored with it in the same transaction. ``token``: the manifest as
        already sealed (by the mount, when it journaled the version)."""
        share = self.check_writable(node_id)
        if new_key is not None:
            attrs.key_id = crypto.key_id(new_key)
        if token is None:
            cipher = BinaryFernet(new_key) if new_key is not None else self.file_cipher(node_id, attrs.key_id)
            token = manifest.encrypt(cipher)
        attrs.size = manifest.size
        attrs.manifest_digest = crypto.digest(token)
        attrs.version = base_version + 1
        wire = {"op": "commit", "inode": str(node_id), "base_version": base_version,
                "manifest": b64encode(token), "blobs": [str(b) for b in manifest.blob_ids()],
                "inline": [{"blob_id": str(b), "data": b64encode(data)} for b, data in inline]}
        return Op(wire | (self._wrapped_key_fields(node_id, new_key) if new_key is not None else {}), node_id, attrs,
                  scope=self._scope(share))

    def op_delete_inode(self, inode: UUID) -> Op:
        return Op({"op": "delete_inode", "inode": str(inode)}, scope=self._scope(self.check_writable(inode)))


def record_written_versions(ledger: VersionLedger, wires: list[dict], results: list[dict]) -> str | None:
    """Record in ``ledger`` the versions a batch's ops wrote (never what the answer
    says: a server that under-reports one could later serve the one before); what
    is wrong with the answer, if anything. An inode written twice in one batch (a
    create and its first content) is recorded at its last version only: the batch
    is applied as a whole, and a batch sent again after a crash (answered as the
    first time) must not look like a rollback from the last to the first."""
    last: dict[str, int] = {}
    wrong = None
    for wire, res in zip(wires, results):
        written = written_version(wire)
        if written is None:
            continue
        last[wire["inode"]] = max(written, last.get(wire["inode"], 0))
        if (res.get("inode"), res.get("version")) != (wire["inode"], written):
            wrong = wrong or (f"the server acknowledged version {res.get('version')} of inode "
                              f"{wire['inode']}, but this client wrote version {written}")
    for inode, version in last.items():
        ledger.check(UUID(inode), version)
    if len(results) != len(wires):
        wrong = wrong or f"the server answered {len(results)} results for {len(wires)} ops"
    return wrong


def written_version(wire: dict) -> int | None:
    """The version an op makes of its inode (create: 1; commit and setmeta: the
    base + 1); None for ops that change no version."""
    if wire["op"] == "create":
        return 1
    if wire["op"] in ("commit", "setmeta"):
        return wire["base_version"] + 1
    return None


def new_attrs(mode: int, *, uid: int | None = None, gid: int | None = None, rdev: int = 0,
              target: bytes = b"") -> Attrs:
    now = time.time_ns()
    return Attrs(mode=mode, uid=os.getuid() if uid is None else uid, gid=os.getgid() if gid is None else gid,
                 rdev=rdev, atime_ns=now, mtime_ns=now, ctime_ns=now, target=target,
                 size=len(target) if stat.S_ISLNK(mode) else 0)


def split_path(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


_ZERO_CHUNK = bytes(CHUNK_SIZE)


def any_nonzero(data: bytes) -> bool:
    """False for an all-zero chunk (stored as a hole). A full chunk is compared
    with a zero block (memcmp, stops at the first non-zero byte)."""
    if len(data) == CHUNK_SIZE:
        return data != _ZERO_CHUNK
    return data.count(0) != len(data)
