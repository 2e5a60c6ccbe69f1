"""Isolation between accounts: user B, with its own valid token, can neither see
nor touch anything of user A's (every id of A's is a 404 for B), and A's files
are intact afterwards."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from uuid import uuid4

import httpx
import pytest

from clitools import assert_ok, config, sha256_file, uploads, user_id, write_random
from zkfs.format import CHUNK_SIZE

pytestmark = pytest.mark.timeout(300)


def b64(n: int = 64) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def client(server, machine) -> httpx.Client:
    return httpx.Client(base_url=server.api, timeout=30,
                        headers={"Authorization": f"Bearer {config(machine)['token']}"})


def assert_404(r: httpx.Response, what: str) -> None:
    assert r.status_code == 404, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.json().get("code") == "not_found", f"{what}: {r.text[:300]}"


def walk(c: httpx.Client) -> tuple[str, list[dict]]:
    """(root id, every entry of the tree as {parent, name_hash, inode, is_dir, version})."""
    root = c.get("/account").json()["root_inode"]
    out, todo = [], [root]
    while todo:
        parent = todo.pop()
        r = c.get(f"/fs/dirs/{parent}/entries")
        assert r.status_code == 200, r.text
        for e in r.json()["entries"]:
            ino = e["inode"]
            out.append({"parent": parent, "name_hash": e["name_hash"], "name": e["name"],
                        "inode": ino["id"], "is_dir": ino["is_dir"], "version": ino["version"],
                        "meta": ino["meta"]})
            if ino["is_dir"]:
                todo.append(ino["id"])
    return root, sorted(out, key=lambda e: (e["parent"], e["name_hash"]))


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_other_users_objects_are_invisible_and_untouchable(server, make_machine, tmp_path):
    a = make_machine(server).register()
    b = make_machine(server).register()

    src = tmp_path / "DirA"
    local = {
        "/DirA/big.bin": write_random(src / "big.bin", 2 * CHUNK_SIZE + 123),
        "/DirA/small.txt": write_random(src / "small.txt", 3000),
        "/DirA/Sub/deep.bin": write_random(src / "Sub" / "deep.bin", 200_000),
    }
    assert_ok(a.run("upload", "-r", str(src)))
    top = write_random(tmp_path / "top.txt", 10)
    assert_ok(a.run("upload", str(top)))
    local["/top.txt"] = top
    assert_ok(a.run("mkdir", "/EmptyA"))

    ca, cb = client(server, a), client(server, b)
    a_root, a_entries = walk(ca)
    a_dirs = [a_root] + [e["inode"] for e in a_entries if e["is_dir"]]
    a_files = [e["inode"] for e in a_entries if not e["is_dir"]]
    assert len(a_files) == 4 and len(a_dirs) == 4
    assert {u["uuid"] for u in uploads(a).values()} == set(a_files)
    a_keys = ca.get("/keys").json()["keys"]
    assert {k["inode"] for k in a_keys} == set(a_files)
    a_storage = server.data_dir / "storage" / user_id(a)
    a_blobs = [(p.parent.name, p.name) for p in a_storage.glob("*/*")
               if p.name != "key" and not p.name.endswith(".tmp")]
    assert len(a_blobs) >= 6          # 3 + 1 chunks stored as blobs, plus the inline ones
    storage_before = tree_digest(a_storage)

    # positive controls: these ids are real (A sees them) and B's token is valid
    for ino in a_files + a_dirs:
        assert ca.get(f"/fs/inodes/{ino}").status_code == 200
    for ino, blob in a_blobs:
        assert ca.get(f"/blobs/{ino}/{blob}").status_code == 200
    assert cb.get("/account").status_code == 200
    b_root, b_entries = walk(cb)
    assert b_entries == []
    b_used = cb.get("/fs/statfs").json()["used_bytes"]         # its root's attributes

    # ---- reads: every one of A's ids is a 404 for B
    for ino in a_files + a_dirs:
        assert_404(cb.get(f"/fs/inodes/{ino}"), f"GET inode {ino}")
    for d in a_dirs:
        assert_404(cb.get(f"/fs/dirs/{d}/entries"), f"list dir {d}")
    assert cb.post("/fs/listings", json={"dirs": [str(d) for d in a_dirs]}).json() == {"listings": []}
    for e in a_entries:
        assert_404(cb.get(f"/fs/dirs/{e['parent']}/entries/{e['name_hash']}"), "lookup entry")
    for ino in a_files:
        assert_404(cb.get(f"/fs/inodes/{ino}/key"), f"GET key {ino}")
    for ino, blob in a_blobs:
        assert_404(cb.get(f"/blobs/{ino}/{blob}"), f"GET blob {ino}/{blob}")
        assert_404(cb.get(f"/blobs/{ino}/{blob}", headers={"Range": "bytes=0-99"}), "GET blob range")
    a_ids = set(a_files) | set(a_dirs)
    assert not a_ids & {k["inode"] for k in cb.get("/keys").json()["keys"]}
    assert not a_ids & set(cb.get("/fs/changes", params={"since": 0}).json()["inodes"])
    assert cb.get("/fs/statfs").json()["used_bytes"] == b_used

    # ---- writes through /fs/ops: each is a 404 and changes nothing
    small = next(e for e in a_entries if not e["is_dir"])
    sub_dir = next(e for e in a_entries if e["is_dir"])
    hsh = lambda: os.urandom(32).hex()  # noqa: E731
    fake_manifest = b64(200)
    a_blob_of = {ino: blob for ino, blob in a_blobs}
    ops = {
        "unlink A's entry": {"op": "unlink", "parent": small["parent"], "name_hash": small["name_hash"]},
        "unlink A's entry (keep_orphan)": {"op": "unlink", "parent": small["parent"],
                                           "name_hash": small["name_hash"], "keep_orphan": True},
        "rmdir A's dir": {"op": "rmdir", "parent": sub_dir["parent"], "name_hash": sub_dir["name_hash"]},
        "rename A's entry within A's dir": {
            "op": "rename", "src_parent": small["parent"], "src_hash": small["name_hash"],
            "dst_parent": small["parent"], "dst_hash": hsh(), "dst_name": b64()},
        "rename A's entry into B's root": {
            "op": "rename", "src_parent": small["parent"], "src_hash": small["name_hash"],
            "dst_parent": b_root, "dst_hash": hsh(), "dst_name": b64()},
        "rename A's dir into B's root": {
            "op": "rename", "src_parent": sub_dir["parent"], "src_hash": sub_dir["name_hash"],
            "dst_parent": b_root, "dst_hash": hsh(), "dst_name": b64()},
        "create in A's dir": {"op": "create", "inode": str(uuid4()), "is_dir": False, "meta": b64(),
                              "parent": a_root, "name_hash": hsh(), "name": b64()},
        "link A's file into B's root": {"op": "link", "inode": small["inode"], "parent": b_root,
                                        "name_hash": hsh(), "name": b64()},
        "setmeta A's file": {"op": "setmeta", "inode": small["inode"], "base_version": small["version"],
                             "meta": b64()},
        "setmeta A's root": {"op": "setmeta", "inode": a_root, "base_version": 1, "meta": b64()},
        "commit A's file (no blobs)": {"op": "commit", "inode": small["inode"],
                                       "base_version": small["version"], "meta": b64(),
                                       "manifest": fake_manifest, "blobs": []},
        "commit A's file (A's blob)": {"op": "commit", "inode": small["inode"],
                                       "base_version": small["version"], "meta": b64(),
                                       "manifest": fake_manifest,
                                       "blobs": [a_blob_of[small["inode"]]]},
        "commit A's file (inline overwrite of A's blob)": {
            "op": "commit", "inode": small["inode"], "base_version": small["version"], "meta": b64(),
            "manifest": fake_manifest, "blobs": [a_blob_of[small["inode"]]],
            "inline": [{"blob_id": a_blob_of[small["inode"]], "data": b64(100)}]},
        "delete A's inode": {"op": "delete_inode", "inode": small["inode"]},
    }
    for label, op in ops.items():
        assert_404(cb.post("/fs/ops", json={"ops": [op]}), label)
    # keys
    assert_404(cb.put("/keys", json={"keys": [{"inode": small["inode"], "gen": 1, "wrapped_key": b64()}]}),
               "PUT A's key")

    # ---- blob writes at A's ids: B can only ever write into its own namespace, and
    # learns nothing (same answer as for ids that were never used)
    ino, blob = a_blobs[0]
    r_fresh = cb.put(f"/blobs/{uuid4()}/{uuid4()}", content=b"B's bytes")
    r_a = cb.put(f"/blobs/{ino}/{blob}", content=b"B's bytes")
    assert r_a.status_code == r_fresh.status_code, (r_a.text, r_fresh.text)
    if r_a.status_code == 201:
        got = cb.get(f"/blobs/{ino}/{blob}")
        assert got.status_code == 200 and got.content == b"B's bytes"
        # B builds a file of its own over those ids, then deletes it
        name_hash = hsh()
        r = cb.post("/fs/ops", json={"ops": [
            {"op": "create", "inode": ino, "is_dir": False, "meta": b64(), "parent": b_root,
             "name_hash": name_hash, "name": b64(), "key_gen": 1, "wrapped_key": b64(60)},
            {"op": "commit", "inode": ino, "base_version": 1, "meta": b64(), "manifest": b64(),
             "blobs": [blob]}]})
        if r.status_code == 200:
            assert cb.get(f"/blobs/{ino}/{blob}").content == b"B's bytes"
            assert cb.post("/fs/ops", json={"ops": [
                {"op": "unlink", "parent": b_root, "name_hash": name_hash}]}).status_code == 200

    # ---- A is intact: same tree, same versions, same stored bytes, same files
    assert walk(ca) == (a_root, a_entries)
    assert tree_digest(a_storage) == storage_before
    assert ca.get("/keys").json()["keys"] == a_keys
    for remote, path in local.items():
        out = tmp_path / "check" / remote.strip("/").replace("/", "_")
        out.parent.mkdir(exist_ok=True)
        assert_ok(a.run("download", remote, "-o", str(out)))
        assert sha256_file(out) == sha256_file(path), remote
    ca.close()
    cb.close()
