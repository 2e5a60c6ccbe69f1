"""Batches of namespace changes, as sent in one ``POST /fs/ops`` transaction.

An ``Op`` is what the mount or the CLI asks for (``Vault.op_*`` build them);
``plan`` turns a list of them into what is sent: the ops with their attributes
sealed, and, for every directory whose entries they change, the directory's new
attributes (entry-set digest, subdirectory count, mtime and ctime) as a
compare-and-swap ``setmeta`` in the same transaction. A directory's attributes
are thus always sealed by a client, together with the change that made them,
never the server's word (zkfs/entryset.py, docs/FORMAT.md §5).

Pure logic: the directories' current state comes from a callback, and so does the
namespace key each inode is sealed under (its account's, or its shared folder's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
from uuid import UUID

from .crypto import NamespaceKey
from .entryset import EntrySet
from .format import Attrs, b64encode


@dataclass(frozen=True)
class EntryChange:
    """An entry an op adds to (or removes from) a directory."""
    parent: UUID
    name: str
    inode: UUID
    is_dir: bool
    added: bool


@dataclass
class Op:
    wire: dict                      # sent as is, plus "meta" sealed from ``attrs``
    inode: UUID | None = None       # whose attributes ``attrs`` are
    attrs: Attrs | None = None
    entries: tuple[EntryChange, ...] = ()
    at_ns: int = 0                  # when the call behind it was made
    removes_dir: UUID | None = None   # a directory this op deletes (rmdir, rename over it)
    scope: UUID | None = None       # sent into this share of another account's (a member's op)

    @property
    def kind(self) -> str:
        return self.wire["op"]


@dataclass
class _Dir:
    version: int                    # the server's version: CAS base of the sealing setmeta
    attrs: Attrs                    # as the batch leaves it (a copy)
    entries_ns: int = 0             # latest entry change in this batch
    explicit_ns: int = 0            # latest attribute change asked for (setmeta) in this batch
    sealed_by: int | None = None    # index of the op that carries its attributes
    changed: bool = False
    gone: bool = False


@dataclass
class Plan:
    wires: list[dict]                               # the ops' (one each, in order), then the folders'
    appended: list[UUID]                            # directories of the setmetas after the ops
    sealed: list[tuple[UUID, int, Attrs]] = field(default_factory=list)   # (dir, version, attrs)
    scope: UUID | None = None                       # the share it goes into (None: the account's own)

    @property
    def count(self) -> int:
        """How many of the wires are the ops asked for."""
        return len(self.wires) - len(self.appended)


DirState = Callable[[UUID], tuple[int, Attrs]]      # a directory's current (version, attrs)
KeyOf = Callable[[UUID], NamespaceKey]              # the namespace key an inode is sealed under


def plan(ops: list[Op], ns_of: KeyOf, current: DirState) -> Plan:
    dirs: dict[UUID, _Dir] = {}

    def work(d: UUID) -> _Dir:
        w = dirs.get(d)
        if w is None:
            version, attrs = current(d)
            w = dirs[d] = _Dir(version, attrs.evolve())
        return w

    earlier: dict[int, tuple[int, Attrs]] = {}       # op index -> (base version, sealed attrs)
    for index, op in enumerate(ops):
        if op.kind == "create" and op.attrs.is_dir:
            dirs[op.inode] = _Dir(0, op.attrs.evolve(entries=EntrySet()), sealed_by=index)
        elif op.kind == "setmeta" and op.attrs.is_dir:
            # A folder's own attribute change, on the version its entry set is at (a
            # base_version of None: whatever that is now, as the journal sends it).
            w = work(op.inode)
            if w.sealed_by is not None:
                # An earlier op of this batch (its create, or another change of its
                # attributes) makes a version of its own: sealed as the folder is then.
                sealed = w.attrs.evolve(version=w.version + 1)
                earlier[w.sealed_by] = (w.version, sealed)
                w.version += 1
            w.attrs = op.attrs.evolve(entries=w.attrs.entries)
            if op.wire.get("base_version") is not None:
                w.version = op.wire["base_version"]
            w.sealed_by, w.explicit_ns = index, max(w.explicit_ns, op.at_ns)
        for ch in op.entries:
            w = work(ch.parent)
            change = w.attrs.entries.add if ch.added else w.attrs.entries.remove
            w.attrs.entries = change(ns_of(ch.parent), ch.parent, ch.name, ch.inode, ch.is_dir)
            w.entries_ns, w.changed = max(w.entries_ns, op.at_ns), True
        if op.removes_dir is not None:
            work(op.removes_dir).gone = True

    wires = [dict(op.wire) for op in ops]
    for index, (base, a) in earlier.items():
        wires[index]["meta"] = b64encode(a.encrypt(ns_of(ops[index].inode), ops[index].inode))
        if wires[index]["op"] == "setmeta":
            wires[index]["base_version"] = base
    appended: list[UUID] = []
    sealed: list[tuple[UUID, int, Attrs]] = []
    for d, w in dirs.items():
        if w.gone:
            if w.sealed_by is not None and wires[w.sealed_by]["op"] == "setmeta":
                wires[w.sealed_by]["base_version"] = w.version      # then removed in this batch
            continue
        a = w.attrs
        if w.changed:
            if w.entries_ns >= w.explicit_ns:         # the entry change came last
                a.mtime_ns = w.entries_ns
            a.ctime_ns = max(a.ctime_ns, w.entries_ns)
        elif w.sealed_by is None:
            continue
        a.version = w.version + 1
        if w.sealed_by is None:
            appended.append(d)
            wires.append({"op": "setmeta", "inode": str(d), "base_version": w.version})
            wires[-1]["meta"] = b64encode(a.encrypt(ns_of(d), d))
        else:
            wires[w.sealed_by]["meta"] = b64encode(a.encrypt(ns_of(d), d))
            if wires[w.sealed_by]["op"] == "setmeta":
                wires[w.sealed_by]["base_version"] = w.version
        sealed.append((d, a.version, a))
    for index, op in enumerate(ops):
        if op.attrs is not None and "meta" not in wires[index]:
            wires[index]["meta"] = b64encode(op.attrs.encrypt(ns_of(op.inode), op.inode))
    return Plan(wires, appended, sealed)
