"""Planning a batch of namespace ops (zkfs/ops.py, pure logic): every folder whose
entries change gets its new sealed attributes in the same transaction."""
from __future__ import annotations

import base64
import json
import stat
from uuid import uuid4

from zkfs.crypto import NamespaceKey
from zkfs.entryset import EntrySet
from zkfs.format import Attrs
from zkfs.ops import EntryChange, Op, plan

NS = NamespaceKey.generate()


def folder(entries=EntrySet(), mtime=1000) -> Attrs:
    return Attrs(mode=stat.S_IFDIR | 0o755, mtime_ns=mtime, ctime_ns=mtime, entries=entries)


def sealed(wire: dict, inode, version) -> Attrs:
    return Attrs.decrypt(NS, base64.b64decode(wire["meta"]), inode, version)


def add(parent, inode, name="a.txt", is_dir=False, at=5000) -> Op:
    return Op({"op": "link", "inode": str(inode)}, entries=(EntryChange(parent, name, inode, is_dir, True),),
              at_ns=at)


def test_an_entry_change_seals_the_folder_in_the_same_batch():
    d, f = uuid4(), uuid4()
    state = {d: (7, folder())}
    batch = plan([add(d, f)], lambda _: NS, state.__getitem__)
    assert batch.appended == [d]
    wire = batch.wires[1]
    assert wire["op"] == "setmeta" and wire["inode"] == str(d) and wire["base_version"] == 7
    a = sealed(wire, d, 8)
    assert a.entries == EntrySet().add(NS, d, "a.txt", f, False)
    assert (a.mtime_ns, a.ctime_ns) == (5000, 5000)


def test_adding_then_removing_leaves_the_digest_as_it_was():
    d, f = uuid4(), uuid4()
    start = EntrySet().add(NS, d, "b", uuid4(), True)
    remove = Op({"op": "unlink"}, entries=(EntryChange(d, "a.txt", f, False, False),), at_ns=6000)
    batch = plan([add(d, f), remove], lambda _: NS, {d: (1, folder(start))}.__getitem__)
    a = sealed(batch.wires[2], d, 2)
    assert a.entries == start and a.entries.subdirs == 1
    assert a.mtime_ns == 6000


def test_a_folder_created_in_the_batch_is_sealed_by_its_create():
    parent, new, child = uuid4(), uuid4(), uuid4()
    create = Op({"op": "create", "inode": str(new)}, new, folder(entries=None),
                (EntryChange(parent, "c", new, True, True),), at_ns=4000)
    batch = plan([create, add(new, child, at=4500)], lambda _: NS, {parent: (3, folder())}.__getitem__)
    assert batch.appended == [parent]           # only the parent needs a setmeta of its own
    a = sealed(batch.wires[0], new, 1)
    assert a.entries == EntrySet().add(NS, new, "a.txt", child, False)
    assert sealed(batch.wires[2], parent, 4).entries.subdirs == 1


def test_an_explicit_touch_after_the_entry_change_keeps_its_time():
    d, f = uuid4(), uuid4()
    touched = folder(mtime=10**15)
    explicit = Op({"op": "setmeta", "inode": str(d), "base_version": 2}, d, touched, at_ns=9000)
    batch = plan([add(d, f, at=8000), explicit], lambda _: NS, {d: (2, folder())}.__getitem__)
    assert batch.appended == []                  # the explicit setmeta carries the digest
    a = sealed(batch.wires[1], d, 3)
    assert a.mtime_ns == 10**15 and a.ctime_ns == 10**15
    assert a.entries.count == 1
    # the other order: the entry change came last, so it sets mtime
    batch = plan([explicit, add(d, f, at=9500)], lambda _: NS, {d: (2, folder())}.__getitem__)
    assert sealed(batch.wires[0], d, 3).mtime_ns == 9500


def test_a_removed_folder_is_not_sealed():
    parent, gone = uuid4(), uuid4()
    rmdir = Op({"op": "rmdir"}, entries=(EntryChange(parent, "d", gone, True, False),), at_ns=1,
               removes_dir=gone)
    state = {parent: (1, folder(EntrySet().add(NS, parent, "d", gone, True))), gone: (4, folder())}
    batch = plan([rmdir], lambda _: NS, state.__getitem__)
    assert batch.appended == [parent]
    assert json.dumps(batch.wires).count('"setmeta"') == 1


def test_two_attribute_changes_of_one_folder_in_a_batch_make_two_versions():
    """The journal sends a folder's chmod and its touch, made one after the other,
    in one batch: each is a version of its own, on the one before (the first
    used to go with no base version at all and the server refused the batch)."""
    d, f = uuid4(), uuid4()
    chmod = Op({"op": "setmeta", "inode": str(d), "base_version": None}, d, folder(mtime=1000).evolve(mode=stat.S_IFDIR | 0o700),
               at_ns=2000)
    touch = Op({"op": "setmeta", "inode": str(d), "base_version": None}, d, folder(mtime=3000).evolve(mode=stat.S_IFDIR | 0o700),
               at_ns=3000)
    batch = plan([chmod, add(d, f, at=2500), touch], lambda _: NS, {d: (4, folder())}.__getitem__)
    assert [w.get("base_version") for w in batch.wires] == [4, None, 5]
    first, last = sealed(batch.wires[0], d, 5), sealed(batch.wires[2], d, 6)
    assert stat.S_IMODE(first.mode) == 0o700      # (no one sees this version: one transaction)
    assert last.entries == EntrySet().add(NS, d, "a.txt", f, False) and last.mtime_ns == 3000
    # changed, then removed in the same batch: still on the version it was
    rmdir = Op({"op": "rmdir"}, removes_dir=d, at_ns=4000)
    batch = plan([chmod, rmdir], lambda _: NS, {d: (4, folder())}.__getitem__)
    assert batch.wires[0]["base_version"] == 4 and batch.appended == []
