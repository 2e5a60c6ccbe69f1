"""Conflicts with another machine: two mounts changed the same version of a file,
or created the same name. The first to reach the server keeps the name; the other
version is saved beside it as ``NAME (conflict DATE TIME HOST XXXX).EXT``,
created atomically with its content. Never between two processes of one mount:
they share one state per file (handles.py)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from uuid import UUID, uuid4

from .. import crypto
from ..errors import ServerError, ZkfsError
from ..format import MAX_NAME_BYTES, Attrs, Manifest
from ..vault import Node
from . import records
from .openfile import OpenFile, PendingCreate

log = logging.getLogger("zkfs.mount.fs")


def conflict_name(name: str, hostname: str) -> str:
    """NAME (conflict DATE TIME HOST XXXX).EXT: clear to a person, unique across
    mounts of one host within the same second."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    tag = f" (conflict {time.strftime('%Y-%m-%d %H%M%S')} {hostname} {os.urandom(2).hex()})"
    budget = MAX_NAME_BYTES - len((tag + dot + ext).encode())
    stem = stem.encode()[:max(budget, 1)].decode(errors="ignore")
    return f"{stem}{tag}{dot}{ext}"


class ConflictCopies:
    """(Mixed into ZkfsOperations.)"""

    def save_copy(self, body: dict, path: str | None, exc: ServerError) -> list[dict]:
        """Another machine changed this file first (the server refused the version in
        journal record ``body`` with ``exc``): keep both. Theirs stays under the name;
        ours becomes a clearly named sibling, created with its content, which is read
        back from the record (its chunks: inline in it, in the journal, or on the
        server). Returns the copy's records."""
        inode = UUID(body["inode"])
        attrs = Attrs.from_doc(body["attrs"])
        manifest = records.manifest_of(body)
        manifest.key_id = attrs.key_id
        inline = records.inline_of(body)
        try:
            parent, name = self.meta.resolve_parent(path) if path else (self.meta.node(self.vault.root), str(inode))
            self.vault.check_writable(parent.id)
        except (OSError, ZkfsError):
            # Its folder is gone, or a share this member may no longer write: the
            # copy goes to the top of the member's own files.
            parent, name = self.meta.node(self.vault.root), Path(path or str(inode)).name
        copy_name = conflict_name(name, self.hostname)
        new_id = uuid4()
        cipher, file_key = self.vault.new_file_key(new_id, parent.id)
        copy = OpenFile(self.vault, self.blocks, self.spool, self.budget,
                        Node(new_id, False, 0, 1, attrs.evolve(size=0, manifest_digest=None)),
                        cipher, Manifest(new_id), PendingCreate(parent.id, copy_name, file_key, time.time_ns()))
        offset = 0
        for i, ref in enumerate(manifest.chunks):
            n = manifest.chunk_length(i)
            if ref.is_hole:
                chunk = bytes(n)
            elif ref.blob_id in inline:
                chunk = self.vault.open_chunk(inode, manifest, i, inline[ref.blob_id])
            else:
                chunk = self.blocks.read(inode, manifest, i)
            copy.write(offset, chunk)
            offset += n
        copy.attrs = attrs.evolve(size=offset, key_id=crypto.key_id(file_key), manifest_digest=None)
        out = copy.seal()
        self.writeback.show_when_queued(parent.id, copy_name, copy.base_node)
        log.warning("conflict: %s changed elsewhere (%s); this version was saved as %s", path or inode, exc, copy_name)
        return out
