"""`rotate-key --full`: recover from a leaked key, not just retire a master key.

A new master key generation with a *new namespace key*; every name and attribute
set re-sealed under it and every name index recomputed (a rename in place and a
setmeta per inode, in batches); every file's content re-encrypted under a *new
file key* (one commit per file carries the new key with the content it opens,
in one transaction); then the old generations go, and with them the last records
an old key opens.

Resumable without local state: the server's records say what is left (entries
and attributes that open only under a retired namespace key; file keys wrapped
under an old generation), so running it again after a crash or Ctrl-C finishes
the job. Every step is one atomic transaction, and a running mount follows:
it reads either namespace key while both exist (Keyring.readers), and a file's
attributes name the key that opens its current version (Attrs.key_id).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from uuid import UUID

from . import crypto
from .account import master_record, rewrap_identity
from .crypto import BinaryFernet, NamespaceKey, PasswordKeys
from .errors import ServerError, ZkfsError
from .format import HOLE_REF, Manifest, b64encode
from .ops import Op
from .transfer import IN_FLIGHT, ordered
from .vault import Vault

BATCH = 200              # ops per request while re-sealing names and attributes
PASSES = 5              # rounds of "re-seal what is left" before giving up on a busy account


@dataclass
class Progress:
    """Callbacks for the two long phases (the CLI draws progress bars with them)."""
    entries: Callable[[int], None] = lambda n: None        # names/attributes re-sealed
    files: Callable[[int, int], None] = lambda files, nbytes: None


@dataclass
class Result:
    generation: int
    resealed: int = 0        # names and attribute sets
    files: int = 0           # files re-encrypted
    bytes: int = 0


def unfinished(vault: Vault) -> bool:
    """A --full rotation was started and not finished (two namespace keys live)."""
    return len(vault.keyring.readers) > 1


def rotate_full(vault: Vault, keys: PasswordKeys, progress: Progress | None = None) -> Result:
    """``keys``: the KEK wraps the new master key; the auth key is the fresh proof
    the server asks for before it adds or deletes a generation."""
    progress = progress or Progress()
    vault.refresh_keyring()
    if not unfinished(vault):
        _new_generation(vault, keys)
    rewrap_identity(vault.api, vault.keyring)      # the same key pair, under the new master key
    result = Result(vault.keyring.current_gen)
    for _ in range(PASSES):
        if _one_pass(vault, result, progress) == 0 and _drop_old_generations(vault, keys):
            return result
    raise ZkfsError("the account kept changing under rotate-key --full: run it again to finish")


def _new_generation(vault: Vault, keys: PasswordKeys) -> None:
    account = vault.api.account()
    gen = vault.keyring.current_gen + 1
    vault.api.add_master_key(master_record(keys.kek, gen, crypto.random_key(), NamespaceKey.generate(),
                                           UUID(account["root_inode"])), b64encode(keys.auth_key))
    vault.refresh_keyring()


def _one_pass(vault: Vault, result: Result, progress: Progress) -> int:
    """Re-seal and re-encrypt whatever is still under an old key. Returns how much
    was found (0: nothing is left, whether or not everything found went through)."""
    gen = vault.keyring.current_gen
    old_keys = [UUID(k["inode"]) for k in vault.api.list_keys() if k["gen"] < gen and k.get("share") is None]
    found = _reseal_namespace(vault, set(old_keys), result, progress)
    return found + reencrypt_files(vault, old_keys, result, progress)


# ---------------------------------------------------------------- names and attributes
def _reseal_namespace(vault: Vault, old_keys: set[UUID], result: Result, progress: Progress) -> int:
    return reseal_tree(vault, vault.root, old_keys, result, progress)


def reseal_tree(vault: Vault, top: UUID, old_keys: set[UUID], result: Result, progress: Progress) -> int:
    """One walk of ``top``'s tree, within its domain (the account's, or one shared
    folder's): every entry name and attribute set still sealed under a key that is
    not its domain's current one is re-sealed (except the attributes of files in
    ``old_keys``: their re-encryption re-seals them). Returns how many were found."""
    found = 0

    def reseal(ops: list[Op]) -> None:
        nonlocal found
        found += len(ops)
        done = _apply_each(vault, ops)
        result.resealed += done
        progress.entries(done)

    domain = vault.share_of(top)
    node = vault.get(top)
    if node.old_seal:
        reseal([vault.op_setmeta(node.id, node.version, node.attrs.evolve())])
    queue = [top]
    while queue:
        parent = queue.pop()
        ops: list[Op] = []
        for name, node in vault.listdir(parent):
            if node.virtual or vault.share_of(node.id) is not domain:
                continue            # /Shared, or a shared folder: under keys of its own
            if vault.has_old_name(parent, name):
                ops.append(vault.op_rename(node, parent, name, parent, name))
            if node.old_seal and node.id not in old_keys:
                ops.append(vault.op_setmeta(node.id, node.version, node.attrs.evolve()))
            if node.is_dir:
                queue.append(node.id)
            if len(ops) >= BATCH:
                reseal(ops)
                ops = []
        reseal(ops)
    return found


def _apply_each(vault: Vault, ops: list[Op]) -> int:
    """Apply re-seal ops in one request; if another client's change gets in the way,
    one by one, leaving those it refuses for the next pass. Returns how many went."""
    if not ops:
        return 0
    try:
        vault.apply(ops)
        return len(ops)
    except ServerError as exc:
        if exc.code not in _CHANGED_MEANWHILE:
            raise
        if len(ops) == 1:
            return 0
    return sum(_apply_each(vault, [op]) for op in ops)


_CHANGED_MEANWHILE = ("conflict", "not_found", "exists")


# ---------------------------------------------------------------- content
def reencrypt_files(vault: Vault, todo: list[UUID], result: Result, progress: Progress) -> int:
    """Every file whose key is wrapped under an older generation gets a new key
    and its content re-encrypted under it. Returns how many files were found."""
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for inode in todo:
            nbytes = _reencrypt(vault, pool, inode)
            if nbytes is not None:
                result.files += 1
                result.bytes += nbytes
                progress.files(1, nbytes)
    return len(todo)


def reencrypt_file(vault: Vault, inode: UUID) -> int | None:
    """One file under a new key, now (see ``_reencrypt``)."""
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return _reencrypt(vault, pool, inode)


def _reencrypt(vault: Vault, pool: ThreadPoolExecutor, inode: UUID) -> int | None:
    """One file, in one commit: a new key, each chunk read, opened, sealed under the
    new key as a new blob (a few in flight: bounded memory), a new manifest. None if
    the file changed or went meanwhile (the next pass takes it up again)."""
    try:
        node = vault.get(inode)
    except ServerError as exc:
        if exc.code == "not_found":
            return None
        raise
    manifest = vault.manifest(node)
    new_key = crypto.random_key()
    cipher = BinaryFernet(new_key)

    def move(i: int):
        if manifest.chunks[i].is_hole:
            return HOLE_REF
        return vault.upload_chunk(inode, cipher, vault.read_chunk(inode, manifest, i))

    refs = list(ordered(pool, (lambda i=i: move(i) for i in range(len(manifest.chunks))), IN_FLIGHT * 2))
    fresh = Manifest(inode, size=manifest.size, chunk_size=manifest.chunk_size, chunks=refs)
    op = vault.op_commit(inode, node.version, node.attrs.evolve(), fresh, new_key=new_key)
    if _apply_each(vault, [op]) == 0:
        return None
    vault.remember_file_key(inode, new_key)
    return manifest.size


# ---------------------------------------------------------------- the end
def _drop_old_generations(vault: Vault, keys: PasswordKeys) -> bool:
    """Delete every generation but the current one (their master keys, and the old
    namespace key with them). False if a file key still uses one: another client
    wrapped one meanwhile, so another pass is needed."""
    for gen in sorted(g for g in vault.keyring.masters if g != vault.keyring.current_gen):
        try:
            vault.api.delete_master_key(gen, b64encode(keys.auth_key))
        except ServerError as exc:
            if exc.code == "in_use":
                return False
            if exc.code != "not_found":
                raise
    vault.refresh_keyring()
    return True
