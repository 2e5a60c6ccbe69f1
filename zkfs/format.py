"""Content and metadata encoding (docs/FORMAT.md): chunks, manifests, inode
attributes and directory-entry names. Pure functions over crypto.py; no I/O."""
from __future__ import annotations

import base64
import hmac
import json
import stat
import struct
from dataclasses import dataclass, field, replace
from uuid import UUID

from .crypto import BinaryFernet, IntegrityError, NamespaceKey, sealed_size
from .entryset import EntrySet

CHUNK_SIZE = 1 << 20
SEGMENT_SIZE = 1 << 16            # a chunk token is a run of independently sealed segments
MAX_NAME_BYTES = 255
MAX_SYMLINK_BYTES = 4095          # PATH_MAX - 1
# A manifest lists every chunk, holes included: 256 GiB is 256 Ki refs, 4 MiB sealed
# (the server takes manifests up to 6 MiB).
MAX_FILE_SIZE = 1 << 38
HOLE = UUID(int=0)                # a chunk that was never written reads as zeros

_MANIFEST_MAGIC = b"ZKM2"
_MANIFEST_HEAD = struct.Struct(">4s16sQII")    # magic, inode, size, chunk size, count
_CHUNK_REF = struct.Struct(">16s")             # blob id
_SEGMENT_HEAD = struct.Struct(">16sI")         # blob id, segment index


@dataclass(frozen=True)
class ChunkRef:
    blob_id: UUID

    @property
    def is_hole(self) -> bool:
        return self.blob_id == HOLE


HOLE_REF = ChunkRef(HOLE)


@dataclass
class Manifest:
    """The authenticated list of a file version's chunks, in order."""
    inode: UUID
    size: int = 0
    chunk_size: int = CHUNK_SIZE
    chunks: list[ChunkRef] = field(default_factory=list)
    # Not stored in the token: the id of the file key that opened it (Vault.manifest),
    # so its chunks are opened with that same key.
    key_id: bytes | None = field(default=None, compare=False)

    def chunk_count_for(self, size: int) -> int:
        return -(-size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        return max(0, min(self.chunk_size, self.size - index * self.chunk_size))

    def blob_ids(self) -> list[UUID]:
        return [c.blob_id for c in self.chunks if not c.is_hole]

    def encrypt(self, file_cipher: BinaryFernet) -> bytes:
        if len(self.chunks) != self.chunk_count_for(self.size):
            raise ValueError("manifest chunk count does not match its size")
        parts = [_MANIFEST_HEAD.pack(_MANIFEST_MAGIC, self.inode.bytes, self.size,
                                     self.chunk_size, len(self.chunks))]
        parts.extend(_CHUNK_REF.pack(c.blob_id.bytes) for c in self.chunks)
        return file_cipher.encrypt(b"".join(parts))

    @classmethod
    def decrypt(cls, file_cipher: BinaryFernet, token: bytes, inode: UUID) -> "Manifest":
        plain = file_cipher.decrypt(token)
        try:
            magic, ino, size, chunk_size, count = _MANIFEST_HEAD.unpack_from(plain)
        except struct.error:
            raise IntegrityError("truncated manifest") from None
        if magic != _MANIFEST_MAGIC or ino != inode.bytes:
            raise IntegrityError("manifest belongs to another file")
        body = memoryview(plain)[_MANIFEST_HEAD.size:]
        if chunk_size <= 0 or len(body) != count * _CHUNK_REF.size or count != -(-size // chunk_size):
            raise IntegrityError("manifest length mismatch")
        chunks = [ChunkRef(UUID(bytes=b)) for (b,) in _CHUNK_REF.iter_unpack(body)]
        return cls(inode=inode, size=size, chunk_size=chunk_size, chunks=chunks)


def segment_token_size(n: int) -> int:
    """Bytes of the sealed segment holding ``n`` plaintext bytes."""
    return sealed_size(_SEGMENT_HEAD.size + n)


_FULL_SEGMENT_TOKEN = segment_token_size(SEGMENT_SIZE)


def segment_span(chunk_len: int, lo: int, hi: int) -> tuple[int, int, int]:
    """For plaintext bytes ``[lo, hi)`` of a chunk of ``chunk_len`` bytes: the first
    segment that covers them and the byte range ``[start, end)`` of the chunk token
    holding the covering segments. Every segment but the last is full, so the
    token offsets follow from the lengths alone."""
    if not 0 <= lo < hi <= chunk_len:
        raise ValueError("range outside the chunk")
    first, last = lo // SEGMENT_SIZE, (hi - 1) // SEGMENT_SIZE
    end = last * _FULL_SEGMENT_TOKEN + segment_token_size(min(SEGMENT_SIZE, chunk_len - last * SEGMENT_SIZE))
    return first, first * _FULL_SEGMENT_TOKEN, end


def seal_chunk(file_cipher: BinaryFernet, plain: bytes, blob_id: UUID) -> tuple[bytes, ChunkRef]:
    """A chunk token: each segment of the plaintext sealed on its own, prefixed with
    the blob id and its index, so any segment can be fetched and checked alone and
    none can be moved to another chunk or position."""
    view = memoryview(plain)
    parts = [file_cipher.encrypt(_SEGMENT_HEAD.pack(blob_id.bytes, j) + view[off:off + SEGMENT_SIZE])
             for j, off in enumerate(range(0, len(plain), SEGMENT_SIZE))]
    return b"".join(parts), ChunkRef(blob_id)


def open_chunk(file_cipher: BinaryFernet, token: bytes, ref: ChunkRef, expected_len: int) -> bytes:
    """Check a whole chunk against its manifest entry (position, file, length) and decrypt."""
    if expected_len <= 0:
        raise IntegrityError("empty chunk")
    return open_segments(file_cipher, token, ref, expected_len, 0, expected_len)


def open_segments(file_cipher: BinaryFernet, data: bytes, ref: ChunkRef, chunk_len: int,
                  lo: int, hi: int) -> bytes:
    """Decrypt the token bytes that ``segment_span(chunk_len, lo, hi)`` names and
    return the plaintext of the segments they hold (starting at the first one's
    offset), after checking each is the segment of this chunk at that index."""
    first, start, end = segment_span(chunk_len, lo, hi)
    if len(data) != end - start:
        raise IntegrityError("chunk has the wrong length")
    view = memoryview(data)
    out: list[bytes] = []
    pos, j = 0, first
    while pos < len(data):
        want = min(SEGMENT_SIZE, chunk_len - j * SEGMENT_SIZE)
        size = segment_token_size(want)
        plain = file_cipher.decrypt(view[pos:pos + size])
        if len(plain) != _SEGMENT_HEAD.size + want or \
                plain[:_SEGMENT_HEAD.size] != _SEGMENT_HEAD.pack(ref.blob_id.bytes, j):
            raise IntegrityError("chunk segment does not belong here")
        out.append(plain[_SEGMENT_HEAD.size:])
        pos += size
        j += 1
    return b"".join(out)


# ---------------------------------------------------------------- attributes
@dataclass
class Attrs:
    """Inode attributes, encrypted as a whole under the namespace key."""
    mode: int
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: bytes = b""                      # symlink target
    xattrs: dict[str, bytes] = field(default_factory=dict)
    manifest_digest: bytes | None = None     # authenticates the content manifest
    version: int = 1                         # equals the server's version of the inode
    key_id: bytes | None = None              # crypto.key_id of the file key (None: from before)
    # Directories: the digest of their entry set (None: sealed before digests existed)
    entries: EntrySet | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def evolve(self, **changes) -> "Attrs":
        return replace(self, xattrs=dict(self.xattrs), **changes)

    def to_doc(self) -> dict:
        """The JSON form (what is sealed, without the inode id)."""
        doc = {
            "v": self.version, "mode": self.mode, "uid": self.uid,
            "gid": self.gid, "rdev": self.rdev, "size": self.size, "atime": self.atime_ns,
            "mtime": self.mtime_ns, "ctime": self.ctime_ns,
            "target": b64encode(self.target),
            "xattr": {k: b64encode(v) for k, v in self.xattrs.items()},
            "manifest": self.manifest_digest.hex() if self.manifest_digest else None,
        }
        if self.key_id is not None:
            doc["key"] = self.key_id.hex()
        if self.entries is not None:
            doc["es"] = self.entries.to_json()
        return doc

    @classmethod
    def from_doc(cls, doc: dict) -> "Attrs":
        """Raises KeyError, TypeError or ValueError for a malformed document."""
        return cls(
            mode=doc["mode"], uid=doc["uid"], gid=doc["gid"], rdev=doc["rdev"],
            size=doc["size"], atime_ns=doc["atime"], mtime_ns=doc["mtime"],
            ctime_ns=doc["ctime"], target=b64decode(doc["target"]),
            xattrs={k: b64decode(v) for k, v in doc["xattr"].items()},
            manifest_digest=bytes.fromhex(doc["manifest"]) if doc["manifest"] else None,
            version=doc["v"],
            key_id=bytes.fromhex(doc["key"]) if doc.get("key") else None,
            entries=EntrySet.from_json(doc["es"]) if "es" in doc else None,
        )

    def encrypt(self, ns: NamespaceKey, inode: UUID) -> bytes:
        doc = {"id": str(inode)} | self.to_doc()
        return ns.cipher.encrypt(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def decrypt(cls, ns: NamespaceKey, token: bytes, inode: UUID, version: int) -> "Attrs":
        try:
            doc = json.loads(ns.cipher.decrypt(token))
            if doc["id"] != str(inode):
                raise IntegrityError("attributes belong to another inode")
            if doc["v"] != version:
                raise IntegrityError("attribute version does not match the server's")
            return cls.from_doc(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed attributes ({exc.__class__.__name__})") from None


# ---------------------------------------------------------------- names
def encode_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if not raw or b"/" in raw or b"\0" in raw or name in (".", ".."):
        raise ValueError(f"invalid file name {name!r}")
    if len(raw) > MAX_NAME_BYTES:
        raise NameTooLong(name)
    return raw


class NameTooLong(ValueError):
    pass


def seal_name(ns: NamespaceKey, inode: UUID, name: str) -> bytes:
    """The entry's encrypted name, bound to the inode it points at."""
    return ns.cipher.encrypt(inode.bytes + encode_name(name))


def open_name(ns: NamespaceKey, token: bytes, *, parent: UUID, inode: UUID, name_hash: str) -> str:
    """Decrypt an entry's name and check it is the entry the server says it is."""
    plain = ns.cipher.decrypt(token)
    if plain[:16] != inode.bytes:
        raise IntegrityError("entry name points at another inode")
    raw = plain[16:]
    if not hmac.compare_digest(ns.name_hash(parent, raw), name_hash):
        raise IntegrityError("entry name moved from another directory or entry")
    return raw.decode("utf-8", "surrogateescape")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)

