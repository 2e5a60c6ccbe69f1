"""A malicious zkfs server, for tests: the real server whose stored state is
tampered with underneath it, as a compromised host would do.

The server keeps everything it knows in two places (docs/THREAT_MODEL.md):

* ``DATA/app.db`` (sqlite, WAL): ``inodes`` (is_dir, version, meta, manifest,
  key_gen, wrapped_key), ``dentries`` (parent, name_hash, inode, is_dir, name),
  ``blobs`` (size, committed), ``users`` (root_inode, current_gen, ...),
  ``master_keys``.
* ``DATA/storage/<user>/<inode>/<blob>`` (chunk tokens).

:class:`HostileServer` edits both while the server runs. Edits keep the server
self-consistent (a blob's ``size`` row follows its file), because a malicious
server would serve its lies cleanly: the client must catch them by
cryptography, not by the server tripping over its own bookkeeping.

The attacker only ever uses what the server has: ids, sizes, ciphertext. Tests
use plaintext names only to *choose* a target (``uploaded_file.json`` maps a
remote path to its inode id), never to forge anything.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4


# ---------------------------------------------------------------- byte edits
def flip_bit(data: bytes, pos: int | None = None, bit: int = 0) -> bytes:
    """``data`` with one bit flipped (default: in the middle)."""
    pos = len(data) // 2 if pos is None else pos
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def flip_b64(text: str, pos: int | None = None) -> str:
    """A base64 column with one bit of the decoded bytes flipped."""
    return base64.b64encode(flip_bit(base64.b64decode(text), pos)).decode()


# ---------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """Everything the server stores for one inode at one moment."""
    inode: UUID
    row: dict
    blob_rows: list[dict]
    blob_data: dict[str, bytes]
    key: bytes | None


@dataclass
class Blob:
    id: UUID
    path: Path
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class HostileServer:
    """Direct, out-of-band access to one account's records on a running server."""

    def __init__(self, data_dir: Path, username: str):
        self.data_dir = Path(data_dir)
        self.db = sqlite3.connect(self.data_dir / "app.db", timeout=30, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 30000")
        row = self.db.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
        assert row, f"no user {username!r} on this server"
        self.user_id = row["id"]

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ users
    def user(self) -> dict:
        return dict(self.db.execute("SELECT * FROM users WHERE id = ?", (self.user_id,)).fetchone())

    def set_user(self, **cols) -> None:
        self._update("users", cols, "id = ?", (self.user_id,))

    # ------------------------------------------------------------ inodes
    def inode(self, inode: UUID) -> dict:
        row = self.db.execute("SELECT * FROM inodes WHERE user_id = ? AND id = ?",
                              (self.user_id, str(inode))).fetchone()
        assert row, f"no inode {inode}"
        return dict(row)

    def set_inode(self, inode: UUID, **cols) -> None:
        self._update("inodes", cols, "user_id = ? AND id = ?", (self.user_id, str(inode)))

    def _update(self, table: str, cols: dict, where: str, args: tuple) -> None:
        sets = ", ".join(f"{c} = ?" for c in cols)
        cur = self.db.execute(f"UPDATE {table} SET {sets} WHERE {where}", (*cols.values(), *args))
        assert cur.rowcount == 1, f"{table}: {cur.rowcount} rows matched"

    # ------------------------------------------------------------ entries
    def entry_of(self, inode: UUID) -> dict:
        """The (single) directory entry naming ``inode``."""
        rows = self.db.execute("SELECT * FROM dentries WHERE user_id = ? AND inode = ?",
                               (self.user_id, str(inode))).fetchall()
        assert len(rows) == 1, f"{len(rows)} entries for {inode}"
        return dict(rows[0])

    def parent_of(self, inode: UUID) -> UUID:
        return UUID(self.entry_of(inode)["parent"])

    def set_entry(self, entry: dict, **cols) -> None:
        self._update("dentries", cols, "user_id = ? AND parent = ? AND name_hash = ?",
                     (self.user_id, entry["parent"], entry["name_hash"]))

    # ------------------------------------------------------------ blobs and keys
    def inode_dir(self, inode: UUID) -> Path:
        return self.data_dir / "storage" / self.user_id / str(inode)

    def key(self, inode: UUID) -> bytes:
        """The inode's wrapped file key as stored."""
        return base64.b64decode(self.inode(inode)["wrapped_key"])

    def set_key(self, inode: UUID, wrapped: bytes) -> None:
        self.set_inode(inode, wrapped_key=base64.b64encode(wrapped).decode())

    def blobs(self, inode: UUID) -> list[Blob]:
        """The committed blobs of ``inode``, largest first (the server does not know
        their order in the file; the tail chunk is the only one it can tell apart)."""
        rows = self.db.execute("SELECT blob_id, size FROM blobs WHERE user_id = ? AND inode = ?"
                               " AND committed = 1 ORDER BY size DESC, blob_id",
                               (self.user_id, str(inode))).fetchall()
        return [Blob(UUID(r["blob_id"]), self.inode_dir(inode) / r["blob_id"], r["size"]) for r in rows]

    def write_blob(self, inode: UUID, blob: UUID, data: bytes) -> None:
        """Replace a stored blob's bytes (and its size record, so it is served cleanly)."""
        (self.inode_dir(inode) / str(blob)).write_bytes(data)
        self.db.execute("UPDATE blobs SET size = ? WHERE user_id = ? AND inode = ? AND blob_id = ?",
                        (len(data), self.user_id, str(inode), str(blob)))

    def add_blob(self, inode: UUID, data: bytes, blob: UUID | None = None) -> UUID:
        """Store an extra, committed blob that no manifest references."""
        blob = blob or uuid4()
        (self.inode_dir(inode) / str(blob)).write_bytes(data)
        self.db.execute("INSERT INTO blobs(user_id, inode, blob_id, size, committed, created_at)"
                        " VALUES (?, ?, ?, ?, 1, strftime('%s','now'))",
                        (self.user_id, str(inode), str(blob), len(data)))
        return blob

    def delete_blob(self, inode: UUID, blob: UUID) -> None:
        (self.inode_dir(inode) / str(blob)).unlink()
        self.db.execute("DELETE FROM blobs WHERE user_id = ? AND inode = ? AND blob_id = ?",
                        (self.user_id, str(inode), str(blob)))

    # ------------------------------------------------------------ whole inodes
    def snapshot(self, inode: UUID) -> Snapshot:
        rows = [dict(r) for r in self.db.execute(
            "SELECT * FROM blobs WHERE user_id = ? AND inode = ? AND committed = 1",
            (self.user_id, str(inode))).fetchall()]
        d = self.inode_dir(inode)
        row = self.inode(inode)
        return Snapshot(inode, row, rows,
                        {r["blob_id"]: (d / r["blob_id"]).read_bytes() for r in rows},
                        base64.b64decode(row["wrapped_key"]) if row["wrapped_key"] else None)

    def restore(self, snap: Snapshot, cols=("version", "meta", "manifest", "key_gen", "wrapped_key"), *,
                blobs: bool = True) -> None:
        """Put back ``cols`` of an inode's row as they were in ``snap`` and, with
        ``blobs``, exactly the blobs it had then (a rollback of that file)."""
        self.set_inode(snap.inode, **{c: snap.row[c] for c in cols})
        if not blobs:
            return
        d = self.inode_dir(snap.inode)
        for b in self.blobs(snap.inode):
            if str(b.id) not in snap.blob_data:
                self.delete_blob(snap.inode, b.id)
        for r in snap.blob_rows:
            (d / r["blob_id"]).write_bytes(snap.blob_data[r["blob_id"]])
            self.db.execute("INSERT OR REPLACE INTO blobs(user_id, inode, blob_id, size, committed,"
                            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                            (r["user_id"], r["inode"], r["blob_id"], r["size"], r["committed"],
                             r["created_at"]))


# ---------------------------------------------------------------- client side
def uploads(machine) -> dict[str, UUID]:
    """remote path -> inode id, from the machine's uploaded_file.json."""
    data = json.loads((machine.home / "uploaded_file.json").read_text())
    return {path: UUID(rec["uuid"]) for path, rec in data.items()}


def mount_log(mount) -> str:
    """This mount's own daemon log (mount.py names it after the mount point)."""
    tag = hashlib.sha256(os.path.realpath(mount.path).encode()).hexdigest()[:16]
    path = mount.machine.home / "logs" / f"mount-{tag}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed client.py run must print, nothing else."""
    assert proc.returncode != 0, f"expected a failure, got:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def log_lines(text: str, *needles: str) -> list[str]:
    """Lines of a log that contain every needle (regexes)."""
    return [line for line in text.splitlines() if all(re.search(n, line) for n in needles)]
