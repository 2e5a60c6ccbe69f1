"""`rotate-key --full` (zkfs/rotation.py): new master, namespace and file keys, every
name, attribute set and file re-encrypted; resumable; a live mount follows it.
After it, no old key opens anything the server holds: checked by keeping the
old keys and trying each on every record the server stores."""
from __future__ import annotations

import base64
import os
import threading
import time
from pathlib import Path
from uuid import UUID

import pytest

from zkfs.crypto import BinaryFernet, IntegrityError
from zkfs.format import SEGMENT_SIZE, encode_name, segment_token_size
from zkfs.session import open_vault
from zkfs.state import LocalState

from clitools import assert_ok
from harness import Machine
from hostile import HostileServer, error_line

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

FILES = {"a/small.txt": b"small and inline\n", "a/b/medium.bin": os.urandom(300_000),
         "a/b/big.bin": os.urandom(2 * (1 << 20) + 12_345), "empty.txt": b"", "top.txt": b"top\n"}


def _tree(root: Path) -> Path:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _old_keys(machine: Machine) -> dict:
    """Every key the account has now, as a thief of this machine's keys would keep them."""
    vault = open_vault(LocalState(machine.home))
    try:
        ring = vault.keyring
        files = {k["inode"]: ring.unwrap_file_key(UUID(k["inode"]), k["gen"], base64.b64decode(k["wrapped_key"]))
                 for k in vault.api.list_keys()}
        return {"masters": list(ring.masters.values()), "namespaces": ring.readers, "files": files,
                "root": vault.root}
    finally:
        vault.ledger.close()


def _stored_tokens(server, username: str) -> list[bytes]:
    """Every sealed record the server holds for the account (wrapped_master is under
    the KEK, which a full rotation does not change: the password does)."""
    hs = HostileServer(server.data_dir, username)
    try:
        tokens = [base64.b64decode(r[0]) for r in hs.db.execute(
            "SELECT wrapped_namespace FROM master_keys WHERE user_id = ?", (hs.user_id,))]
        for row in hs.db.execute("SELECT meta, manifest FROM inodes WHERE user_id = ?", (hs.user_id,)):
            tokens += [base64.b64decode(v) for v in row if v]
        tokens += [base64.b64decode(r[0]) for r in hs.db.execute(
            "SELECT name FROM dentries WHERE user_id = ?", (hs.user_id,))]
        full = segment_token_size(SEGMENT_SIZE)
        for path in (server.data_dir / "storage" / hs.user_id).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                tokens += [data[i:i + full] for i in range(0, len(data), full)]
        hashes = {r[0] for r in hs.db.execute("SELECT name_hash FROM dentries WHERE user_id = ?", (hs.user_id,))}
        return tokens, hashes, {r[0] for r in hs.db.execute(
            "SELECT DISTINCT parent FROM dentries WHERE user_id = ?", (hs.user_id,))}
    finally:
        hs.close()


def _assert_no_old_key_opens_anything(server, machine: Machine, old: dict, names: list[str]) -> None:
    tokens, hashes, parents = _stored_tokens(server, machine.username)
    ciphers = [BinaryFernet(k) for k in old["masters"] + list(old["files"].values())] + \
        [ns.cipher for ns in old["namespaces"]]
    assert len(tokens) > 20 and len(ciphers) > 5
    for token in tokens:
        for cipher in ciphers:
            with pytest.raises(IntegrityError):
                cipher.decrypt(token)
    for ns in old["namespaces"]:            # no name index an old key computes
        for parent in parents:
            for name in names:
                assert ns.name_hash(UUID(parent), encode_name(name)) not in hashes


def _read_back(machine: Machine, out: Path) -> None:
    for rel, data in FILES.items():
        dest = out / rel.replace("/", "_")
        assert_ok(machine.run("download", "/t/" + rel, "-o", str(dest)))
        assert dest.read_bytes() == data, rel


def test_rotate_full_leaves_no_old_key_opening_anything(server, make_machine, tmp_path):
    m = make_machine(server).register()
    m.run("upload", "-r", str(_tree(tmp_path / "t")))
    old = _old_keys(m)
    proc = m.run("rotate-key", "--full", "--password-stdin", input=m.password + "\n")
    assert "all keys rotated" in proc.stdout and f"{len(FILES)} files" in proc.stdout, proc.stdout
    fresh = make_machine(server)
    fresh.login(m.username, m.password)
    _read_back(fresh, tmp_path / "out")
    _read_back(m, tmp_path / "out2")
    _assert_no_old_key_opens_anything(server, m, old, ["t", "a", "b", "small.txt", "medium.bin", "big.bin",
                                                        "empty.txt", "top.txt"])
    # plain rotate-key stays the cheap re-wrap, and works after a full one
    assert "file keys re-wrapped" in m.run("rotate-key", "--password-stdin", input=m.password + "\n").stdout
    _read_back(fresh, tmp_path / "out3")


def test_rotate_full_resumes_after_a_crash(server, make_machine, lying_proxy, tmp_path):
    """The connection dies mid-way (after some batches went through): the command
    fails with one line, plain rotate-key refuses until it is finished, and running
    it again finishes the job."""
    proxy = lying_proxy(server)
    m = Machine(tmp_path / "home", proxy.url)
    m.register()
    m.run("upload", "-r", str(_tree(tmp_path / "t")))
    old = _old_keys(m)
    seen = []
    proxy.lie("POST", "/fs/ops", truncate=True, times=1,
              when=lambda req: seen.append(1) or len(seen) >= 4)    # the 4th batch's answer is cut
    line = error_line(m.run("rotate-key", "--full", "--password-stdin", input=m.password + "\n", check=False))
    assert "cannot reach the server" in line, line
    assert "interrupted" in error_line(m.run("rotate-key", "--password-stdin", input=m.password + "\n",
                                             check=False))
    _read_back(m, tmp_path / "midway")                 # readable in the middle too
    proc = m.run("rotate-key", "--full", "--password-stdin", input=m.password + "\n")
    assert "all keys rotated" in proc.stdout
    _read_back(m, tmp_path / "out")
    _assert_no_old_key_opens_anything(server, m, old, ["t", "a", "b", "small.txt", "big.bin", "top.txt"])


def test_a_live_mount_follows_rotate_full(server, make_machine, make_mount, tmp_path):
    """A mount open through the whole rotation keeps working: files written through
    it while the rotation runs, and files it had read (their keys cached) before,
    read and write correctly afterwards, and a fresh machine reads it all."""
    m = make_machine(server).register()
    m.run("upload", "-r", str(_tree(tmp_path / "t")))
    mount = make_mount(m)
    root = mount.path
    assert (root / "t/a/b/medium.bin").read_bytes() == FILES["a/b/medium.bin"]      # key cached
    os.symlink("a/small.txt", root / "t/link")
    stop = threading.Event()
    written: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def writer():
        i = 0
        while not stop.is_set() and i < 40:
            data = os.urandom(1000 + i)
            try:
                (root / f"t/during-{i}.bin").write_bytes(data)
                written[f"during-{i}.bin"] = data
            except OSError as exc:
                errors.append(exc)
                return
            i += 1

    elsewhere = make_machine(server)                   # the rotation runs on another machine
    elsewhere.login(m.username, m.password)
    t = threading.Thread(target=writer)
    t.start()
    try:
        elsewhere.run("rotate-key", "--full", "--password-stdin", input=m.password + "\n")
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert written
    assert (root / "t/a/b/medium.bin").read_bytes() == FILES["a/b/medium.bin"]
    # Another machine's versions show within about a second (the change feed): an append
    # made before that is on the old version, and is kept as a conflict copy instead.
    time.sleep(2.5)
    with open(root / "t/a/b/medium.bin", "ab") as f:
        f.write(b"appended after the rotation")
    (root / "t/after.txt").write_bytes(b"created after\n")
    assert os.readlink(root / "t/link") == "a/small.txt"
    assert sorted(os.listdir(root / "t/a")) == ["b", "small.txt"]
    mount.unmount()
    fresh = make_machine(server)
    fresh.login(m.username, m.password)
    out = tmp_path / "out"
    for name, data in list(written.items()) + [("after.txt", b"created after\n")]:
        assert_ok(fresh.run("download", f"/t/{name}", "-o", str(out / name)))
        assert (out / name).read_bytes() == data, name
    assert_ok(fresh.run("download", "/t/a/b/medium.bin", "-o", str(out / "medium.bin")))
    assert (out / "medium.bin").read_bytes() == FILES["a/b/medium.bin"] + b"appended after the rotation"
    vault = open_vault(LocalState(fresh.home))
    try:
        assert len(vault.keyring.masters) == 1 and len(vault.keyring.readers) == 1
    finally:
        vault.ledger.close()
