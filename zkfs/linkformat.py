"""Links for anyone, byte for byte (docs/FORMAT.md §8): the link's URL, the record
the server keeps (sealed under a key from the URL fragment's secret, and from a
password if the link has one) and the owner's note. Pure functions over crypto.py."""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit
from uuid import UUID

from . import crypto
from .crypto import BinaryFernet, IntegrityError, KdfParams, NamespaceKey
from .format import MAX_FILE_SIZE, encode_name

LINK_ID_BYTES = 16
RECORD_VERSION = 1
# Record plaintexts are padded to a multiple of this: the server cannot tell a name's
# length, nor whether the link has a password, from the record's length.
RECORD_PAD = 1024
_ID_TEXT = re.compile(r"[A-Za-z0-9_-]{22}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str, size: int, what: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError(f"{what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64url") from None
    if len(data) != size:
        raise ValueError(f"{what} has {len(data)} bytes, not {size}")
    return data


def link_id_text(link_id: bytes) -> str:
    """A link id as it appears in URLs and on the wire."""
    return b64url(link_id)


def parse_link_id(text: str) -> bytes:
    if not _ID_TEXT.fullmatch(text):
        raise ValueError(f"{text!r} is not a link id")
    return from_b64url(text, LINK_ID_BYTES, "the link id")


def link_uuid(link_id: bytes) -> UUID:
    return UUID(bytes=link_id)


# ---------------------------------------------------------------- the URL
def new_link() -> tuple[bytes, bytes]:
    """A fresh link's id (the server sees it) and secret (the URL's fragment)."""
    return os.urandom(LINK_ID_BYTES), os.urandom(crypto.LINK_SECRET_BYTES)


def split_link_url(url: str) -> tuple[str, bytes, str]:
    """(server base URL, link id, fragment) of ``SERVER/s/<id>#<fragment>``."""
    parts = urlsplit(url.strip())
    m = re.fullmatch(r"(.*)/s/([A-Za-z0-9_-]+)/?", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or not m:
        raise ValueError("not a zkfs link (expected https://SERVER/s/ID#KEY)")
    try:
        link_id = parse_link_id(m.group(2))
    except ValueError as exc:
        raise ValueError(f"{exc} (the link was cut off or mistyped?)") from None
    return f"{parts.scheme}://{parts.netloc}{m.group(1)}", link_id, parts.fragment


@dataclass(frozen=True)
class LinkUrl:
    """``SERVER/s/<id>#<secret>``: the server sees the id, never the fragment."""
    server: str            # the server's base URL (scheme, host, port, any path prefix)
    link_id: bytes
    secret: bytes

    def __str__(self) -> str:
        return f"{self.server.rstrip('/')}/s/{link_id_text(self.link_id)}#{b64url(self.secret)}"

    @classmethod
    def parse(cls, url: str) -> "LinkUrl":
        server, link_id, fragment = split_link_url(url)
        if not fragment:
            raise ValueError("the link has no key after '#' (it was cut off?)")
        try:
            secret = from_b64url(fragment, crypto.LINK_SECRET_BYTES, "the link's key")
        except ValueError as exc:
            raise ValueError(f"{exc} (the link was cut off or mistyped?)") from None
        return cls(server, link_id, secret)


# ---------------------------------------------------------------- the record
@dataclass(frozen=True)
class LinkedFile:
    """What a link opens: one version of one file, as it was when the link was made."""
    name: str
    size: int
    inode: UUID
    key: bytes                  # the file key
    manifest: bytes | None      # SHA-256 of that version's manifest token (None: empty, no manifest)
    mtime_ns: int

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "inode": str(self.inode),
                "key": base64.b64encode(self.key).decode(),
                "manifest": self.manifest.hex() if self.manifest is not None else None,
                "mtime": self.mtime_ns}

    @classmethod
    def from_json(cls, doc) -> "LinkedFile":
        try:
            name, size, mtime = doc["name"], doc["size"], doc["mtime"]
            if not isinstance(name, str) or type(size) is not int or type(mtime) is not int:
                raise TypeError
            encode_name(name)       # one name, no '/' or NUL: safe as a local file name
            key = base64.b64decode(doc["key"], validate=True)
            manifest = bytes.fromhex(doc["manifest"]) if doc["manifest"] is not None else None
            if len(key) != crypto.KEY_BYTES or (manifest is not None and len(manifest) != 32) \
                    or not 0 <= size <= MAX_FILE_SIZE or (manifest is None and size):
                raise ValueError
            return cls(name, size, UUID(doc["inode"]), key, manifest, mtime)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise IntegrityError("the link's record is malformed") from None


@dataclass(frozen=True)
class LockedRecord:
    """An opened record of a link with a password: the file is sealed once more."""
    kdf: KdfParams
    sealed: bytes


def seal_record(secret: bytes, link_id: bytes, file: LinkedFile, password: str | None = None,
                kdf: KdfParams | None = None) -> bytes:
    """The record the server keeps: a token under ``link_record_key``. With a password,
    it holds the Argon2id parameters (``kdf``, fresh at the floor by default) and the
    file sealed again under ``link_content_key``."""
    if password is None:
        doc = {"v": RECORD_VERSION, "file": file.to_json()}
    else:
        kdf = kdf or KdfParams.new()
        key = crypto.link_content_key(secret, link_id, crypto.password_root(password, kdf))
        sealed = BinaryFernet(key).encrypt(_dumps(file.to_json()))
        doc = {"v": RECORD_VERSION, "kdf": {"salt": base64.b64encode(kdf.salt).decode(),
                                            "memory_kib": kdf.memory_kib, "iterations": kdf.iterations,
                                            "lanes": kdf.lanes},
               "sealed": base64.b64encode(sealed).decode()}
    plain = _dumps(doc)
    plain += b" " * (-len(plain) % RECORD_PAD)       # JSON allows trailing whitespace
    return BinaryFernet(crypto.link_record_key(secret, link_id)).encrypt(plain)


def open_record(secret: bytes, link_id: bytes, token: bytes) -> LinkedFile | LockedRecord:
    """IntegrityError if the record was not sealed for this link with this secret."""
    doc = _loads(BinaryFernet(crypto.link_record_key(secret, link_id)).decrypt(token))
    if not isinstance(doc, dict) or doc.get("v") != RECORD_VERSION:
        raise IntegrityError("the link's record has an unknown version")
    if "file" in doc:
        return LinkedFile.from_json(doc["file"])
    try:
        k = doc["kdf"]
        kdf = KdfParams(salt=base64.b64decode(k["salt"], validate=True), memory_kib=int(k["memory_kib"]),
                        iterations=int(k["iterations"]), lanes=int(k["lanes"]))
        return LockedRecord(kdf, base64.b64decode(doc["sealed"], validate=True))
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise IntegrityError("the link's record is malformed") from None


def unlock_record(secret: bytes, link_id: bytes, locked: LockedRecord, password: str) -> LinkedFile:
    """The file a password-protected record holds; IntegrityError for a wrong password
    (the record itself was authenticated by ``open_record``). The caller checks
    ``locked.kdf.weakness()`` first: the parameters come from the link's owner."""
    key = crypto.link_content_key(secret, link_id, crypto.password_root(password, locked.kdf))
    return LinkedFile.from_json(_loads(BinaryFernet(key).decrypt(locked.sealed)))


# ---------------------------------------------------------------- the owner's note
def seal_note(ns: NamespaceKey, link_id: bytes, secret: bytes, path: str) -> bytes:
    """What lets the owner list a link (its path) and print its URL again on any of
    their machines: sealed under the namespace key, bound to the link's id."""
    doc = {"secret": b64url(secret), "path": path}
    return ns.cipher.encrypt(b"zkfs/v1/link-note\0" + link_id + _dumps(doc))


def open_note(ns: NamespaceKey, link_id: bytes, token: bytes) -> tuple[bytes, str]:
    """(secret, path); IntegrityError if the note is not this link's."""
    plain = ns.cipher.decrypt(token)
    head = b"zkfs/v1/link-note\0" + link_id
    if not plain.startswith(head):
        raise IntegrityError("the note belongs to another link")
    doc = _loads(plain[len(head):])
    try:
        return from_b64url(doc["secret"], crypto.LINK_SECRET_BYTES, "secret"), str(doc["path"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("the link's note is malformed") from None


def _dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        raise IntegrityError("the link's record is malformed") from None


# ---------------------------------------------------------------- expiry
_DURATION = re.compile(r"(\d+)\s*([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_EXPIRY = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """``7d``, ``12h``, ``30m``, ``2w`` or seconds, as seconds (1 s to 10 years)."""
    m = _DURATION.fullmatch(text.strip().lower())
    seconds = int(m.group(1)) * _UNIT[m.group(2)] if m else 0
    if not 0 < seconds <= MAX_EXPIRY:
        raise ValueError(f"{text!r} is not a duration from 1s to 10 years (e.g. 7d, 12h, 30m, 2w)")
    return seconds
