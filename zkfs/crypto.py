"""Crypto core: password KDF, binary Fernet tokens, key wrapping, name MACs.

Everything here is specified byte for byte in docs/FORMAT.md. Nothing else in
zkfs touches a cipher primitive directly.
"""
from __future__ import annotations

import hmac as std_hmac
import os
import struct
from dataclasses import dataclass
from hashlib import sha256
from uuid import UUID

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

KEY_BYTES = 32                       # a Fernet key: 16 signing + 16 AES-128
_VERSION = b"\x80"
_HEADER = 1 + 8 + 16                 # version, timestamp, IV
_TAG = 32
TOKEN_OVERHEAD_MAX = _HEADER + 16 + _TAG   # worst case incl. a full padding block
# Fernet's timestamp field, in clear in every token: a constant, so the server does
# not learn when each name, attribute set, manifest, chunk or key was sealed.
# Decryption never reads it (tokens with real times, from before, still open).
SEAL_TIME = 0


class IntegrityError(Exception):
    """Ciphertext failed authentication or does not belong where it was found."""


def sealed_size(n: int) -> int:
    """Length of the token that ``BinaryFernet.encrypt`` makes of ``n`` bytes."""
    return _HEADER + 16 * (n // 16 + 1) + _TAG


def random_key() -> bytes:
    return os.urandom(KEY_BYTES)


def digest(data: bytes) -> bytes:
    return sha256(data).digest()


def key_id(key: bytes) -> bytes:
    """A file key's fingerprint, sealed in its file's attributes: which key opens
    the version they describe (rotate-key --full replaces file keys)."""
    return sha256(b"zkfs/v1/key-id\0" + key).digest()[:16]


class BinaryFernet:
    """Fernet (spec v0x80) tokens kept in raw binary instead of base64.

    ``base64.urlsafe_b64encode(token)`` is a standard Fernet token and
    ``Fernet.encrypt`` output decodes to one of ours: tests check both ways.
    Base64 is what bounds the stock API (about 4x slower here), and it would add
    33% to every stored byte.
    """

    __slots__ = ("_signing_key", "_aes")

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError("Fernet key must be 32 bytes")
        self._signing_key = key[:16]
        self._aes = algorithms.AES(key[16:])

    def encrypt(self, data: bytes, *, _iv: bytes | None = None, _now: int = SEAL_TIME) -> bytes:
        iv = _iv or os.urandom(16)
        pad = 16 - len(data) % 16
        end = _HEADER + len(data) + pad
        # Encrypt straight into one buffer: the copies of the naive version
        # halve the throughput. update_into wants 15 spare bytes past its output.
        buf = bytearray(end + _TAG + 15)
        buf[0:_HEADER] = _VERSION + struct.pack(">Q", _now) + iv
        out = memoryview(buf)
        whole = len(data) - len(data) % 16
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        written = enc.update_into(memoryview(data)[:whole], out[_HEADER:])
        enc.update_into(bytes(data[whole:]) + bytes([pad]) * pad, out[_HEADER + written:])
        enc.finalize()
        mac = hmac.HMAC(self._signing_key, hashes.SHA256())
        mac.update(out[:end])
        out[end:end + _TAG] = mac.finalize()
        token = bytes(out[:end + _TAG])
        out.release()
        return token

    def decrypt(self, token: bytes) -> bytes:
        view = memoryview(token)
        n = len(view)
        if n < _HEADER + 16 + _TAG or (n - _HEADER - _TAG) % 16 or view[0] != 0x80:
            raise IntegrityError("malformed token")
        mac = hmac.HMAC(self._signing_key, hashes.SHA256())
        mac.update(view[: n - _TAG])
        try:
            mac.verify(bytes(view[n - _TAG:]))
        except InvalidSignature:
            raise IntegrityError("authentication failed") from None
        dec = Cipher(self._aes, modes.CBC(bytes(view[9:_HEADER]))).decryptor()
        plain = dec.update(view[_HEADER: n - _TAG]) + dec.finalize()
        pad = plain[-1]
        if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
            raise IntegrityError("bad padding")
        return plain[:-pad]


# ---------------------------------------------------------------- password
# The floor: nothing is derived from a password under less work than this,
# whoever asks (a server serving weaker parameters wants a cheap guess target).
# The ceilings keep a server from making the client exhaust its memory or time.
KDF_MIN_MEMORY_KIB, KDF_MAX_MEMORY_KIB = 64 * 1024, 4 * 1024 * 1024
KDF_MIN_ITERATIONS, KDF_MAX_ITERATIONS = 3, 64
KDF_MIN_SALT, KDF_MAX_SALT = 16, 64
KDF_MAX_LANES = 16


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    memory_kib: int = KDF_MIN_MEMORY_KIB
    iterations: int = KDF_MIN_ITERATIONS
    lanes: int = 4

    @classmethod
    def new(cls) -> "KdfParams":
        return cls(salt=os.urandom(KDF_MIN_SALT))

    def weakness(self) -> str | None:
        """What makes these parameters unacceptable (below the floor or absurd), or None."""
        if not KDF_MIN_MEMORY_KIB <= self.memory_kib <= KDF_MAX_MEMORY_KIB:
            return f"memory {self.memory_kib} KiB (allowed: {KDF_MIN_MEMORY_KIB} to {KDF_MAX_MEMORY_KIB})"
        if not KDF_MIN_ITERATIONS <= self.iterations <= KDF_MAX_ITERATIONS:
            return f"{self.iterations} passes (allowed: {KDF_MIN_ITERATIONS} to {KDF_MAX_ITERATIONS})"
        if not KDF_MIN_SALT <= len(self.salt) <= KDF_MAX_SALT:
            return f"a {len(self.salt)}-byte salt (allowed: {KDF_MIN_SALT} to {KDF_MAX_SALT})"
        if not 1 <= self.lanes <= KDF_MAX_LANES:
            return f"{self.lanes} lanes (allowed: 1 to {KDF_MAX_LANES})"
        return None


@dataclass(frozen=True)
class PasswordKeys:
    auth_key: bytes     # sent to the server at login; it stores an argon2 hash of it
    kek: bytes          # key-encryption key: never leaves the client
    # Authenticates the KDF parameters (kdf_check); never leaves the client. None
    # for keys saved by `login` (keys.json): only a derivation needs it.
    check_key: bytes | None = None


def _expand(root: bytes, label: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=b"zkfs/v1/" + label).derive(root)


def password_root(password: str, params: KdfParams) -> bytes:
    """Argon2id(password) under ``params``: 32 bytes every password-derived key starts from."""
    return Argon2id(
        salt=params.salt, length=32, iterations=params.iterations,
        lanes=params.lanes, memory_cost=params.memory_kib,
    ).derive(password.encode("utf-8"))


def derive_password_keys(password: str, params: KdfParams) -> PasswordKeys:
    root = password_root(password, params)
    return PasswordKeys(auth_key=_expand(root, b"auth"), kek=_expand(root, b"kek"),
                        check_key=_expand(root, b"kdf-check"))


def kdf_check(keys: PasswordKeys, username: str, params: KdfParams) -> bytes:
    """MAC over the account's KDF choice, stored by the server and checked by a
    client before it sends anything derived from the password: a server that
    serves another salt or other parameters cannot make this verify."""
    if keys.check_key is None:
        raise ValueError("kdf_check needs freshly derived keys")
    msg = (b"zkfs/v1/kdf-check\0" + username.encode() + b"\0"
           + struct.pack(">III", params.memory_kib, params.iterations, params.lanes) + params.salt)
    return std_hmac.new(keys.check_key, msg, sha256).digest()


# ---------------------------------------------------------------- links
LINK_SECRET_BYTES = 16      # the URL fragment's secret: 128 bits, 22 characters of base64url


def link_record_key(secret: bytes, link_id: bytes) -> bytes:
    """Opens a link's record (FORMAT.md §8): from the fragment's secret alone, bound
    to the link's id, so a record served under another link's id does not open."""
    return _link_key(secret, b"link-record", link_id)


def link_content_key(secret: bytes, link_id: bytes, root: bytes) -> bytes:
    """Opens a password-protected link's content: the fragment's secret and the
    password's Argon2id root (``password_root``) together, so neither alone opens it."""
    return _link_key(secret + root, b"link-content", link_id)


def _link_key(ikm: bytes, label: bytes, link_id: bytes) -> bytes:
    # Extract-then-expand (RFC 5869) with an empty salt: WebCrypto's HKDF computes
    # the same, which is how the browser page opens links.
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=b"",
                info=b"zkfs/v1/" + label + b"\0" + link_id).derive(ikm)


# ---------------------------------------------------------------- wrapping
def wrap_key(wrapping_key: bytes, key: bytes, context: bytes) -> bytes:
    """Encrypt ``key`` under ``wrapping_key``, bound to ``context`` (what it is for)."""
    return BinaryFernet(wrapping_key).encrypt(struct.pack(">H", len(context)) + context + key)


def unwrap_key(wrapping_key: bytes, token: bytes, context: bytes) -> bytes:
    plain = BinaryFernet(wrapping_key).decrypt(token)
    n = struct.unpack(">H", plain[:2])[0] if len(plain) >= 2 else -1
    if n != len(context) or not std_hmac.compare_digest(plain[2: 2 + n], context):
        raise IntegrityError("key belongs to another object")
    return plain[2 + n:]


def master_context(gen: int) -> bytes:
    return b"master" + struct.pack(">I", gen)


def namespace_context(gen: int, root: UUID) -> bytes:
    """Also binds the account's root directory: a server that points the account
    at another directory as its root makes the namespace key fail to unwrap."""
    return b"namespace" + struct.pack(">I", gen) + root.bytes


def file_key_context(inode: UUID) -> bytes:
    return b"file" + inode.bytes


# ---------------------------------------------------------------- namespace
class NamespaceKey:
    """64 random bytes: a Fernet key for names and attributes, and a MAC key
    that turns (parent id, name) into the lookup hash the server indexes."""

    SIZE = 64

    def __init__(self, raw: bytes):
        if len(raw) != self.SIZE:
            raise ValueError("namespace key must be 64 bytes")
        self.raw = raw
        self.cipher = BinaryFernet(raw[:32])
        self._mac_key = raw[32:]
        self._entry_key = _expand(self._mac_key, b"entry-set")

    @classmethod
    def generate(cls) -> "NamespaceKey":
        return cls(os.urandom(cls.SIZE))

    def name_hash(self, parent: UUID, name: bytes) -> str:
        return std_hmac.new(self._mac_key, parent.bytes + name, sha256).hexdigest()

    def entry_element(self, parent: UUID, name: bytes, inode: UUID, is_dir: bool) -> int:
        """One directory entry as a 256-bit number, for the entry-set digest
        (zkfs/entryset.py): unpredictable without the key."""
        msg = parent.bytes + inode.bytes + (b"\1" if is_dir else b"\0") + name
        return int.from_bytes(std_hmac.new(self._entry_key, msg, sha256).digest(), "big")


# ---------------------------------------------------------------- sharing
class IdentityKey:
    """An account's X25519 key pair (docs/FORMAT.md "Shared folders"): what others wrap a shared
    folder's keys for. The private half is wrapped under a master key generation."""

    SIZE = 32

    def __init__(self, raw: bytes):
        if len(raw) != self.SIZE:
            raise ValueError("identity key must be 32 bytes")
        self.raw = raw
        self._key = X25519PrivateKey.from_private_bytes(raw)
        self.public = self._key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> "IdentityKey":
        return cls(X25519PrivateKey.generate().private_bytes_raw())

    def agree(self, peer_public: bytes) -> bytes:
        """The X25519 shared secret with ``peer_public`` (IntegrityError for a key
        that is not one: wrong length, or a low-order point giving all zeros)."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise IntegrityError("not a usable public key") from None


def identity_context(gen: int, public: bytes) -> bytes:
    """Binds the wrapped private key to its public half: a server that pairs the
    account's public key with another private key makes it fail to unwrap."""
    return b"identity" + struct.pack(">I", gen) + public


def fingerprint(public: bytes) -> str:
    """What people compare out of band: 96 bits of the public key's hash, in groups."""
    h = sha256(b"zkfs/v1/identity\0" + public).hexdigest()[:24]
    return " ".join(h[i:i + 4] for i in range(0, len(h), 4))


def grant_context(share: UUID, gen: int, root: UUID, owner_public: bytes, member_public: bytes) -> bytes:
    """What a share key grant is for: this share, generation and folder, from this
    owner to this member. Only the owner's and the member's private keys compute
    its wrapping key, so a grant that opens was made by the owner (or the member)."""
    return b"share-grant" + share.bytes + struct.pack(">I", gen) + root.bytes + owner_public + member_public


def grant_wrapping_key(identity: IdentityKey, peer_public: bytes, context: bytes) -> bytes:
    """X25519(own private, peer public) through HKDF-SHA256, bound to ``context``:
    the same on the owner's and the member's side (static-static Diffie-Hellman)."""
    shared = identity.agree(peer_public)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"zkfs/v1/share-grant\0" + context).derive(shared)


def members_seal(identity: IdentityKey, share: UUID, gen: int, members: list[tuple[str, bytes, bool]]) -> bytes:
    """The owner's MAC of a share's generation and members (username, public key,
    read-only), under a key only the owner's identity key gives (members hold the
    share's keys, so a MAC under those would let them, or a server they gave them to,
    add a member). The owner grants a new generation only to a list that checks."""
    msg = bytearray(b"zkfs/v1/share-members\0" + share.bytes + struct.pack(">I", gen))
    for username, public, read_only in sorted((u.lower(), p, r) for u, p, r in members):
        name = username.encode()
        msg += struct.pack(">H", len(name)) + name + public + (b"\1" if read_only else b"\0")
    return std_hmac.new(_expand(identity.raw, b"share-members"), bytes(msg), sha256).digest()


@dataclass(frozen=True)
class ShareKeys:
    """One generation of a shared folder's keys, from its 32-byte secret: the
    namespace key that seals the folder's names and attributes, and the key that
    wraps its files' keys (the share's "master key")."""
    namespace: NamespaceKey
    files: bytes

    @classmethod
    def derive(cls, secret: bytes) -> "ShareKeys":
        if len(secret) != KEY_BYTES:
            raise IntegrityError("a share secret is 32 bytes")
        return cls(NamespaceKey(_expand(secret, b"share/namespace", NamespaceKey.SIZE)),
                   _expand(secret, b"share/files"))


def seal_share_name(ns: NamespaceKey, root: UUID, name: str) -> bytes:
    """The shared folder's name as its members see it, bound to its root folder."""
    return ns.cipher.encrypt(b"share-name" + root.bytes + name.encode("utf-8", "surrogateescape"))


def open_share_name(ns: NamespaceKey, token: bytes, root: UUID) -> str:
    plain = ns.cipher.decrypt(token)
    head = b"share-name" + root.bytes
    if not plain.startswith(head):
        raise IntegrityError("the share's name belongs to another folder")
    return plain[len(head):].decode("utf-8", "surrogateescape")
