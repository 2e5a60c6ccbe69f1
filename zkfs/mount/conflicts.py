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
from uuid import uuid4

from .. import crypto
from ..errors import ServerError
from ..format import MAX_NAME_BYTES, Manifest
from ..vault import Node
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

    def save_copy(self, of: OpenFile, exc: ServerError) -> list[dict]:
        """Another machine committed this file first (the server refused our version
        with ``exc``): keep both. Theirs stays under the name; ours becomes a clearly
        named sibling, created with its content. Returns the copy's records; ``of``
        follows the server's version from now on."""
        path = of.last_path
        try:
            parent, name = self.meta.resolve_parent(path) if path else (self.meta.node(self.vault.root), str(of.id))
        except OSError:
            parent, name = self.meta.node(self.vault.root), Path(path or str(of.id)).name
        copy_name = conflict_name(name, self.hostname)
        new_id = uuid4()
        cipher, file_key = self.vault.new_file_key(new_id)
        attrs = of.attrs.evolve(size=0, manifest_digest=None, key_id=crypto.key_id(file_key))
        copy = OpenFile(self.vault, self.blocks, self.spool, self.budget, Node(new_id, False, 0, 1, attrs),
                        cipher, Manifest(new_id), PendingCreate(parent.id, copy_name, file_key, time.time_ns()))
        offset = 0
        for chunk in of.snapshot_chunks():
            copy.write(offset, chunk)
            offset += len(chunk)
        copy.attrs = of.attrs.evolve(size=offset, key_id=crypto.key_id(file_key))
        out = copy.seal()
        self.meta.forget(parent.id)
        log.warning("conflict: %s changed elsewhere (%s); this version was saved as %s", path or of.id, exc, copy_name)
        try:
            of.rebase(self.vault.get(of.id))
        except ServerError:
            of.unlinked = True           # deleted elsewhere: our version lives on in the copy
        of.sent_upto = of.journaled_seq
        return out
