"""Helpers for the shared-folder tests (test_shares*.py): raw API clients with a
machine's token (and a share header), every key a member holds, and every sealed
record the server stores, to try the one on the other."""
from __future__ import annotations

import base64
from uuid import UUID

import httpx

from clitools import config
from harness import Machine
from zkfs.api import SHARE_HEADER
from zkfs.crypto import BinaryFernet, IntegrityError, NamespaceKey, ShareKeys
from zkfs.format import SEGMENT_SIZE, encode_name, segment_token_size
from zkfs.session import open_vault
from zkfs.state import LocalState


def api(server, machine: Machine, share: UUID | str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {config(machine)['token']}"}
    if share is not None:
        headers[SHARE_HEADER] = str(share)
    return httpx.Client(base_url=server.api, timeout=30, headers=headers)


def share_of(server, owner: Machine) -> dict:
    """The one share ``owner`` owns, as the server stores it."""
    (row,) = server.query("SELECT s.id, s.root_inode FROM shares s JOIN users u ON u.id = s.owner_id"
                          " WHERE u.username = ?", owner.username)
    return {"id": row[0], "root": row[1]}


def member_keys(machine: Machine) -> dict:
    """Everything a member holds of the shares it belongs to, as it would keep them:
    each generation's secret (and the keys derived from it) and every file key it
    can unwrap now."""
    vault = open_vault(LocalState(machine.home))
    try:
        secrets, files = [], {}
        for share in vault.domains.shares.values():
            if share.mine:
                continue
            secrets += list(share.secrets.values())
            todo = [share.root]
            while todo:
                for _name, node in vault.listdir(todo.pop()):
                    if node.is_dir:
                        todo.append(node.id)
                    elif node.attrs.is_reg:
                        k = vault.api.get_key(node.id, share.id)
                        files[node.id] = share.keys.unwrap_file_key(node.id, k["gen"],
                                                                    base64.b64decode(k["wrapped_key"]))
        assert secrets, "this machine is a member of no share"
        derived = [ShareKeys.derive(s) for s in secrets]
        return {"secrets": secrets, "namespaces": [d.namespace for d in derived],
                "wrapping": [d.files for d in derived], "files": files,
                "identity": vault.keyring.identity.raw}
    finally:
        vault.ledger.close()


def stored_tokens(server) -> set[bytes]:
    """Every sealed record the server holds (sqlite + folder), blobs cut into their
    segments: attributes, manifests, wrapped keys, names, grants, shares' names."""
    tokens: set[bytes] = set()
    for sql in ("SELECT meta, manifest, wrapped_key FROM inodes", "SELECT name FROM dentries",
                "SELECT wrapped FROM share_grants", "SELECT name FROM shares",
                "SELECT wrapped_master, wrapped_namespace FROM master_keys", "SELECT identity_private FROM users"):
        for row in server.query(sql):
            tokens |= {base64.b64decode(v) for v in row if v}
    full = segment_token_size(SEGMENT_SIZE)
    for path in (server.data_dir / "storage").rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            data = path.read_bytes()
            tokens |= {data[i:i + full] for i in range(0, len(data), full)}
    return tokens


def name_hashes(server) -> set[tuple[str, str]]:
    return {(p, h) for p, h in server.query("SELECT parent, name_hash FROM dentries")}


def assert_nothing_opens(tokens: set[bytes], keys: dict, hashes: set[tuple[str, str]] = frozenset(),
                         names: list[str] = ()) -> None:
    """No key in ``keys`` (member_keys) opens any of ``tokens``, and no namespace key
    of theirs computes any of ``hashes`` from ``names``."""
    ciphers = [BinaryFernet(k) for k in keys["wrapping"] + list(keys["files"].values()) + keys["secrets"]]
    ciphers += [ns.cipher for ns in keys["namespaces"]]
    assert tokens and len(ciphers) >= 3
    for token in tokens:
        for cipher in ciphers:
            try:
                cipher.decrypt(token)
            except IntegrityError:
                continue
            raise AssertionError(f"a key the removed member held opens a record stored after the removal "
                                 f"({len(token)} bytes)")
    for parent, h in hashes:
        for ns in keys["namespaces"]:
            assert all(_hash(ns, parent, n) != h for n in names), "a removed member's key computes a new name hash"


def _hash(ns: NamespaceKey, parent: str, name: str) -> str:
    return ns.name_hash(UUID(parent), encode_name(name))
