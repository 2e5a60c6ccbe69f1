"""`share`, `unshare` and their key work (docs/FORMAT.md and docs/THREAT_MODEL.md, "Shared folders").

Sharing a folder gives its subtree keys of its own: a new share, generation 1,
whose secret is granted to the owner; every name, attribute set and entry-set
digest in the subtree re-sealed under the share's namespace key and every file
key there re-wrapped under the share's (zkfs/rotation.py's walk, restricted to
the subtree); then members, each granted every generation.

Removing a member rotates: the member goes and a new generation comes, granted to
everyone left, in one server transaction; then every name and attribute set is
re-sealed under it. Existing content keeps its file keys (the removed member may
have them) until ``--reencrypt`` gives each file a new one; a new file, or a new
version of an old one, always gets a key of the new generation.

Everything is resumable without local state: the share's state on the server
(``converting``, ``rotating``) says a walk is unfinished, and what is left is read
from the records, as in rotate-key --full.
"""
from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID, uuid4

from . import crypto
from .crypto import IntegrityError, ShareKeys
from .errors import ServerError, ZkfsError
from .format import b64decode, b64encode
from .rotation import PASSES, Progress, Result, reencrypt_files, reseal_tree
from .sharekeys import Pins, Share, grant, new_secret
from .vault import Node, Vault

_KEY_BATCH = 500


@dataclass
class Outcome:
    share: Share
    resealed: int = 0
    files: int = 0            # file keys moved into the share, or files re-encrypted
    bytes: int = 0
    pinned_now: bool = False  # the member's public key was seen here for the first time


def _identity(vault: Vault):
    identity = vault.keyring.identity
    if identity is None:
        raise ZkfsError("this account has no identity key yet: run `client.py login` again")
    return identity


def _member_key(vault: Vault, pins: Pins, username: str, fingerprint: str | None = None) -> tuple[bytes, bool]:
    """``username``'s public key from the server, if it is the one pinned here (or
    the one ``fingerprint`` names), and whether it was pinned just now."""
    try:
        found = vault.api.public_key(username)
    except ServerError as exc:
        if exc.code == "not_found":
            raise ZkfsError(f"no user {username!r} who can be shared with (unknown, or has not logged in "
                            "since sharing exists)") from None
        raise
    public = b64decode(found["public_key"])
    return public, pins.check(found["username"], public, fingerprint)


def share_folder(vault: Vault, node: Node, name: str, username: str, *, read_only: bool, pins: Pins,
                 fingerprint: str | None = None, progress: Progress | None = None) -> Outcome:
    """Share folder ``node`` (called ``name``) with ``username``: made a share first
    if it is not one yet (or finished, if that was interrupted)."""
    identity = _identity(vault)
    if not node.is_dir:
        raise ZkfsError("only folders can be shared")
    if username.lower() == vault.api.account()["username"].lower():
        raise ZkfsError("you own this folder already")
    public, pinned_now = _member_key(vault, pins, username, fingerprint)     # before anything changes
    share = vault.domains.share_rooted_at(node.id)
    if share is None:
        if node.id == vault.root:
            raise ZkfsError("the root folder cannot be shared: share a folder in it")
        if vault.share_of(node.id) is not None:
            raise ZkfsError("this folder is inside a shared folder: share that one")
        share = _create(vault, node, name)
    elif not share.mine:
        raise ZkfsError(f"{share.owner} owns this folder: only they can share it")
    outcome = finish(vault, share, progress or Progress()) if share.state != "ready" else Outcome(share)
    share = outcome.share
    grants = [{"gen": g, "wrapped": grant(identity, share.id, g, share.root, identity.public, public, secret)}
              for g, secret in sorted(share.secrets.items())]
    members = [*_listed(share), (username, public, read_only)]
    try:
        vault.api.add_member(share.id, {
            "username": username, "read_only": read_only, "grants": grants,
            "members_seal": _seal(identity, share.id, share.current_gen, members),
            "expect_members": [m["username"] for m in share.members]})
    except ServerError as exc:
        if exc.code == "exists":
            raise ZkfsError(f"{username} is already a member of {name}") from None
        raise
    vault.reload_shares()
    outcome.share = _share(vault, share.id)
    outcome.pinned_now = pinned_now
    return outcome


def _create(vault: Vault, node: Node, name: str) -> Share:
    identity = _identity(vault)
    sid, secret = uuid4(), new_secret()
    keys = ShareKeys.derive(secret)
    try:
        vault.api.create_share({
            "id": str(sid), "root_inode": str(node.id),
            "name": b64encode(crypto.seal_share_name(keys.namespace, node.id, name)),
            "grant": grant(identity, sid, 1, node.id, identity.public, identity.public, secret),
            "members_seal": _seal(identity, sid, 1, [])})
    except ServerError as exc:
        if exc.code == "conflict":
            raise ZkfsError(f"cannot share this folder: {exc}") from None
        raise
    vault.reload_shares()
    return _share(vault, sid)


def _share(vault: Vault, sid: UUID) -> Share:
    """The share as loaded just now (an error naming why, if it did not open)."""
    share = vault.domains.shares.get(sid)
    if share is None:
        why = "; ".join(vault.book.problems) if vault.book is not None else ""
        raise ZkfsError(f"the shared folder did not open after the change: {why or 'it is gone'}")
    return share


def unshare_folder(vault: Vault, node: Node, username: str, *, pins: Pins, reencrypt: bool = False,
                   progress: Progress | None = None) -> Outcome:
    """Remove ``username`` at once and rotate the share's keys; ``reencrypt``: also
    give every file a new key (resumable: run again after an interruption)."""
    share = vault.domains.share_rooted_at(node.id)
    if share is None or not share.mine:
        raise ZkfsError("this folder is not one you share")
    member = next((m for m in share.members if m["username"].lower() == username.lower()), None)
    if member is not None:
        share = _rotate(vault, share, member["username"], pins)
    elif share.state == "ready" and not (reencrypt and len(share.secrets) > 1):
        raise ZkfsError(f"{username} is not a member of {share.name}")
    return finish(vault, share, progress or Progress(), reencrypt=reencrypt)


def _rotate(vault: Vault, share: Share, removed: str, pins: Pins) -> Share:
    """The member goes and a new generation comes, granted to the owner and every
    member left (whose keys must still be the ones pinned here)."""
    identity = _identity(vault)
    gen, secret = share.current_gen + 1, new_secret()
    keys = ShareKeys.derive(secret)
    grants = [{"username": vault.api.account()["username"],
               "wrapped": grant(identity, share.id, gen, share.root, identity.public, identity.public, secret)}]
    left = [m for m in _listed(share) if m[0] != removed]
    for username, public, _read_only in left:
        pins.check(username, public)
        grants.append({"username": username,
                       "wrapped": grant(identity, share.id, gen, share.root, identity.public, public, secret)})
    vault.api.new_share_generation(share.id, {
        "gen": gen, "remove": removed, "grants": grants,
        "members_seal": _seal(identity, share.id, gen, left),
        "name": b64encode(crypto.seal_share_name(keys.namespace, share.root, share.name))})
    vault.reload_shares()
    return _share(vault, share.id)


def _listed(share: Share) -> list[tuple[str, bytes, bool]]:
    """The members as the owner listed them (the list ShareBook checked against its seal)."""
    return [(m["username"], b64decode(m["public_key"]), bool(m["read_only"])) for m in share.members]


def _seal(identity, share: UUID, gen: int, members: list[tuple[str, bytes, bool]]) -> str:
    return b64encode(crypto.members_seal(identity, share, gen, members))


def finish(vault: Vault, share: Share, progress: Progress, *, reencrypt: bool = False) -> Outcome:
    """Bring the share to ``ready``: everything sealed under its current generation
    (file keys moved into it, for a new share), then, with ``reencrypt``, every file
    under a key of that generation and the old generations dropped."""
    outcome = Outcome(share)
    result = Result(share.current_gen)
    for _ in range(PASSES):
        share = _share(vault, share.id)
        stale = _old_file_keys(vault, share)
        found = reseal_tree(vault, share.root, set(stale) if reencrypt else set(), result, progress)
        if share.state == "converting":
            found += _move_file_keys(vault, share, stale, outcome, progress)
        elif reencrypt:
            found += reencrypt_files(vault, stale, result, progress)
        if found == 0 and (not reencrypt or _drop_old_generations(vault, share)):
            break
    else:
        raise ZkfsError("the shared folder kept changing: run the command again to finish")
    if share.state != "ready":
        vault.api.share_ready(share.id)
    vault.reload_shares()
    outcome.share = _share(vault, share.id)
    outcome.resealed = result.resealed
    outcome.files += result.files
    outcome.bytes = result.bytes
    return outcome


def _old_file_keys(vault: Vault, share: Share) -> list[UUID]:
    """Files of the share whose key is not under its current generation (for a
    share being made: still under the account's)."""
    sid = str(share.id)
    return [UUID(k["inode"]) for k in vault.api.list_keys()
            if k.get("share") == sid and (share.state == "converting" or k["gen"] < share.current_gen)]


def _move_file_keys(vault: Vault, share: Share, inodes: list[UUID], outcome: Outcome, progress: Progress) -> int:
    """A new share's file keys, from the account's generations to the share's first
    (the content is not touched: it is the same key, wrapped under another)."""
    wanted = set(inodes)
    batch, moved = [], 0
    for k in vault.api.list_keys():
        inode = UUID(k["inode"])
        if inode not in wanted or _opens_under_share(share, inode, k):
            continue
        key = vault.keyring.unwrap_file_key(inode, k["gen"], b64decode(k["wrapped_key"]))
        gen, wrapped = share.keys.wrap_file_key(inode, key)
        batch.append({"inode": str(inode), "gen": gen, "wrapped_key": b64encode(wrapped)})
        if len(batch) == _KEY_BATCH:
            vault.api.put_keys(batch)
            moved, batch = moved + len(batch), []
    if batch:
        vault.api.put_keys(batch)
        moved += len(batch)
    outcome.files += moved
    progress.entries(moved)
    return moved


def _opens_under_share(share: Share, inode: UUID, k: dict) -> bool:
    master = share.keys.masters.get(k["gen"])
    if master is None:
        return False
    try:
        crypto.unwrap_key(master, b64decode(k["wrapped_key"]), crypto.file_key_context(inode))
        return True
    except IntegrityError:
        return False


def _drop_old_generations(vault: Vault, share: Share) -> bool:
    """Forget every generation but the current one. False if a file key still
    uses one (written meanwhile under it): another pass is needed."""
    for gen in sorted(g for g in share.secrets if g != share.current_gen):
        try:
            vault.api.drop_share_generation(share.id, gen)
        except ServerError as exc:
            if exc.code == "in_use":
                return False
            if exc.code != "not_found":
                raise
    return True
