"""Journal records: what one call changed, as the mount keeps it until the server
has it (journal.py), and the op each becomes when it is sent (``to_op``).

A record names inodes by id and entries by (parent id, name): nothing in it
depends on the server's state at the time, but the CAS base of a file's new
version or attributes, which this mount knew when it made the change (a newer
one on the server is another machine's change: a conflict). A folder's attribute
change carries no base: its entry set moves with every change of its entries,
and its attributes are sealed on whatever version that is when sent.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from ..format import Attrs, ChunkRef, Manifest
from ..ops import Op
from ..vault import Vault


@dataclass(frozen=True)
class EntryRef:
    """An inode as an entry names it (what op_rename and op_exchange need)."""
    id: UUID
    is_dir: bool


def _ref(doc: dict) -> EntryRef:
    return EntryRef(UUID(doc["id"]), bool(doc["dir"]))


def ref_doc(node) -> dict:
    return {"id": str(node.id), "dir": bool(node.is_dir)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- record bodies
def create(parent: UUID, name: str, inode: UUID, attrs: Attrs, file_key: bytes | None, at: int) -> dict:
    body = {"t": "create", "parent": str(parent), "name": name, "inode": str(inode), "attrs": attrs.to_doc(),
            "at": at}
    return body | ({"key": _b64(file_key)} if file_key is not None else {})


def link(inode: UUID, parent: UUID, name: str, at: int) -> dict:
    return {"t": "link", "inode": str(inode), "parent": str(parent), "name": name, "at": at}


def unlink(parent: UUID, name: str, inode: UUID, keep_orphan: bool, at: int) -> dict:
    return {"t": "unlink", "parent": str(parent), "name": name, "inode": str(inode), "keep": keep_orphan, "at": at}


def rmdir(parent: UUID, name: str, inode: UUID, at: int) -> dict:
    return {"t": "rmdir", "parent": str(parent), "name": name, "inode": str(inode), "at": at}


def rename(node, src_parent: UUID, src_name: str, dst_parent: UUID, dst_name: str, replaces, keep_orphan: bool,
           at: int) -> dict:
    return {"t": "rename", "node": ref_doc(node), "sp": str(src_parent), "sn": src_name,
            "dp": str(dst_parent), "dn": dst_name, "replaces": ref_doc(replaces) if replaces else None,
            "keep": keep_orphan, "at": at}


def exchange(a, a_parent: UUID, a_name: str, b, b_parent: UUID, b_name: str, at: int) -> dict:
    return {"t": "exchange", "a": ref_doc(a), "ap": str(a_parent), "an": a_name,
            "b": ref_doc(b), "bp": str(b_parent), "bn": b_name, "at": at}


def attrs(inode: UUID, base: int | None, new: Attrs, at: int) -> dict:
    """``base``: the version the change is on (None for a folder, whose entry set is
    not part of the record: the batch seals the one the folder has when sent)."""
    doc = new.to_doc()
    doc.pop("es", None)
    return {"t": "attrs", "inode": str(inode), "base": base, "attrs": doc, "at": at}


def commit(inode: UUID, base: int, new: Attrs, manifest: Manifest, inline: dict[UUID, bytes], token: bytes) -> dict:
    """A file's new version: its chunks are on the server (staged) or in the journal's
    blobs; ``inline`` chunk tokens travel in the record (and in the commit); ``token``
    is the manifest sealed under the file key (``new`` carries its digest)."""
    return {"t": "commit", "inode": str(inode), "base": base, "attrs": new.to_doc(), "mt": _b64(token),
            "manifest": {"size": manifest.size, "cs": manifest.chunk_size,
                         "chunks": [str(c.blob_id) for c in manifest.chunks]},
            "inline": {str(b): _b64(t) for b, t in inline.items()}}


def delete(inode: UUID) -> dict:
    return {"t": "delete", "inode": str(inode)}


# ---------------------------------------------------------------- reading them back
def inodes_of(body: dict) -> set[UUID]:
    """The inodes a record changes the attributes or content of."""
    if body["t"] in ("attrs", "commit", "delete", "create"):
        return {UUID(body["inode"])}
    return set()


def describe(body: dict) -> str:
    """A record for the log (names, not ids: it never leaves this machine)."""
    t = body["t"]
    if t == "rename":
        return f"rename {body['sn']} -> {body['dn']}"
    if t == "exchange":
        return f"exchange {body['an']} <-> {body['bn']}"
    if "name" in body:
        return f"{t} {body['name']}"
    return f"{t} of inode {body.get('inode')}"


def named_inodes(body: dict) -> set[str]:
    """Every inode a record names (as strings), whatever it does to it."""
    t = body["t"]
    if t == "rename":
        return {body["node"]["id"]} | ({body["replaces"]["id"]} if body["replaces"] else set())
    if t == "exchange":
        return {body["a"]["id"], body["b"]["id"]}
    return {body["inode"]} if "inode" in body else set()


def manifest_of(body: dict) -> Manifest:
    m = body["manifest"]
    return Manifest(UUID(body["inode"]), size=m["size"], chunk_size=m["cs"],
                    chunks=[ChunkRef(UUID(b)) for b in m["chunks"]])


def inline_of(body: dict) -> dict[UUID, bytes]:
    return {UUID(b): base64.b64decode(t) for b, t in body.get("inline", {}).items()}


def to_op(vault: Vault, body: dict[str, Any]) -> Op:
    """The op that sends a record (sealed under the keys current now)."""
    t = body["t"]
    if t == "create":
        key = base64.b64decode(body["key"]) if "key" in body else None
        inode = UUID(body["inode"])
        if key is not None:
            vault.remember_file_key(inode, key)
        return vault.op_create(UUID(body["parent"]), body["name"], inode, Attrs.from_doc(body["attrs"]), key,
                               at_ns=body["at"])
    if t == "link":
        return vault.op_link(UUID(body["inode"]), UUID(body["parent"]), body["name"], at_ns=body["at"])
    if t == "unlink":
        return vault.op_unlink(UUID(body["parent"]), body["name"], UUID(body["inode"]), keep_orphan=body["keep"],
                               at_ns=body["at"])
    if t == "rmdir":
        return vault.op_rmdir(UUID(body["parent"]), body["name"], UUID(body["inode"]), at_ns=body["at"])
    if t == "rename":
        replaces = _ref(body["replaces"]) if body["replaces"] else None
        return vault.op_rename(_ref(body["node"]), UUID(body["sp"]), body["sn"], UUID(body["dp"]), body["dn"],
                               replaces=replaces, keep_orphan=body["keep"], at_ns=body["at"])
    if t == "exchange":
        return vault.op_exchange(_ref(body["a"]), UUID(body["ap"]), body["an"], _ref(body["b"]), UUID(body["bp"]),
                                 body["bn"], at_ns=body["at"])
    if t == "attrs":
        new = Attrs.from_doc(body["attrs"])
        if new.is_dir:
            op = vault.op_setmeta(UUID(body["inode"]), 0, new, at_ns=body["at"])
            op.wire["base_version"] = None          # sealed on the folder's version when sent
            return op
        return vault.op_setmeta(UUID(body["inode"]), body["base"], new, at_ns=body["at"])
    if t == "commit":
        return vault.op_commit(UUID(body["inode"]), body["base"], Attrs.from_doc(body["attrs"]), manifest_of(body),
                               list(inline_of(body).items()), token=base64.b64decode(body["mt"]))
    if t == "delete":
        return vault.op_delete_inode(UUID(body["inode"]))
    raise ValueError(f"unknown journal record {t!r}")
