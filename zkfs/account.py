"""Account key hierarchy: password -> (auth key, KEK) -> master keys -> namespace
and file keys. register, login, password change and master-key rotation."""
from __future__ import annotations

import errno as E
import hmac as std_hmac
import os
import stat
import time
from dataclasses import dataclass
from uuid import UUID, uuid4

from . import crypto
from .api import ApiClient
from .crypto import IdentityKey, IntegrityError, KdfParams, NamespaceKey, PasswordKeys
from .entryset import EntrySet
from .errors import ServerError, TamperedError, ZkfsError
from .format import Attrs, b64decode, b64encode


def kdf_to_wire(p: KdfParams, check: bytes) -> dict:
    return {"alg": "argon2id", "salt": b64encode(p.salt), "memory_kib": p.memory_kib,
            "iterations": p.iterations, "lanes": p.lanes, "check": b64encode(check)}


@dataclass(frozen=True)
class Derived:
    """Keys derived from the password under the account's KDF parameters."""
    keys: PasswordKeys
    params: KdfParams
    username: str
    checked: bool        # False: an account from before kdf checks (sign_in adds one)

    @property
    def check(self) -> bytes:
        return crypto.kdf_check(self.keys, self.username, self.params)


class WrongPassword(ZkfsError):
    errno = E.EACCES


def new_kdf(username: str, password: str) -> tuple[Derived, dict]:
    """Fresh parameters (the floor: Argon2id, 64 MiB, t=3, p=4, ~0.15 s here) for a
    new password, and their wire form with the check that binds them to it."""
    params = KdfParams.new()
    derived = Derived(crypto.derive_password_keys(password, params), params, username, True)
    return derived, kdf_to_wire(params, derived.check)


def derive(api: ApiClient, username: str, password: str) -> Derived:
    """Derive the password keys under the parameters the server serves, after
    checking them: below the floor, nothing is derived; above it, the check the
    account stored must verify before anything derived leaves this machine
    (a wrong password fails here too, without asking the server)."""
    wire = api.kdf(username)
    try:
        params = KdfParams(salt=b64decode(wire["salt"]), memory_kib=int(wire["memory_kib"]),
                           iterations=int(wire["iterations"]), lanes=int(wire["lanes"]))
        check = b64decode(wire["check"]) if wire.get("check") is not None else None
        ok = wire.get("alg") == "argon2id"
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise TamperedError("the server's password-hashing parameters are malformed")
    weak = params.weakness()
    if weak:
        raise ZkfsError(f"refusing to hash the password: the server asks for Argon2id with {weak}, "
                        "below what this client accepts; nothing was sent (a hostile server?)",
                        errno=E.EPROTO)
    derived = Derived(crypto.derive_password_keys(password, params), params, username, check is not None)
    if check is not None and not std_hmac.compare_digest(derived.check, check):
        raise WrongPassword("login failed: wrong username or password")
    return derived


def sign_in(api: ApiClient, username: str, password: str, device: str | None = None) -> tuple[Derived, dict]:
    """derive + login; an account without a kdf check gets one now. Returns the
    keys and the token response (``api.token`` is set). ``device``: see ``login``."""
    derived = derive(api, username, password)
    token = login(api, username, derived.keys, device)
    api.token = token["access_token"]
    if not derived.checked:
        api.set_kdf(kdf_to_wire(derived.params, derived.check))
    return derived, token


@dataclass
class Keyring:
    """The unwrapped master keys and namespace keys (by generation). Generations
    share one namespace key, except while a `rotate-key --full` moves everything
    to a new one: then names and attributes are sealed under either.

    A shared folder has a keyring of its own (zkfs/sharekeys.py): a namespace key
    and a file-key wrapping key per generation of the share's keys."""
    masters: dict[int, bytes]
    current_gen: int
    namespaces: dict[int, NamespaceKey]
    identity: IdentityKey | None = None     # the account's key pair for sharing
    # False: only the current namespace key opens names and attributes (a share
    # re-sealed since its last key rotation: an old key is one a removed member has).
    old_readers: bool = True
    # Also opens (a folder being made a share: its records move from the account's keys).
    fallback: "Keyring | None" = None
    share: UUID | None = None               # the shared folder whose keys these are

    @property
    def namespace(self) -> NamespaceKey:
        """The key new names and attributes are sealed under."""
        return self.namespaces[self.current_gen]

    @property
    def readers(self) -> list[NamespaceKey]:
        """Every distinct namespace key that opens names and attributes, the current one first."""
        out = [self.namespace]
        for gen in sorted(self.namespaces, reverse=True) if self.old_readers else ():
            if all(k.raw != self.namespaces[gen].raw for k in out):
                out.append(self.namespaces[gen])
        if self.fallback is not None:
            out += [k for k in self.fallback.readers if all(k.raw != o.raw for o in out)]
        return out

    @classmethod
    def unlock(cls, account: dict, kek: bytes) -> "Keyring":
        masters: dict[int, bytes] = {}
        namespaces: dict[int, NamespaceKey] = {}
        for rec in account["master_keys"]:
            gen = rec["gen"]
            try:
                masters[gen] = crypto.unwrap_key(kek, b64decode(rec["wrapped_master"]), crypto.master_context(gen))
            except IntegrityError:
                raise ZkfsError("the saved keys no longer open this account (password changed elsewhere?): "
                                "run `client.py login` again") from None
            try:
                namespaces[gen] = NamespaceKey(crypto.unwrap_key(
                    masters[gen], b64decode(rec["wrapped_namespace"]),
                    crypto.namespace_context(gen, UUID(account["root_inode"]))))
            except IntegrityError:
                raise TamperedError("the account's namespace key does not fit its root folder: "
                                    "the server's account record was tampered with") from None
        if account["current_gen"] not in namespaces:
            raise TamperedError("the server sent no key for the current generation")
        return cls(masters=masters, current_gen=account["current_gen"], namespaces=namespaces,
                   identity=_unlock_identity(account.get("identity"), masters))

    def wrap_file_key(self, inode: UUID, key: bytes) -> tuple[int, bytes]:
        gen = self.current_gen
        return gen, crypto.wrap_key(self.masters[gen], key, crypto.file_key_context(inode))

    def unwrap_file_key(self, inode: UUID, gen: int, wrapped: bytes) -> bytes:
        master = self.masters.get(gen)
        try:
            if master is None:
                raise TamperedError(f"file {inode} names an unknown key generation {gen}")
            try:
                return crypto.unwrap_key(master, wrapped, crypto.file_key_context(inode))
            except IntegrityError:
                raise TamperedError(f"the key of file {inode} was tampered with or swapped") from None
        except TamperedError:
            if self.fallback is None:
                raise
            return self.fallback.unwrap_file_key(inode, gen, wrapped)


def _unlock_identity(record: dict | None, masters: dict[int, bytes]) -> IdentityKey | None:
    """The account's identity key from its record (None: made at the next login)."""
    if record is None:
        return None
    try:
        public = b64decode(record["public_key"])
        raw = crypto.unwrap_key(masters[record["gen"]], b64decode(record["wrapped_private"]),
                                crypto.identity_context(record["gen"], public))
        key = IdentityKey(raw)
    except (KeyError, ValueError, IntegrityError):
        key = None
    if key is None or key.public != public:
        raise TamperedError("the account's identity key does not open or does not match its public key: "
                            "the server's account record was tampered with")
    return key


def identity_record(keyring: Keyring, key: IdentityKey) -> dict:
    """``key`` wrapped under the current master key generation."""
    gen = keyring.current_gen
    return {"public_key": b64encode(key.public), "gen": gen,
            "wrapped_private": b64encode(crypto.wrap_key(keyring.masters[gen], key.raw,
                                                         crypto.identity_context(gen, key.public)))}


def ensure_identity(api: ApiClient, keyring: Keyring) -> IdentityKey:
    """The account's identity key, made (and published) now if it has none yet:
    accounts from before sharing get theirs at their next login."""
    if keyring.identity is None:
        key = IdentityKey.generate()
        api.set_identity(identity_record(keyring, key))
        keyring.identity = key
    return keyring.identity


def rewrap_identity(api: ApiClient, keyring: Keyring) -> None:
    """After a new master key generation: the identity key under it (the key pair
    stays the same: others have pinned its public half)."""
    if keyring.identity is not None:
        api.set_identity(identity_record(keyring, keyring.identity))


def master_record(kek: bytes, gen: int, master: bytes, namespace: NamespaceKey, root: UUID) -> dict:
    return {
        "gen": gen,
        "wrapped_master": b64encode(crypto.wrap_key(kek, master, crypto.master_context(gen))),
        "wrapped_namespace": b64encode(crypto.wrap_key(master, namespace.raw,
                                                       crypto.namespace_context(gen, root))),
    }


def root_attrs(uid: int = 0, gid: int = 0) -> Attrs:
    now = time.time_ns()
    return Attrs(mode=stat.S_IFDIR | 0o755, uid=uid, gid=gid, atime_ns=now, mtime_ns=now, ctime_ns=now,
                 entries=EntrySet())


def register(api: ApiClient, username: str, password: str) -> UUID:
    derived, kdf = new_kdf(username, password)
    keys = derived.keys
    master, namespace = crypto.random_key(), NamespaceKey.generate()
    root = uuid4()
    body = {
        "username": username, "auth_key": b64encode(keys.auth_key), "kdf": kdf,
        "master_key": master_record(keys.kek, 1, master, namespace, root),
        "root_inode": str(root),
        "root_meta": b64encode(root_attrs(os.getuid(), os.getgid()).encrypt(namespace, root)),
    }
    try:
        return UUID(api.register(body)["user_id"])
    except ServerError as exc:
        if exc.code == "exists":
            raise ZkfsError(f"username {username!r} is already taken") from None
        raise


def login(api: ApiClient, username: str, keys: PasswordKeys, device: str | None = None) -> dict:
    """Exchange the auth key for a token. Returns the token response. ``device``:
    this machine's credential from an earlier login (others guessing at the
    account do not lock it out); a response to a login without one carries a new one."""
    try:
        return api.login(username, b64encode(keys.auth_key), device)
    except ServerError as exc:
        if exc.code == "bad_credentials":
            raise ZkfsError("login failed: wrong username or password", errno=exc.errno) from None
        if exc.code == "throttled":
            raise ZkfsError("too many failed logins: wait a few minutes and try again") from None
        raise


def change_password(api: ApiClient, username: str, current: PasswordKeys, new_password: str) -> tuple[PasswordKeys, dict]:
    """Re-wrap every master key generation under the new KEK: O(1) in files."""
    account = api.account()
    try:
        keyring = Keyring.unlock(account, current.kek)
    except ZkfsError:
        raise ZkfsError("the current password is wrong") from None
    derived, kdf = new_kdf(username, new_password)
    new = derived.keys
    records = []
    for rec in account["master_keys"]:
        gen = rec["gen"]
        records.append({"gen": gen,
                        "wrapped_master": b64encode(crypto.wrap_key(new.kek, keyring.masters[gen], crypto.master_context(gen))),
                        "wrapped_namespace": rec["wrapped_namespace"]})
    try:
        token = api.change_password({
            "current_auth_key": b64encode(current.auth_key), "new_auth_key": b64encode(new.auth_key),
            "new_kdf": kdf, "master_keys": records,
        })
    except ServerError as exc:
        if exc.code == "bad_credentials":
            raise ZkfsError("the current password is wrong") from None
        raise
    return new, token


_ROTATE_ROUNDS = 5      # re-wrap passes before giving up on keys that keep arriving


def rotate_master_key(api: ApiClient, keys: PasswordKeys, progress=None) -> dict:
    """New master key generation; every file key re-wrapped, no content touched.

    Resumable: the new generation becomes current first, so a crash leaves every
    file readable under one generation or the other; rerunning finishes the job.
    A mount that creates files meanwhile may still wrap their keys under an old
    generation until it notices the new one: the old generations are dropped only
    once no key uses them, re-wrapping such late keys first.
    """
    kek, proof = keys.kek, b64encode(keys.auth_key)
    account = api.account()
    keyring = Keyring.unlock(account, kek)
    if len(keyring.readers) > 1:
        raise ZkfsError("a `rotate-key --full` was interrupted: run it again to finish it first")
    old_gens = sorted(keyring.masters)
    new_gen = keyring.current_gen + 1
    master = crypto.random_key()
    api.add_master_key(master_record(kek, new_gen, master, keyring.namespace, UUID(account["root_inode"])), proof)
    keyring.masters[new_gen] = master
    keyring.current_gen = new_gen
    rewrap_identity(api, keyring)
    rewrapped = _rewrap_file_keys(api, keyring, progress, 0)
    for attempt in range(_ROTATE_ROUNDS):
        try:
            while old_gens:
                api.delete_master_key(old_gens[0], proof)
                old_gens.pop(0)
            break
        except ServerError as exc:
            if exc.code != "in_use" or attempt == _ROTATE_ROUNDS - 1:
                raise
            # another client wrapped a new file's key under an old generation meanwhile
            rewrapped += _rewrap_file_keys(api, keyring, progress, rewrapped)
    return {"generation": new_gen, "files": rewrapped}


def _rewrap_file_keys(api: ApiClient, keyring: "Keyring", progress, done: int) -> int:
    """Re-wrap every file key not under the current generation; returns how many."""
    batch: list[dict] = []
    count = 0
    for entry in api.list_keys():
        if entry["gen"] == keyring.current_gen or entry.get("share") is not None:
            continue            # a shared folder's keys are under its own generations
        inode = UUID(entry["inode"])
        file_key = keyring.unwrap_file_key(inode, entry["gen"], b64decode(entry["wrapped_key"]))
        gen, wrapped = keyring.wrap_file_key(inode, file_key)
        batch.append({"inode": str(inode), "gen": gen, "wrapped_key": b64encode(wrapped)})
        if len(batch) == 500:
            api.put_keys(batch)
            count += len(batch)
            batch = []
            if progress:
                progress(done + count)
    if batch:
        api.put_keys(batch)
        count += len(batch)
    return count
