"""A malicious server against the real client (docs/THREAT_MODEL.md).

The server is the real one; the attacker edits what it stores underneath it
(sqlite rows, blob and key files: see hostile.py), which is all a compromised
host can do. Each attack is then met by

* ``client.py download``: exit status != 0, exactly one ``error:`` line naming
  the problem, no traceback, nothing written (no partial file either), and
* a fresh FUSE mount: the read fails with EIO (never the wrong bytes) and the
  mount's log has an ``integrity check failed`` line naming the file.

One server and one account serve the whole module; every test attacks its own
files under /h/<test>/, so the attacks do not interfere.
"""
from __future__ import annotations

import errno
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from zkfs.format import SEGMENT_SIZE

from harness import Machine
from hostile import (HostileServer, error_line, flip_b64, flip_bit, log_lines, mount_log,
                     uploads)
from mount_helpers import wait_until

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
BIG = 2 * MiB + 100_000          # three chunks: two full 1 MiB ones and a tail
MED = 300_000                    # one chunk, uploaded as a blob (not inline in the commit)
HIDDEN = "sealed entry set"      # what a listing that does not add up is reported as


def _bytes(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _text(rel: str, n: int) -> bytes:
    line = f"zkfs-plaintext-marker {rel}\n".encode()
    return (line * (n // len(line) + 1))[:n]


# Every file of the module, by path under /h. Small text files carry a marker
# that the plaintext scan (test_server_stores_no_plaintext) looks for.
FILES: dict[str, bytes] = {
    "control/ok.bin": _bytes("ok", BIG),
    "control/ok.txt": _text("control/ok.txt", 3000),
    "flip-chunk/f.bin": _bytes("flip-chunk", BIG),
    "flip-manifest/f.txt": _text("flip-manifest/f.txt", 1000),
    "flip-key/f.txt": _text("flip-key/f.txt", 1001),
    "flip-meta/f.txt": _text("flip-meta/f.txt", 1002),
    "flip-name/f.txt": _text("flip-name/f.txt", 1003),
    "reorder/a.bin": _bytes("reorder", BIG),
    "stale/a.bin": _bytes("stale", MED),
    "truncate/drop.bin": _bytes("drop", BIG),
    "truncate/cut.bin": _bytes("cut", MED),
    "extend/append.bin": _bytes("append", BIG),
    "extend/extra.bin": _bytes("extra", MED),
    "chunkswap/a.bin": _bytes("cs-a", MED),
    "chunkswap/b.bin": _bytes("cs-b", MED),
    "keyswap/a.txt": _text("keyswap/a.txt", 2000),
    "keyswap/b.txt": _text("keyswap/b.txt", 2001),
    "keygen/a.txt": _text("keygen/a.txt", 2002),
    "content/a.txt": _text("content/a.txt", 4000),
    "content/b.txt": _text("content/b.txt", 5000),
    "content2/a.txt": _text("content2/a.txt", 4000),
    "content2/b.txt": _text("content2/b.txt", 5000),
    "names/a.txt": _text("names/a.txt", 600),
    "names/b.txt": _text("names/b.txt", 700),
    "targets/a.txt": _text("targets/a.txt", 600),
    "targets/b.txt": _text("targets/b.txt", 700),
    "move/src/a.txt": _text("move/src/a.txt", 900),
    "move/dst/other.txt": _text("move/dst/other.txt", 901),
    "list/entry_meta_flipped/a.txt": _text("list/entry_meta_flipped/a.txt", 100),
    "list/entry_meta_flipped/b.txt": _text("list/entry_meta_flipped/b.txt", 101),
    "list/entry_name_flipped/a.txt": _text("list/entry_name_flipped/a.txt", 102),
    "list/entry_name_flipped/b.txt": _text("list/entry_name_flipped/b.txt", 103),
    "list/entry_moved_in/a.txt": _text("list/entry_moved_in/a.txt", 104),
    "list/entry_moved_in/other/b.txt": _text("list/entry_moved_in/other/b.txt", 105),
    "meta/a.txt": _text("meta/a.txt", 1100),
    "meta/b.txt": _text("meta/b.txt", 1200),
    "metaver/v.txt": _text("metaver/v.txt", 1300),
    "metadir/sub/inner.txt": _text("metadir/sub/inner.txt", 1400),
    "isdir-file/file.txt": _text("isdir-file/file.txt", 1500),
    "isdir-dir/sub/x.txt": _text("isdir-dir/sub/x.txt", 1600),
    "rollback-full/a.txt": _text("rollback-full/a.txt", 1700),
    "rollback-meta/a.txt": _text("rollback-meta/a.txt", 1701),
    "rollback-manifest/a.bin": _bytes("rb-manifest", MED),
    "rbfresh/a.txt": _text("rbfresh/a.txt", 1800),
    "rbmount/a.txt": _text("rbmount/a.txt", 1900),
    "rbcrash/a.txt": _text("rbcrash/a.txt", 1901),
    "victim.txt": _text("victim.txt", 2100),
    "decoy/h/victim.txt": _text("decoy/h/victim.txt (a forgery)", 2100),
    "dirtime/sub/a.txt": _text("dirtime/sub/a.txt", 2150),
    "hide/a.txt": _text("hide/a.txt", 2200),
    "resurrect/a.txt": _text("resurrect/a.txt", 2300),
}


@dataclass
class World:
    server: object
    machine: Machine
    hs: HostileServer
    src: Path                     # the local copy of /h
    ids: dict[str, UUID]          # remote path -> inode id
    tmp: Path

    def id(self, rel: str) -> UUID:
        return self.ids["/h/" + rel]

    def dir_id(self, rel_dir: str) -> UUID:
        """A directory's id, found by walking up from a file known to live under it."""
        target = "/h/" + rel_dir
        path, inode = next((p, i) for p, i in self.ids.items() if p.startswith(target + "/"))
        while path != target:
            inode, path = self.hs.parent_of(inode), path.rsplit("/", 1)[0]
        return inode

    def _outdir(self) -> Path:
        d = self.tmp / f"dl{len(list(self.tmp.iterdir()))}"
        d.mkdir()
        return d

    def download(self, rel: str, machine: Machine | None = None) -> bytes:
        out = self._outdir()
        (machine or self.machine).run("download", "/h/" + rel, "-o", str(out))
        return (out / Path(rel).name).read_bytes()

    def refused(self, rel: str, pattern: str, machine: Machine | None = None) -> str:
        """client.py download fails with one error line matching ``pattern`` and writes nothing."""
        out = self._outdir()
        proc = (machine or self.machine).run("download", "/h/" + rel, "-o", str(out), check=False)
        line = error_line(proc)
        assert re.search(pattern, line), line
        assert list(out.iterdir()) == [], "a tampered download left a file behind"
        return line

    def upload_new_version(self, rel: str, data: bytes) -> None:
        path = self.src / rel
        path.write_bytes(data)
        self.machine.run("upload", str(path), "--to", "/h/" + str(Path(rel).parent))


@pytest.fixture(scope="module")
def world(shared_server, tmp_path_factory):
    machine = Machine(tmp_path_factory.mktemp("hostile-machine"), shared_server.url).register()
    src = tmp_path_factory.mktemp("hostile-src") / "h"
    for rel, data in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    machine.run("upload", "-r", str(src))
    hs = HostileServer(shared_server.data_dir, machine.username)
    try:
        yield World(shared_server, machine, hs, src, uploads(machine), tmp_path_factory.mktemp("dl"))
    finally:
        hs.close()


@pytest.fixture
def mount(world, make_mount):
    """``mount()``: a fresh mount of the module's account (fresh caches), unmounted
    cleanly at teardown (make_mount's cleanup still backs this up)."""
    mounts = []

    def factory():
        m = make_mount(world.machine)
        mounts.append(m)
        return m

    yield factory
    for m in mounts:
        if m.is_mounted():
            try:
                m.unmount()
            except AssertionError:
                continue
        if m.pid and _exited(m.pid):
            # `mount.py --unmount` waited for the daemon to exit. Its zombie is
            # reaped by init, sometimes a second later: no need to wait for that.
            m.pid = None


def _exited(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def mount_eio(mount, rel: str, *reasons: str, logged: str | None = None) -> None:
    """Reading /h/rel through the mount fails with EIO (nothing returned) and the
    mount logs an integrity failure matching ``reasons`` that names the path
    (or ``logged``: the kernel looks a path up one component at a time, so a
    tampered directory is reported under its own path)."""
    path = mount.path / "h" / rel
    with pytest.raises(OSError) as exc:
        data = path.read_bytes()
        pytest.fail(f"read {len(data)} bytes of a tampered file")
    assert exc.value.errno == errno.EIO, exc.value
    log = mount_log(mount)
    assert log_lines(log, "integrity check failed", re.escape("/h/" + (logged or rel)) + ":",
                     *reasons), log


def mount_enoent(mount, rel: str) -> None:
    with pytest.raises(OSError) as exc:
        (mount.path / "h" / rel).read_bytes()
    assert exc.value.errno == errno.ENOENT, exc.value


def mount_absent(mount, rel: str) -> None:
    """The name cannot be opened: ENOENT if it is looked up on its own, EIO if the
    mount looks it up through a listing of the (tampered) directory."""
    with pytest.raises(OSError) as exc:
        (mount.path / "h" / rel).read_bytes()
    assert exc.value.errno in (errno.ENOENT, errno.EIO), exc.value


# ================================================================ control
def test_control_untampered_files_read_back(world, mount):
    """The harness itself: untouched files come back intact both ways."""
    assert world.download("control/ok.bin") == FILES["control/ok.bin"]
    m = mount()
    for rel in ("control/ok.bin", "control/ok.txt"):
        assert (m.path / "h" / rel).read_bytes() == FILES[rel]
    assert "integrity check failed" not in mount_log(m)


# ================================================================ flipped bits
@pytest.mark.parametrize("target", ["chunk", "manifest", "key", "meta", "name"])
def test_flipped_bit(world, mount, target):
    """One bit flipped in each kind of stored record."""
    hs = world.hs
    rel = f"flip-{target}/f.bin" if target == "chunk" else f"flip-{target}/f.txt"
    a = world.id(rel)
    if target == "chunk":
        blob = hs.blobs(a)[1]
        data = blob.read()       # (the exact middle is a segment's version byte)
        hs.write_blob(a, blob.id, flip_bit(data, len(data) // 2 + 1000))
        why = rf"chunk \d of inode {a} failed verification: authentication failed"
    elif target == "manifest":
        hs.set_inode(a, manifest=flip_b64(hs.inode(a)["manifest"]))
        why = f"manifest of inode {a} does not match its attributes"
    elif target == "key":
        hs.set_key(a, flip_bit(hs.key(a)))
        why = f"the key of file {a} was tampered with or swapped"
    elif target == "meta":
        hs.set_inode(a, meta=flip_b64(hs.inode(a)["meta"]))
        why = f"attributes of inode {a} failed verification"
    else:
        entry = hs.entry_of(a)
        hs.set_entry(entry, name=flip_b64(entry["name"]))
        why = f"an entry of directory {entry['parent']} failed verification"
    world.refused(rel, why)
    m = mount()
    mount_eio(m, rel, why)


# ================================================================ chunk-level attacks
def test_chunks_reordered(world, mount):
    """Two full-size chunks of one file (same key, same length) swapped on disk."""
    hs, rel = world.hs, "reorder/a.bin"
    a = world.id(rel)
    first, second = hs.blobs(a)[:2]
    data1, data2 = first.read(), second.read()
    assert len(data1) == len(data2)
    hs.write_blob(a, first.id, data2)
    hs.write_blob(a, second.id, data1)
    why = rf"chunk [01] of inode {a} failed verification: chunk segment does not belong here"
    world.refused(rel, why)
    m = mount()
    mount_eio(m, rel, why)
    # The untouched tail chunk still reads correctly: errors are per chunk.
    with open(m.path / "h" / rel, "rb") as f:
        f.seek(2 * MiB)
        assert f.read() == FILES[rel][2 * MiB:]


def test_stale_chunk_of_same_file_replayed(world, mount):
    """A chunk of the file's previous version (same key: it decrypts fine) served
    in place of the current one. Only the blob id sealed in each segment can catch this."""
    hs, rel = world.hs, "stale/a.bin"
    a = world.id(rel)
    old = hs.blobs(a)[0].read()
    world.upload_new_version(rel, _bytes("stale-v2", MED))
    current = hs.blobs(a)[0]
    assert len(current.read()) == len(old)
    hs.write_blob(a, current.id, old)
    why = rf"chunk 0 of inode {a} failed verification: chunk segment does not belong here"
    world.refused(rel, why)
    mount_eio(mount(), rel, why)


@pytest.mark.parametrize("how", ["drop_last_chunk", "cut_chunk"])
def test_truncated(world, mount, how):
    hs = world.hs
    rel = "truncate/drop.bin" if how == "drop_last_chunk" else "truncate/cut.bin"
    a = world.id(rel)
    if how == "drop_last_chunk":
        tail = hs.blobs(a)[-1]                  # the smallest blob is the tail
        hs.delete_blob(a, tail.id)
        why = f"a chunk of inode {a} is missing on the server"
    else:
        blob = hs.blobs(a)[0]
        hs.write_blob(a, blob.id, blob.read()[: blob.size // 2])
        why = rf"chunk 0 of inode {a} failed verification: chunk has the wrong length"
    world.refused(rel, why)
    mount_eio(mount(), rel, why)


def test_extended_chunk(world, mount):
    """Bytes appended to a stored chunk (a whole extra segment would still be caught:
    the manifest's size fixes the exact token length)."""
    hs, rel = world.hs, "extend/append.bin"
    a = world.id(rel)
    blob = hs.blobs(a)[-1]
    hs.write_blob(a, blob.id, blob.read() + os.urandom(48))
    why = rf"chunk 2 of inode {a} failed verification: chunk has the wrong length"
    world.refused(rel, why)
    mount_eio(mount(), rel, why)


def test_extra_blob_is_ignored(world, mount):
    """An extra blob next to a file's chunks: the manifest fixes the chunk list and
    the size, so it is never read; the file reads back exactly."""
    hs, rel = world.hs, "extend/extra.bin"
    a = world.id(rel)
    hs.add_blob(a, hs.blobs(a)[0].read())        # even a valid-looking token of this file
    hs.add_blob(a, os.urandom(MiB))
    assert world.download(rel) == FILES[rel]
    m = mount()
    path = m.path / "h" / rel
    assert path.stat().st_size == len(FILES[rel])
    assert path.read_bytes() == FILES[rel]


def test_chunk_swapped_from_other_file(world, mount):
    hs, rel = world.hs, "chunkswap/a.bin"
    a, b = world.id(rel), world.id("chunkswap/b.bin")
    mine, theirs = hs.blobs(a)[0], hs.blobs(b)[0]
    assert mine.size == theirs.size
    hs.write_blob(a, mine.id, theirs.read())
    why = rf"chunk 0 of inode {a} failed verification: authentication failed"
    world.refused(rel, why)
    m = mount()
    mount_eio(m, rel, why)
    assert (m.path / "h/chunkswap/b.bin").read_bytes() == FILES["chunkswap/b.bin"]


# ================================================================ keys and whole contents
@pytest.mark.parametrize("how", ["from_other_file", "unknown_generation"])
def test_file_key_swapped(world, mount, how):
    hs = world.hs
    if how == "from_other_file":
        rel = "keyswap/a.txt"
        a, b = world.id(rel), world.id("keyswap/b.txt")
        hs.set_inode(a, key_gen=hs.inode(b)["key_gen"], wrapped_key=hs.inode(b)["wrapped_key"])
        why = f"the key of file {a} was tampered with or swapped"
    else:
        rel = "keygen/a.txt"
        a = world.id(rel)
        hs.set_inode(a, key_gen=hs.inode(a)["key_gen"] + 41)
        why = f"file {a} names an unknown key generation"
    world.refused(rel, why)
    mount_eio(mount(), rel, why)


@pytest.mark.parametrize("how", ["manifest_and_chunks", "whole_record"])
def test_content_replaced_by_other_file(world, mount, how):
    """A's content replaced by B's: B's manifest and every chunk of B copied into A
    (and, for ``whole_record``, B's attributes, version and key as well)."""
    hs = world.hs
    d = "content" if how == "manifest_and_chunks" else "content2"
    rel = f"{d}/a.txt"
    a, b = world.id(rel), world.id(f"{d}/b.txt")
    for blob in hs.blobs(a):
        hs.delete_blob(a, blob.id)
    for blob in hs.blobs(b):
        hs.add_blob(a, blob.read(), blob.id)
    donor = hs.inode(b)
    if how == "manifest_and_chunks":
        hs.set_inode(a, manifest=donor["manifest"])
        why = f"manifest of inode {a} does not match its attributes"
    else:
        hs.set_inode(a, manifest=donor["manifest"], meta=donor["meta"], version=donor["version"],
                     key_gen=donor["key_gen"], wrapped_key=donor["wrapped_key"])
        why = f"attributes of inode {a} failed verification: attributes belong to another inode"
    world.refused(rel, why)
    m = mount()
    mount_eio(m, rel, why)
    if how == "manifest_and_chunks":          # B itself is unharmed
        assert (m.path / "h" / d / "b.txt").read_bytes() == FILES[f"{d}/b.txt"]


# ================================================================ names
@pytest.mark.parametrize("column", ["name", "inode"])
def test_name_swapped(world, mount, column):
    """Two entries of one directory exchange their encrypted names (``name``), or
    each name is pointed at the other's file (``inode``): either way "a.txt"
    would open b.txt's content. The name is sealed with the inode id it names."""
    hs = world.hs
    d = "names" if column == "name" else "targets"
    rel = f"{d}/a.txt"
    ea, eb = hs.entry_of(world.id(rel)), hs.entry_of(world.id(f"{d}/b.txt"))
    hs.set_entry(ea, **{column: eb[column]})
    hs.set_entry(eb, **{column: ea[column]})
    why = f"an entry of directory {ea['parent']} failed verification: entry name points at another inode"
    world.refused(rel, why)
    world.refused(f"{d}/b.txt", why)
    proc = world.machine.run("ls", f"/h/{d}", check=False)
    assert "entry name points at another inode" in error_line(proc)
    m = mount()
    mount_eio(m, rel, why)
    mount_eio(m, f"{d}/b.txt", why)


def test_entry_moved_to_other_dir(world, mount):
    """An entry (encrypted name, name hash, inode) moved into another directory. The
    name hash is a MAC over (parent id, name): listing the new directory fails;
    the file cannot be opened under the new directory at all; in the old one it
    is missing from the sealed entry set."""
    hs = world.hs
    a = world.id("move/src/a.txt")
    dst = world.dir_id("move/dst")
    hs.set_entry(hs.entry_of(a), parent=str(dst))
    why = f"an entry of directory {dst} failed verification: entry name moved from another directory"
    proc = world.machine.run("ls", "/h/move/dst", check=False)
    assert re.search(why, error_line(proc))
    world.refused("move/dst/a.txt", why)
    world.refused("move/src/a.txt", HIDDEN)
    m = mount()
    mount_absent(m, "move/dst/a.txt")


@pytest.mark.parametrize("how", ["entry_meta_flipped", "entry_name_flipped", "entry_moved_in"])
def test_listing_of_tampered_directory(world, mount, how):
    """Listing a directory with one tampered entry fails as a whole, with EIO in the
    mount (never a partial or wrong listing) and one error line in the CLI."""
    hs = world.hs
    d = f"list/{how}"
    a = world.id(f"{d}/a.txt")
    entry = hs.entry_of(a)
    if how == "entry_meta_flipped":
        hs.set_inode(a, meta=flip_b64(hs.inode(a)["meta"]))
        why = f"attributes of inode {a} failed verification"
    elif how == "entry_name_flipped":
        hs.set_entry(entry, name=flip_b64(entry["name"]))
        why = f"an entry of directory {entry['parent']} failed verification: authentication failed"
    else:
        other = world.dir_id(f"list/{how}/other")
        hs.set_entry(entry, parent=str(other))
        # (its old folder, on the way there, no longer adds up to its sealed entry set)
        d, why = f"{d}/other", f"(an entry of directory {other} failed verification: entry name moved|{HIDDEN})"
    assert re.search(why, error_line(world.machine.run("ls", f"/h/{d}", check=False)))
    m = mount()
    with pytest.raises(OSError) as exc:
        os.listdir(m.path / "h" / d)
    assert exc.value.errno == errno.EIO, exc.value
    log = mount_log(m)
    assert log_lines(log, "integrity check failed", re.escape(f"/h/{d}"), why), log


# ================================================================ metadata
@pytest.mark.parametrize("how", ["swapped", "version_bumped", "parent_dir_flipped"])
def test_metadata_edited(world, mount, how):
    hs = world.hs
    if how == "swapped":
        rel = "meta/a.txt"
        a, b = world.id(rel), world.id("meta/b.txt")
        ma, mb = hs.inode(a)["meta"], hs.inode(b)["meta"]
        hs.set_inode(a, meta=mb)
        hs.set_inode(b, meta=ma)
        # The client checks the whole directory: it may meet either swapped entry first.
        why = f"attributes of inode ({a}|{b}) failed verification: attributes belong to another inode"
    elif how == "version_bumped":
        rel = "metaver/v.txt"
        a = world.id(rel)
        hs.set_inode(a, version=hs.inode(a)["version"] + 5)
        why = f"attributes of inode {a} failed verification: attribute version does not match"
    else:
        rel = "metadir/sub/inner.txt"
        sub = world.dir_id("metadir/sub")
        hs.set_inode(sub, meta=flip_b64(hs.inode(sub)["meta"]))
        why = f"attributes of inode {sub} failed verification: authentication failed"
    world.refused(rel, why)
    mount_eio(mount(), rel, why,
              logged="metadir/sub" if how == "parent_dir_flipped" else None)
    if how == "version_bumped":
        # The lie did not poison the rollback ledger: the true version still reads.
        hs.set_inode(a, version=hs.inode(a)["version"] - 5)
        assert world.download(rel) == FILES[rel]


@pytest.mark.parametrize("how", ["file_as_dir", "dir_as_file"])
def test_is_dir_lie(world, mount, how):
    """The server's plaintext is_dir flag contradicts the encrypted mode."""
    hs = world.hs
    if how == "file_as_dir":
        rel = "isdir-file/file.txt"
        target = world.id(rel)
        hs.set_inode(target, is_dir=1)
        hs.set_entry(hs.entry_of(target), is_dir=1)
    else:
        rel = "isdir-dir/sub/x.txt"
        target = world.dir_id("isdir-dir/sub")
        hs.set_inode(target, is_dir=0)
        hs.set_entry(hs.entry_of(target), is_dir=0)
    why = f"inode {target}: server's type disagrees with its attributes"
    world.refused(rel, why)
    mount_eio(mount(), rel, why, logged="isdir-dir/sub" if how == "dir_as_file" else None)


# ================================================================ rollback
@pytest.mark.parametrize("how", ["whole_file", "old_meta_new_version", "old_manifest_and_chunks"])
def test_rollback(world, mount, how):
    """Version N saved, the client updates the file to N+1 (its versions.db records
    N+1), then the server restores N. Restoring honestly (version N) trips the
    high-water mark; claiming N+1 for the old attributes trips their version
    binding; old content under new attributes trips the manifest digest."""
    hs = world.hs
    rel = {"whole_file": "rollback-full/a.txt", "old_meta_new_version": "rollback-meta/a.txt",
           "old_manifest_and_chunks": "rollback-manifest/a.bin"}[how]
    a = world.id(rel)
    snap = hs.snapshot(a)
    new = _text(rel + " v2", len(FILES[rel]) + 10) if rel.endswith(".txt") else _bytes("rb-v2", MED)
    world.upload_new_version(rel, new)
    version = hs.inode(a)["version"]
    assert version == snap.row["version"] + 1
    if how == "whole_file":
        hs.restore(snap)
        why = f"the server rolled inode {a} back from version {version} to {version - 1}"
    elif how == "old_meta_new_version":
        hs.restore(snap, ("meta", "manifest"))
        why = f"attributes of inode {a} failed verification: attribute version does not match"
    else:
        hs.restore(snap, ("manifest",))
        why = f"manifest of inode {a} does not match its attributes"
    world.refused(rel, why)
    mount_eio(mount(), rel, why)


def test_rollback_undetectable_on_a_fresh_machine(world, make_machine):
    """Limitation (documented): a client that never saw N+1 has nothing to compare
    with. A whole-file rollback is detected by the machine that saw N+1 and
    accepted by a brand-new one, which gets the old, authentic version N."""
    hs, rel = world.hs, "rbfresh/a.txt"
    a = world.id(rel)
    snap = hs.snapshot(a)
    world.upload_new_version(rel, _text("rbfresh v2", 1850))
    hs.restore(snap)
    world.refused(rel, f"the server rolled inode {a} back")
    fresh = make_machine(world.server)
    fresh.login(world.machine.username, world.machine.password)
    assert world.download(rel, machine=fresh) == FILES[rel]        # old, but authentic


def test_rollback_after_update_through_the_mount(world, mount):
    """The mount keeps the high-water mark too: a version it wrote is recorded at
    unmount, so a later rollback is caught by the command line."""
    hs, rel = world.hs, "rbmount/a.txt"
    a = world.id(rel)
    snap = hs.snapshot(a)
    m = mount()
    (m.path / "h" / rel).write_bytes(b"written through the mount\n")
    m.unmount()
    assert hs.inode(a)["version"] > snap.row["version"]
    hs.restore(snap)
    world.refused(rel, f"the server rolled inode {a} back")


def test_rollback_after_the_mount_crashed(world, mount):
    """A mount that dies (SIGKILL, power loss) after writing version N+1 must not
    forget N+1: the next client on this machine should still catch a rollback."""
    hs, rel = world.hs, "rbcrash/a.txt"
    a = world.id(rel)
    snap = hs.snapshot(a)
    m = mount()
    (m.path / "h" / rel).write_bytes(b"written through the mount, then it crashed\n")
    m.settle()
    assert hs.inode(a)["version"] > snap.row["version"]
    m.kill()
    hs.restore(snap)
    world.refused(rel, f"the server rolled inode {a} back")


# ================================================================ the root
def test_root_substitution(world, mount):
    """The account record names the root directory; a server that names another
    directory instead (here /h/decoy, which holds h/victim.txt) must not get
    /h/victim.txt answered from inside it: the CLI must refuse, the mount must
    give EIO."""
    hs = world.hs
    decoy = world.dir_id("decoy")
    real_root = hs.user()["root_inode"]
    forged = FILES["decoy/h/victim.txt"]
    hs.set_user(root_inode=str(decoy))
    problems = []
    try:
        out = world.tmp / "rootsub"
        out.mkdir()
        proc = world.machine.run("download", "/h/victim.txt", "-o", str(out), check=False)
        if (out / "victim.txt").exists() and (out / "victim.txt").read_bytes() == forged:
            problems.append("client.py download wrote the decoy's file as /h/victim.txt")
        elif proc.returncode == 0:
            problems.append("client.py download succeeded")
        elif not re.search("tampered", proc.stderr):
            problems.append(f"client.py download did not name the tampering: {proc.stderr!r}")
        # The root id is bound into the namespace key's wrapping: the mount must
        # refuse to start, with one clear line.
        try:
            m = mount()
        except AssertionError as exc:
            if "tampered" not in str(exc) or "Traceback" in str(exc):
                problems.append(f"mount.py failed without a clear tampering error: {exc}")
        else:
            try:
                if (m.path / "h/victim.txt").read_bytes() == forged:
                    problems.append("the mount served the decoy's file as /h/victim.txt")
            except OSError as exc:
                if exc.errno != errno.EIO:
                    problems.append(f"the mount failed with {exc!r}, not EIO")
    finally:
        hs.set_user(root_inode=real_root)
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("how", ["wrapped_master_flipped", "wrapped_namespace_flipped",
                                 "current_gen_bumped"])
def test_account_keys_tampered(world, make_mount, how):
    """The account's key records (master key wrapped under the password's KEK, the
    namespace key wrapped under the master key, the current generation): every
    command and the mount refuse to start, with one clear line."""
    hs = world.hs
    user = hs.user()
    rec = dict(hs.db.execute("SELECT * FROM master_keys WHERE user_id = ? AND gen = ?",
                             (hs.user_id, user["current_gen"])).fetchone())

    def set_rec(**cols):
        hs.db.execute(f"UPDATE master_keys SET {', '.join(c + ' = ?' for c in cols)}"
                      " WHERE user_id = ? AND gen = ?", (*cols.values(), hs.user_id, rec["gen"]))

    if how == "wrapped_master_flipped":
        set_rec(wrapped_master=flip_b64(rec["wrapped_master"]))
        why = "the saved keys no longer open this account"
    elif how == "wrapped_namespace_flipped":
        set_rec(wrapped_namespace=flip_b64(rec["wrapped_namespace"]))
        why = "namespace key does not fit its root folder.*tampered"
    else:
        hs.set_user(current_gen=user["current_gen"] + 6)
        why = "the server sent no key for the current generation"
    try:
        world.refused("control/ok.txt", why)
        with pytest.raises(AssertionError, match="mount.py .* failed") as exc:
            make_mount(world.machine)
        assert re.search("error: .*" + why, str(exc.value)), exc.value
    finally:
        set_rec(wrapped_master=rec["wrapped_master"], wrapped_namespace=rec["wrapped_namespace"])
        hs.set_user(current_gen=user["current_gen"])


def test_master_key_generation_rolled_back_under_a_live_mount(world, make_machine, make_mount, tmp_path):
    """After a rotate-key, a server that kept the retired master key record puts it
    back as current. A running mount refuses to go back (it would wrap new file
    keys under the retired key) and keeps the generation it has. (Its own account:
    the module's has deliberately broken keys that rotate-key would refuse.)"""
    machine = make_machine(world.server).register()
    (tmp_path / "before.txt").write_text("before\n")
    machine.run("upload", str(tmp_path / "before.txt"))
    hs = HostileServer(world.server.data_dir, machine.username)
    try:
        old_gen = hs.user()["current_gen"]
        retired = dict(hs.db.execute("SELECT * FROM master_keys WHERE user_id = ? AND gen = ?",
                                     (hs.user_id, old_gen)).fetchone())
        machine.run("rotate-key", "--password-stdin", input=machine.password + "\n")
        m = make_mount(machine)
        hs.db.execute(f"INSERT INTO master_keys ({', '.join(retired)}) VALUES ({', '.join('?' * len(retired))})",
                      tuple(retired.values()))
        hs.set_user(current_gen=old_gen)
        wait_until(lambda: log_lines(mount_log(m), f"rolled the master key back from generation "
                                                   f"{old_gen + 1} to {old_gen}"), 5,
                   what="the refused rollback in the mount's log")
        (m.path / "after.txt").write_text("after\n")
        m.settle()
        gens = hs.db.execute("SELECT key_gen, count(*) FROM inodes WHERE user_id = ? AND key_gen IS NOT NULL"
                             " GROUP BY key_gen", (hs.user_id,)).fetchall()
        assert [tuple(g) for g in gens] == [(old_gen + 1, 2)]
        m.unmount()
    finally:
        hs.close()


# ================================================================ listings
def test_hidden_entry_is_detected(world, mount):
    """The server deletes a file's entry: the folder's listing no longer adds up to
    the entry-set digest sealed in its attributes. (Before sealed digests the
    client reported a clean absence.)"""
    hs, rel = world.hs, "hide/a.txt"
    entry = hs.entry_of(world.id(rel))
    hs.db.execute("DELETE FROM dentries WHERE user_id = ? AND parent = ? AND name_hash = ?",
                  (hs.user_id, entry["parent"], entry["name_hash"]))
    world.refused(rel, HIDDEN)
    mount_eio(mount(), rel, HIDDEN)


def test_deleted_file_brought_back_is_detected(world, mount):
    """The user removes a file; the server puts back its last authentic version
    (inode, blobs, key, entry)."""
    hs, rel = world.hs, "resurrect/a.txt"
    a = world.id(rel)
    snap = hs.snapshot(a)
    entry = hs.entry_of(a)
    world.machine.run("rm", "/h/" + rel)
    world.refused(rel, "no such file or directory on the server")
    hs.db.execute("INSERT INTO inodes (user_id, id, is_dir, version, meta, manifest, key_gen, wrapped_key,"
                  " changed_seq) VALUES (?, ?, 0, ?, ?, ?, ?, ?, 0)",
                  (hs.user_id, str(a), snap.row["version"], snap.row["meta"], snap.row["manifest"],
                   snap.row["key_gen"], snap.row["wrapped_key"]))
    hs.db.execute("INSERT INTO dentries(user_id, parent, name_hash, inode, is_dir, name) VALUES (?, ?, ?, ?, 0, ?)",
                  (hs.user_id, entry["parent"], entry["name_hash"], str(a), entry["name"]))
    hs.inode_dir(a).mkdir(parents=True, exist_ok=True)
    hs.restore(snap)
    world.refused(rel, HIDDEN)
    mount_eio(mount(), rel, HIDDEN)


def test_old_listing_of_a_folder_is_a_rollback(world, mount):
    """The server serves a folder as it was before a file was added to it, old
    attributes and all (self-consistent): a client that saw the newer folder
    refuses it (the folder's version went back)."""
    hs = world.hs
    folder = world.dir_id("dirtime/sub")
    before = hs.inode(folder)
    world.upload_new_version("dirtime/sub/added.txt", b"added later\n")
    entry = hs.entry_of(uploads(world.machine)["/h/dirtime/sub/added.txt"])
    hs.db.execute("DELETE FROM dentries WHERE user_id = ? AND parent = ? AND name_hash = ?",
                  (hs.user_id, entry["parent"], entry["name_hash"]))
    hs.set_inode(folder, version=before["version"], meta=before["meta"])
    world.refused("dirtime/sub/a.txt", "rolled inode .* back")
    m = mount()
    with pytest.raises(OSError) as exc:
        os.listdir(m.path / "h" / "dirtime" / "sub")
    assert exc.value.errno == errno.EIO


# ================================================================ what the server sees
def test_server_stores_no_plaintext(world):
    """Nothing the server stores or logs contains a file name, a directory name, a
    byte of content or the password; the username is stored (it is the login)."""
    blobs = [p.read_bytes() for p in world.server.data_dir.rglob("*") if p.is_file()]
    everything = b"\0".join(blobs)
    assert world.machine.username.encode() in everything
    needles = [b"zkfs-plaintext-marker", world.machine.password.encode(), b"victim.txt",
               b"manifest.txt", b"chunkswap", b"resurrect", FILES["control/ok.bin"][1000:1032]]
    for needle in needles:
        assert needle not in everything, needle


def test_server_learns_sizes_and_shape(world):
    """What the server does learn, shown from its own records: each file's size to
    within 16 bytes per 64 KiB segment (segment token = 20-byte position header +
    plaintext + 1..16 bytes of padding + 57 bytes of Fernet framing), and which
    inode sits in which directory."""
    hs = world.hs
    for rel in ("control/ok.bin", "control/ok.txt", "keyswap/b.txt"):
        a = world.id(rel)
        blobs = hs.blobs(a)
        segments = -(-len(FILES[rel]) // SEGMENT_SIZE)
        overhead = sum(b.size for b in blobs) - len(FILES[rel])
        assert (57 + 20 + 1) * segments <= overhead <= (57 + 20 + 16) * segments
        assert len(blobs) == -(-len(FILES[rel]) // MiB)
    control = world.dir_id("control")
    assert hs.parent_of(world.id("control/ok.bin")) == hs.parent_of(world.id("control/ok.txt")) == control
