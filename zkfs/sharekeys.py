"""Shared folders as a client sees them: the shares it owns or belongs to, each
with its own keyring, opened from the grants the server stores (docs/FORMAT.md "Shared folders").

A share's generation *g* is a 32-byte secret; the owner wraps it for itself and
each member under a key that only the owner's and that member's X25519 identity
keys compute. So a grant that opens was made by the owner whose public key this
client pinned (trust on first use, ``Pins``): a server that swaps public keys gets
refused, not a key of its own in.
"""
from __future__ import annotations

import hmac as std_hmac
import logging
import os
from dataclasses import dataclass, field
from uuid import UUID

from . import crypto
from .account import Keyring
from .api import ApiClient
from .crypto import IdentityKey, IntegrityError, ShareKeys
from .errors import TamperedError, ZkfsError
from .format import b64decode, b64encode
from .state import LocalState

log = logging.getLogger(__name__)


class KeyChanged(ZkfsError):
    """The server gives a user another public key than the one pinned here."""


def normalize_fingerprint(text: str) -> str:
    return "".join(text.split()).lower()


class Pins:
    """Public keys pinned in ``$ZKFS_HOME/pinned_keys.json``, per server: the first
    key seen for a user is kept; a different one later is refused unless its
    fingerprint, checked out of band, is given."""

    def __init__(self, state: LocalState, server: str):
        self.state, self.server = state, server

    def check(self, username: str, public: bytes, fingerprint: str | None = None) -> bool:
        """Raises KeyChanged unless ``public`` is the key pinned for ``username`` (or,
        with ``fingerprint``, the key that fingerprint names: then it is pinned).
        Returns True when it was pinned just now (first use)."""
        actual = crypto.fingerprint(public)
        if fingerprint is not None:
            if normalize_fingerprint(fingerprint) != normalize_fingerprint(actual):
                raise KeyChanged(f"the server gives {username} the key with fingerprint {actual}, not the "
                                 f"{fingerprint} you checked: refusing (the server may be swapping keys)")
            first = self.state.pinned_key(self.server, username) != public
            self.state.pin_key(self.server, username, public)
            return first
        pinned = self.state.pinned_key(self.server, username)
        if pinned is None:
            self.state.pin_key(self.server, username, public)
            return True
        if pinned != public:
            raise KeyChanged(f"the server now gives {username} another public key (fingerprint {actual}) than "
                             f"the one pinned here ({crypto.fingerprint(pinned)}): refusing; if {username} "
                             f"really has a new key, compare fingerprints and run again with --fingerprint")
        return False


@dataclass
class Share:
    """One share, opened: its keys by generation and its folder's name."""
    id: UUID
    owner: str
    owner_public: bytes
    root: UUID
    name: str
    state: str                       # converting, rotating, ready
    current_gen: int
    read_only: bool
    mine: bool                       # this account owns it
    keys: Keyring
    secrets: dict[int, bytes] = field(repr=False, default_factory=dict)
    members: list[dict] = field(default_factory=list)     # the owner's view: username, public_key, read_only

    @property
    def scope(self) -> UUID | None:
        """What a request about its inodes names: the share, unless it is our own."""
        return None if self.mine else self.id


def grant(identity: IdentityKey, share: UUID, gen: int, root: UUID, owner_public: bytes,
          member_public: bytes, secret: bytes) -> str:
    """Generation ``gen``'s secret wrapped for ``member_public`` by the owner (``identity``)."""
    ctx = crypto.grant_context(share, gen, root, owner_public, member_public)
    peer = member_public if identity.public == owner_public else owner_public
    return b64encode(crypto.wrap_key(crypto.grant_wrapping_key(identity, peer, ctx), secret, ctx))


def open_grant(identity: IdentityKey, share: UUID, gen: int, root: UUID, owner_public: bytes,
               wrapped: str) -> bytes:
    ctx = crypto.grant_context(share, gen, root, owner_public, identity.public)
    peer = owner_public if identity.public != owner_public else identity.public
    return crypto.unwrap_key(crypto.grant_wrapping_key(identity, peer, ctx), b64decode(wrapped), ctx)


def share_keyring(share: UUID, secrets: dict[int, bytes], current_gen: int, state: str,
                  fallback: Keyring | None = None) -> Keyring:
    derived = {g: ShareKeys.derive(s) for g, s in secrets.items()}
    return Keyring(masters={g: k.files for g, k in derived.items()}, current_gen=current_gen,
                   namespaces={g: k.namespace for g, k in derived.items()},
                   old_readers=state != "ready", fallback=fallback, share=share)


def new_secret() -> bytes:
    return os.urandom(crypto.KEY_BYTES)


def _check_members(identity: IdentityKey, share: UUID, gen: int, d: dict) -> None:
    """The member list the server gives the owner must be the one the owner sealed:
    else a server could slip in a member of its own and be granted the next generation."""
    members = [(m["username"], b64decode(m["public_key"]), bool(m["read_only"])) for m in d.get("members", [])]
    seal = crypto.members_seal(identity, share, gen, members)
    if not std_hmac.compare_digest(seal, b64decode(d.get("members_seal") or "")):
        raise TamperedError("its list of members is not the one this account made: the server changed it")


class ShareBook:
    """Loads this account's shares from the server and opens them. A share that
    does not open (a grant that fails, an owner key that changed) is left out and
    named in ``problems``: the rest stay usable."""

    def __init__(self, api: ApiClient, pins: Pins | None):
        self.api = api
        self.pins = pins
        self.problems: list[str] = []

    def load(self, keyring: Keyring) -> dict[UUID, Share]:
        self.problems = []
        identity = keyring.identity
        out: dict[UUID, Share] = {}
        for d in self.api.shares():
            try:
                share = self._open(d, keyring, identity)
            except (ZkfsError, IntegrityError, KeyError, ValueError) as exc:
                why = str(exc) or exc.__class__.__name__
                self.problems.append(f"the folder {d.get('owner')} shares ({d.get('id')}) cannot be opened: {why}")
                log.info("%s", self.problems[-1])     # the caller reports them (the CLI, the mount's log)
                continue
            out[share.id] = share
        return out

    def _open(self, d: dict, keyring: Keyring, identity: IdentityKey | None) -> Share:
        if identity is None:
            raise ZkfsError("this account has no identity key yet: log in again")
        sid, root = UUID(d["id"]), UUID(d["root_inode"])
        owner_public = b64decode(d["owner_public_key"])
        mine = owner_public == identity.public
        if not mine and self.pins is not None:
            self.pins.check(d["owner"], owner_public)
        secrets = {}
        for g in d["grants"]:
            try:
                secrets[g["gen"]] = open_grant(identity, sid, g["gen"], root, owner_public, g["wrapped"])
            except IntegrityError:
                raise TamperedError(f"its key generation {g['gen']} was not granted by {d['owner']}") from None
        current = d["current_gen"]
        if current not in secrets:
            raise TamperedError("no key for its current generation")
        fallback = keyring if mine and d["state"] == "converting" else None
        keys = share_keyring(sid, secrets, current, d["state"], fallback)
        try:
            name = crypto.open_share_name(keys.namespace, b64decode(d["name"]), root)
        except IntegrityError:
            raise TamperedError("its name does not open under its key") from None
        if mine:
            _check_members(identity, sid, current, d)
        return Share(id=sid, owner=d["owner"], owner_public=owner_public, root=root, name=name,
                     state=d["state"], current_gen=current, read_only=bool(d["read_only"]) and not mine,
                     mine=mine, keys=keys, secrets=secrets, members=d.get("members", []))
