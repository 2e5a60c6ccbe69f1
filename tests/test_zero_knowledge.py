"""Zero knowledge: after a realistic session (register, upload files and folders,
rename, passwd, rotate-key, links for anyone made and fetched, with and without a
password) no plaintext and no client secret appears anywhere
the server keeps bytes: storage/, app.db (+ -wal/-shm), .env, and its log; on
PostgreSQL + S3, a pg_dump of its database and every object of its bucket."""
from __future__ import annotations

import base64
import os
import urllib.parse
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from clitools import assert_ok, config, keys_file, uploads
from zkfs import crypto
from zkfs.account import Keyring
from zkfs.linkformat import LinkUrl, b64url, open_record
from zkfs.crypto import IdentityKey

pytestmark = [pytest.mark.timeout(300), pytest.mark.backends]


def b64_forms(data: bytes) -> set[bytes]:
    """Every base64 substring that must appear wherever ``data`` is base64-encoded
    inside a larger stream, whatever its alignment (standard and URL-safe alphabets)."""
    out = set()
    for k in range(3):
        part = data[k:]
        part = part[: len(part) - len(part) % 3]
        if len(part) >= 9:
            enc = base64.b64encode(part)
            out |= {enc, base64.urlsafe_b64encode(part)}
    return out


def forms(data: bytes, *, text: bool = False) -> set[bytes]:
    out = {data} | b64_forms(data)
    if text:
        out |= {urllib.parse.quote(data).encode(), urllib.parse.quote_plus(data).encode(),
                data.decode().encode("utf-16-le")}
    else:
        out |= {data.hex().encode(), data.hex().upper().encode()}
    return out


def server_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*") if p.is_file())


def kept_bytes(server, pg=None) -> dict[str, bytes]:
    """Everything the server keeps: its data dir's files; with PostgreSQL + S3 also a
    dump of its database and every object under its bucket prefix."""
    out = {p.relative_to(server.data_dir).as_posix(): p.read_bytes() for p in server_files(server.data_dir)}
    if server.database_url:
        out["pg_dump"] = pg.dump(server.database_url)
        for key in server.stored_objects():
            user, inode, blob = (UUID(part) for part in key.split("/"))
            out["bucket:" + key] = server.read_object(user, inode, blob)
    return out


def scan(kept: dict[str, bytes], needles: dict[str, set[bytes]]) -> list[str]:
    hits = []
    for where, blob in kept.items():
        for label, variants in needles.items():
            for v in variants:
                if v in blob:
                    hits.append(f"{label} found in {where} (as {v[:40]!r})")
                    break
    return hits


def unlock(server, machine) -> Keyring:
    """The account's keyring, unwrapped in-process from keys.json's KEK."""
    token = config(machine)["token"]
    acct = httpx.get(server.api + "/account", headers={"Authorization": f"Bearer {token}"}).json()
    return Keyring.unlock(acct, base64.b64decode(keys_file(machine)["kek"]))


def file_keys(server, machine, ring: Keyring) -> list[bytes]:
    token = config(machine)["token"]
    keys = httpx.get(server.api + "/keys", headers={"Authorization": f"Bearer {token}"}).json()["keys"]
    return [ring.unwrap_file_key(UUID(k["inode"]), k["gen"], base64.b64decode(k["wrapped_key"]))
            for k in keys]


def test_server_learns_nothing(server, make_machine, tmp_path, backend, request):
    pg = request.getfixturevalue("pg_cluster") if backend == "postgres" else None
    tag = os.urandom(4).hex()
    password = f"Zk-Pass-{tag}-horse"
    new_password = f"Zk-NewPass-{tag}-staple"
    m = make_machine(server).register(password=password)

    # ---- a tree with distinctive names and contents
    folder = f"ZkSecretFolder{tag}"
    nested = f"ZkNestedDir{tag}"
    empty_dir = f"ZkEmptyDir{tag}"
    repeated_name = f"zk-secret-name-{tag}.txt"
    renamed_name = f"zk-renamed-name-{tag}.txt"
    random_name = f"zk-random-name-{tag}.bin"
    inline_name = f"zk-inline-name-{tag}.md"
    deep_name = f"zk-deep-name-{tag}.csv"
    repeated_marker = f"ZK-REPEATED-MARKER-{tag}|".encode()
    inline_marker = f"ZK-INLINE-MARKER-{tag}: the quick brown fox".encode()
    deep_marker = f"ZK-DEEP-MARKER-{tag},1,2,3".encode()
    random_content = os.urandom(300_000)

    src = tmp_path / folder
    (src / nested).mkdir(parents=True)
    (src / repeated_name).write_bytes(repeated_marker * (3 * 1024 * 1024 // len(repeated_marker)))
    (src / random_name).write_bytes(random_content)
    (src / inline_name).write_bytes(inline_marker * 10)
    (src / nested / deep_name).write_bytes(deep_marker * 100)
    assert_ok(m.run("upload", "-r", str(src)))
    assert_ok(m.run("mkdir", f"/{folder}/{empty_dir}"))
    assert_ok(m.run("mv", f"/{folder}/{repeated_name}", f"/{folder}/{renamed_name}"))

    # ---- secrets as they are before passwd / rotate-key
    secrets: dict[str, bytes] = {}
    k1 = keys_file(m)
    secrets["auth key (old password)"] = base64.b64decode(k1["auth_key"])
    secrets["KEK (old password)"] = base64.b64decode(k1["kek"])
    ring1 = unlock(server, m)
    for gen, master in ring1.masters.items():
        secrets[f"master key gen {gen}"] = master
    secrets["namespace key"] = ring1.namespace.raw
    for i, key in enumerate(file_keys(server, m, ring1)):
        secrets[f"file key {i}"] = key
    assert len(ring1.masters) == 1

    assert_ok(m.run("passwd", "--password-stdin", input=f"{password}\n{new_password}\n"))
    assert_ok(m.run("rotate-key", "--password-stdin", input=f"{new_password}\n"))

    k2 = keys_file(m)
    secrets["auth key (new password)"] = base64.b64decode(k2["auth_key"])
    secrets["KEK (new password)"] = base64.b64decode(k2["kek"])
    ring2 = unlock(server, m)
    assert set(ring2.masters) == {2}
    secrets["master key gen 2"] = ring2.masters[2]
    assert secrets["master key gen 2"] != secrets["master key gen 1"]
    assert secrets["KEK (new password)"] != secrets["KEK (old password)"]
    # the client can still read everything (so the session above really happened)
    out = tmp_path / "back.bin"
    assert_ok(m.run("download", f"/{folder}/{random_name}", "-o", str(out)))
    assert out.read_bytes() == random_content
    assert f"/{folder}/{nested}/{deep_name}" in uploads(m)

    # ---- links for anyone: one plain, one with a password; both fetched with no account
    link_password = f"Zk-LinkPass-{tag}-heron"
    plain_link = LinkUrl.parse(m.run("link", f"/{folder}/{random_name}", "--expires", "7d").stdout.strip())
    locked_link = LinkUrl.parse(m.run("link", f"/{folder}/{inline_name}", "--password", "--password-stdin",
                                      input=link_password + "\n").stdout.strip())
    fetched = tmp_path / "fetched.bin"
    assert_ok(m.run("fetch", str(plain_link), "-o", str(fetched)))
    assert fetched.read_bytes() == random_content
    assert_ok(m.run("fetch", str(locked_link), "-o", str(tmp_path / "fetched.md"), "--password-stdin",
                    input=link_password + "\n"))
    assert "/" + random_name in m.run("link", "--list").stdout

    # ---- what must never reach the server
    needles: dict[str, set[bytes]] = {}
    for label, text in {
        "password": password, "new password": new_password,
        "folder name": folder, "nested folder name": nested, "empty folder name": empty_dir,
        "file name (before rename)": repeated_name, "file name (after rename)": renamed_name,
        "random file name": random_name, "inline file name": inline_name, "deep file name": deep_name,
    }.items():
        needles[label] = forms(text.encode(), text=True)
    for label, marker in {"repeated marker": repeated_marker, "inline marker": inline_marker,
                          "deep marker": deep_marker}.items():
        needles[label] = forms(marker, text=True) | b64_forms(marker * 4)
    for off in (0, 150_000, 300_000 - 48):
        needles[f"random content @{off}"] = forms(random_content[off:off + 48])
    needles["link password"] = forms(link_password.encode(), text=True)
    for label, link in {"plain link": plain_link, "password link": locked_link}.items():
        record_key = crypto.link_record_key(link.secret, link.link_id)
        secrets[f"{label}: secret"] = link.secret
        secrets[f"{label}: record key"] = record_key
        needles[f"{label}: secret in the URL's form"] = {b64url(link.secret).encode()}
        needles[f"{label}: the URL"] = forms(str(link).encode(), text=True)
    token = base64.b64decode(httpx.get(f"{server.url}/s/{b64url(locked_link.link_id)}/record").json()["record"])
    kdf = open_record(locked_link.secret, locked_link.link_id, token).kdf
    root = crypto.password_root(link_password, kdf)
    secrets["password link: Argon2id root"] = root
    secrets["password link: content key"] = crypto.link_content_key(locked_link.secret, locked_link.link_id, root)
    for label, key in secrets.items():
        needles[label] = forms(key)

    kept = kept_bytes(server, pg)
    if backend == "sqlite":
        assert {"app.db", ".env", "server.log"} <= set(kept), sorted(kept)
        assert any(n.startswith("storage/") for n in kept)
    else:
        assert "pg_dump" in kept and "server.log" in kept and not any(n.startswith("storage/") for n in kept)
        assert sum(n.startswith("bucket:") for n in kept) >= 4, sorted(kept)

    # positive control: the scanner does see what the server legitimately stores
    control = scan(kept, {"username": {m.username.encode()}})
    assert control, "username not found anywhere: the scan is not reading the database"
    assert scan(kept, {"link id": {str(UUID(bytes=plain_link.link_id)).encode()}}), "no link row was scanned"
    assert scan(kept, {"link fetched": {f"/s/{b64url(plain_link.link_id)}/record".encode()}}), \
        "the link's fetch is not in the scanned log"

    hits = scan(kept, needles)
    assert not hits, "\n".join(hits)

    # once more after a clean shutdown (WAL checkpointed into app.db, log flushed)
    server.stop()
    hits = scan(kept_bytes(server, pg), needles)
    assert not hits, "\n".join(hits)


def test_server_learns_nothing_of_shared_folders(server, make_machine, tmp_path, backend, request):
    """A folder shared, written by its member, the member removed with --reencrypt:
    no name, content or key of the shared folder (its generations' secrets and the
    keys derived from them, the identity keys, the key agreed between owner and
    member, its file keys) appears anywhere the server keeps bytes."""
    from sharetools import member_keys
    from zkfs.session import open_vault
    from zkfs.state import LocalState

    pg = request.getfixturevalue("pg_cluster") if backend == "postgres" else None
    tag = os.urandom(4).hex()
    alice, bob = make_machine(server).register(), make_machine(server).register()
    folder, sub = f"ZkSharedFolder{tag}", f"ZkSharedSub{tag}"
    names = {"owner file": f"zk-shared-owner-{tag}.txt", "member file": f"zk-shared-member-{tag}.txt",
             "renamed file": f"zk-shared-renamed-{tag}.txt", "shared folder": folder, "shared subfolder": sub}
    markers = {"owner content": f"ZK-SHARED-OWNER-MARKER-{tag}|".encode() * 5000,
               "member content": f"ZK-SHARED-MEMBER-MARKER-{tag}|".encode() * 50}
    (tmp_path / folder / sub).mkdir(parents=True)
    (tmp_path / folder / sub / names["owner file"]).write_bytes(markers["owner content"])
    assert_ok(alice.run("upload", "-r", str(tmp_path / folder)))
    assert_ok(alice.run("share", f"/{folder}", bob.username))
    theirs = f"/Shared/{alice.username}/{folder}"
    (tmp_path / names["member file"]).write_bytes(markers["member content"])
    assert_ok(bob.run("upload", str(tmp_path / names["member file"]), "--to", theirs))
    assert_ok(bob.run("mv", f"{theirs}/{names['member file']}", f"{theirs}/{sub}/{names['renamed file']}"))

    secrets: dict[str, bytes] = {}
    held = member_keys(bob)
    for i, key in enumerate(held["secrets"] + held["wrapping"] + list(held["files"].values())):
        secrets[f"share key {i} (as the member held it)"] = key
    for i, ns in enumerate(held["namespaces"]):
        secrets[f"share namespace key {i}"] = ns.raw
    secrets["member's identity key"] = held["identity"]
    assert_ok(alice.run("unshare", f"/{folder}", bob.username, "--reencrypt"))
    vault = open_vault(LocalState(alice.home))
    try:
        identity = vault.keyring.identity
        secrets["owner's identity key"] = identity.raw
        (share,) = vault.domains.shares.values()
        secrets["owner and member's agreed key"] = identity.agree(IdentityKey(held["identity"]).public)
        for gen, secret in share.secrets.items():
            secrets[f"share secret gen {gen} (after the removal)"] = secret
            secrets[f"share namespace key gen {gen} (after)"] = share.keys.namespaces[gen].raw
            secrets[f"share file-key wrapping key gen {gen} (after)"] = share.keys.masters[gen]
        assert share.current_gen == 2 and len(secrets) >= 10
    finally:
        vault.ledger.close()
    out = tmp_path / "back.txt"
    assert_ok(alice.run("download", f"/{folder}/{sub}/{names['renamed file']}", "-o", str(out)))
    assert out.read_bytes() == markers["member content"]

    needles = {label: forms(text.encode(), text=True) for label, text in names.items()}
    needles |= {label: forms(m[:200], text=True) | b64_forms(m[:600]) for label, m in markers.items()}
    needles |= {label: forms(key) for label, key in secrets.items()}
    kept = kept_bytes(server, pg)
    assert scan(kept, {"usernames": {alice.username.encode(), bob.username.encode()}}), "the scan reads nothing"
    hits = scan(kept, needles)
    assert not hits, "\n".join(hits)
