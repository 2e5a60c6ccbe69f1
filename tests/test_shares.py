"""Shared folders through the real CLI and the raw API (docs/API.md "Shares"):
members read, write and rename; the server enforces who may write and who may
see anything at all; unshare removes a member at once and rotates the keys so
that nothing stored after it opens with any key the member held; a server that
swaps a public key is refused."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from clitools import assert_cli_error, assert_ok, ls_names
from hostile import error_line
from sharetools import api, assert_nothing_opens, member_keys, name_hashes, share_of, stored_tokens
from zkfs.crypto import IdentityKey
from zkfs.errors import ServerError
from zkfs.session import open_vault
from zkfs.state import LocalState

pytestmark = pytest.mark.timeout(300)

SECRET = b"the plans, version 1\n"


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "plan.txt").write_bytes(SECRET)
    (root / "sub" / "big.bin").write_bytes(os.urandom(1_500_000))
    return root


@pytest.fixture
def people(server, make_machine, tmp_path):
    """alice shares /Projects with bob (read-write) and dave (read-only); carol is
    not a member; alice also has a private folder."""
    alice, bob, carol, dave = (make_machine(server).register() for _ in range(4))
    assert_ok(alice.run("upload", "-r", str(_tree(tmp_path / "Projects"))))
    (tmp_path / "Private").mkdir()
    (tmp_path / "Private" / "diary.txt").write_bytes(b"dear diary\n")
    assert_ok(alice.run("upload", "-r", str(tmp_path / "Private")))
    out = alice.run("share", "/Projects", bob.username).stdout
    assert f"shared /Projects with {bob.username} (read-write)" in out and "fingerprint" in out, out
    assert_ok(alice.run("share", "/Projects", dave.username, "--read-only"))
    return alice, bob, carol, dave


def _download(machine, remote: str, tmp_path: Path) -> bytes:
    dest = tmp_path / f"dl-{uuid4().hex[:6]}"
    assert_ok(machine.run("download", remote, "-o", str(dest)))
    return dest.read_bytes()


def test_members_read_write_and_rename_and_the_server_enforces_who_may(server, people, tmp_path):
    alice, bob, carol, dave = people
    folder = f"/Shared/{alice.username}/Projects"
    # bob reads, writes and renames, with the same commands as for his own files
    assert ls_names(bob, "/") == ["Shared/"]
    assert ls_names(bob, folder) == ["plan.txt", "sub/"]
    assert _download(bob, f"{folder}/plan.txt", tmp_path) == SECRET
    (tmp_path / "from-bob.txt").write_bytes(b"bob was here\n")
    assert_ok(bob.run("upload", str(tmp_path / "from-bob.txt"), "--to", f"{folder}/sub"))
    assert_ok(bob.run("mv", f"{folder}/plan.txt", f"{folder}/sub/plan-v1.txt"))
    assert_ok(bob.run("mkdir", f"{folder}/bob-made"))
    # ... and alice sees it all in her own tree
    assert ls_names(alice, "/Projects") == ["bob-made/", "sub/"]
    assert ls_names(alice, "/Projects/sub") == ["big.bin", "from-bob.txt", "plan-v1.txt"]
    assert _download(alice, "/Projects/sub/from-bob.txt", tmp_path) == b"bob was here\n"
    assert "shared with you:\n  /Shared/" in bob.run("shares").stdout
    listed = alice.run("shares").stdout
    assert f"{bob.username} (read-write)" in listed and f"{dave.username} (read-only)" in listed

    # nothing moves in or out (a copy does): one clear line, errno EXDEV behind it
    assert_cli_error(alice.run("mv", "/Private/diary.txt", "/Projects/diary.txt", check=False), "copy it")
    assert_cli_error(bob.run("mv", f"{folder}/sub/from-bob.txt", "/mine.txt", check=False), "copy it")

    # dave reads, and his client refuses to write ...
    assert _download(dave, f"{folder}/sub/from-bob.txt", tmp_path) == b"bob was here\n"
    assert_cli_error(dave.run("upload", str(tmp_path / "from-bob.txt"), "--to", folder, check=False),
                     "read-only")
    # ... and so does the server, to a client that skips that check
    share = share_of(server, alice)
    vault = open_vault(LocalState(dave.home))
    try:
        mine = vault.domains.shares[UUID(share["id"])]
        mine.read_only = False
        root = vault.get(mine.root)
        with pytest.raises(ServerError) as refused:
            vault.apply([vault.op_setmeta(root.id, root.version, root.attrs.evolve(mode=0o40777))])
        assert refused.value.code == "read_only" and refused.value.errno == 13       # EACCES
    finally:
        vault.ledger.close()
    with api(server, dave, share["id"]) as c:
        r = c.put(f"/blobs/{share['root']}/{uuid4()}", content=b"x" * 100)
        assert (r.status_code, r.json()["code"]) == (403, "read_only")

    # carol, not a member, gets 404 for everything in it, with or without the share's id
    inodes = [i for (i,) in server.query("SELECT id FROM inodes WHERE share_id = ? ORDER BY is_dir", share["id"])]
    blobs = server.query("SELECT b.inode, b.blob_id FROM blobs b JOIN inodes i ON i.user_id = b.user_id"
                         " AND i.id = b.inode WHERE i.share_id = ?", share["id"])
    assert len(inodes) >= 6 and len(blobs) >= 2
    for header in (share["id"], None):
        with api(server, carol, header) as c:
            for ino in inodes:
                for path in (f"/fs/inodes/{ino}", f"/fs/dirs/{ino}/entries", f"/fs/inodes/{ino}/key"):
                    r = c.get(path)
                    assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
            for ino, blob in blobs:
                assert c.get(f"/blobs/{ino}/{blob}").status_code == 404
            r = c.post("/fs/ops", json={"ops": [{"op": "setmeta", "inode": share["root"], "base_version": 1,
                                                 "meta": "AAAA"}]})
            assert r.status_code == 404, r.text
            r = c.post("/fs/listings", json={"dirs": inodes})
            assert r.status_code == 404 if header else r.json()["listings"] == []
        with api(server, carol, share["id"]) as c:
            assert c.get("/fs/changes").status_code == 404

    # bob, a member, reaches nothing of alice's outside the share through it
    private = [i for (i,) in server.query("SELECT i.id FROM inodes i JOIN users u ON u.id = i.user_id"
                                          " WHERE u.username = ? AND i.share_id IS NULL", alice.username)]
    assert len(private) >= 3
    with api(server, bob, share["id"]) as c:
        for ino in private:
            assert c.get(f"/fs/inodes/{ino}").status_code == 404
            assert c.get(f"/fs/dirs/{ino}/entries").status_code == 404
        r = c.post("/fs/ops", json={"ops": [{"op": "link", "inode": inodes[0], "parent": private[0],
                                             "name_hash": "0" * 64, "name": "AAAA"}]})
        assert r.status_code == 404, r.text
    # and the owner's own client cannot move an entry across either: the server says so
    (parent, name_hash) = server.query(
        "SELECT d.parent, d.name_hash FROM dentries d JOIN inodes i ON i.user_id = d.user_id"
        " AND i.id = d.inode WHERE i.share_id IS NULL AND d.is_dir = 0")[0]
    with api(server, alice) as c:
        r = c.post("/fs/ops", json={"ops": [{"op": "rename", "src_parent": parent, "src_hash": name_hash,
                                             "dst_parent": share["root"], "dst_hash": "1" * 64,
                                             "dst_name": "AAAA"}]})
        assert (r.status_code, r.json()["code"]) == (409, "cross_share"), r.text


def test_unshare_removes_at_once_and_nothing_stored_after_opens_with_the_removed_keys(server, people, tmp_path):
    alice, bob, _carol, dave = people
    share = share_of(server, alice)
    folder = f"/Shared/{alice.username}/Projects"
    old = member_keys(bob)                       # everything bob ever held
    assert len(old["files"]) == 2
    before, hashes_before = stored_tokens(server), name_hashes(server)

    out = alice.run("unshare", "/Projects", bob.username).stdout
    assert "keys rotated to generation 2" in out, out
    # bob: refused by the server at once, and the folder is gone from his view
    with api(server, bob, share["id"]) as c:
        for path in (f"/fs/inodes/{share['root']}", f"/fs/dirs/{share['root']}/entries", "/fs/changes"):
            assert c.get(path).status_code == 404, path
    assert ls_names(bob, "/") == []
    assert "no such file" in error_line(bob.run("ls", folder, check=False))
    assert_cli_error(alice.run("unshare", "/Projects", bob.username, check=False), "not a member")

    # the others go on: new files, new versions, renames, folders, by the owner and a member
    (tmp_path / "after.txt").write_bytes(b"written after bob left\n")
    (tmp_path / "plan.txt").write_bytes(b"the plans, version 2\n")
    assert_ok(alice.run("upload", str(tmp_path / "after.txt"), "--to", "/Projects"))
    assert_ok(alice.run("upload", str(tmp_path / "plan.txt"), "--to", "/Projects"))      # a new version
    assert_ok(alice.run("mkdir", "/Projects/later"))
    assert_ok(alice.run("mv", "/Projects/sub/big.bin", "/Projects/later/big.bin"))
    assert _download(dave, f"{folder}/plan.txt", tmp_path) == b"the plans, version 2\n"
    assert _download(dave, f"{folder}/later/big.bin", tmp_path) == \
        (tmp_path / "Projects" / "sub" / "big.bin").read_bytes()
    assert_ok(alice.run("share", "/Projects", bob.username))      # and back again: generation 2 is his now
    assert _download(bob, f"{folder}/after.txt", tmp_path) == b"written after bob left\n"
    assert_ok(alice.run("unshare", "/Projects", bob.username))     # gone once more: generation 3

    new = stored_tokens(server) - before
    assert len(new) > 10
    assert_nothing_opens(new, old, name_hashes(server) - hashes_before,
                         ["after.txt", "plan.txt", "later", "big.bin", "sub", "Projects"])
    # ... unlike what he could read before (the scan would say so): old content keeps its key
    with pytest.raises(AssertionError, match="opens a record"):
        assert_nothing_opens(stored_tokens(server), old)
    # --reencrypt: existing content too (resumable: bob is no member now, the old keys go)
    out = alice.run("unshare", "/Projects", bob.username, "--reencrypt").stdout
    assert "files (" in out and "re-encrypted" in out, out
    assert server.query("SELECT DISTINCT gen FROM share_grants WHERE share_id = ?", share["id"]) == [(3,)]
    assert_nothing_opens(stored_tokens(server), old)
    assert _download(dave, f"{folder}/later/big.bin", tmp_path) == \
        (tmp_path / "Projects" / "sub" / "big.bin").read_bytes()
    assert _download(alice, "/Projects/plan.txt", tmp_path) == b"the plans, version 2\n"


def _registered_behind(proxy, machine):
    """``machine`` registered through ``proxy`` (a lying server in front of the real one)."""
    machine.server_url = proxy.url
    return proxy, machine.register()


@pytest.mark.slow
def test_a_server_that_swaps_a_public_key_is_refused(server, make_machine, lying_proxy, tmp_path):
    proxy, alice = _registered_behind(lying_proxy(server), make_machine(server))
    bob = make_machine(server).register()
    for name in ("A", "B", "C"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_bytes(name.encode())
        assert_ok(alice.run("upload", "-r", str(tmp_path / name)))
    real = bob.run("whoami").stdout.split("fingerprint: ")[1].strip()
    mallory = base64.b64encode(IdentityKey.generate().public).decode()
    swap = proxy.lie("GET", rf"/users/{bob.username}/public-key",
                     lambda body, req: body | {"public_key": mallory})
    # checked out of band: the fingerprint bob reads out is not the key the server gives
    line = error_line(alice.run("share", "/A", bob.username, "--fingerprint", real, check=False))
    assert "fingerprint" in line and "refusing" in line, line
    # pinned on first use, then swapped: refused
    proxy.honest()
    assert_ok(alice.run("share", "/A", bob.username))
    proxy.rules.append(swap)
    line = error_line(alice.run("share", "/B", bob.username, check=False))
    assert "another public key" in line and "refusing" in line, line
    # nothing was shared with the swapped key: no share of /B, and no grant but for real keys
    assert ls_names(bob, f"/Shared/{alice.username}") == ["A/"]
    assert not proxy.requests("POST", r"/shares/[^/]+/members")[1:]
    # with the right fingerprint, a server that tells the truth again is believed
    proxy.honest()
    assert_ok(alice.run("share", "/C", bob.username, "--fingerprint", real))
    assert ls_names(bob, f"/Shared/{alice.username}") == ["A/", "C/"]

    # a server that slips a member into the list it gives the owner (carol: a real user whose
    # key alice has pinned) would be granted the next generation at an unshare: refused
    carol = make_machine(server).register()
    assert_ok(alice.run("share", "/B", carol.username))
    carol_key = {"username": carol.username, "read_only": False,
                 "public_key": server.query("SELECT identity_public FROM users WHERE username = ?", carol.username)[0][0]}

    def slip_in(body, _req):
        for share in body["shares"]:
            if all(m["username"] != carol.username for m in share["members"]):
                share["members"].append(carol_key)
        return body
    proxy.lie("GET", "/shares", slip_in)
    line = error_line(alice.run("unshare", "/A", bob.username, check=False))
    assert "refusing to change shares" in line and "list of members" in line, line
    assert not proxy.requests("POST", r"/shares/[^/]+/generations")
    assert "list of members is not the one this account made" in alice.run("shares").stderr
    proxy.honest()
    assert_ok(alice.run("unshare", "/A", bob.username))
    assert ls_names(carol, f"/Shared/{alice.username}") == ["B/"]


def _fingerprint(machine) -> str:
    out = machine.run("whoami").stdout
    assert out.startswith(f"{machine.username} on "), out
    return out.split("fingerprint: ")[1].strip()


def test_identity_keys_whoami_and_trust_on_first_use(server, make_machine, tmp_path):
    alice, bob, carol = (make_machine(server).register() for _ in range(3))
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_bytes(name.encode())
        assert_ok(alice.run("upload", "-r", str(tmp_path / name)))
    # every account has a key pair from registration; whoami shows its fingerprint
    bob_print = _fingerprint(bob)
    assert len(bob_print.split()) == 6 and bob_print != _fingerprint(alice)
    # an account from before sharing (no identity key yet) cannot be shared with ...
    server.query("UPDATE users SET identity_public = NULL, identity_private = NULL, identity_gen = NULL"
                 " WHERE username = ?", carol.username)
    assert_cli_error(alice.run("share", "/A", carol.username, check=False), "has not logged in")
    # ... until its next login makes one
    carol.login()
    carol_print = _fingerprint(carol)
    out = alice.run("share", "/A", carol.username).stdout
    assert f"{carol.username}'s key fingerprint: {carol_print} (pinned now" in out, out
    # the first share pins bob's key in alice's $ZKFS_HOME: the fingerprint she is shown is bob's
    out = alice.run("share", "/A", bob.username).stdout
    assert f"{bob.username}'s key fingerprint: {bob_print}" in out, out
    pins = json.loads((alice.home / "pinned_keys.json").read_text())
    (pinned,) = pins.values()
    assert set(pinned) == {bob.username.lower(), carol.username.lower()}
    # pinned: the next share says nothing more about it
    assert "fingerprint" not in alice.run("share", "/B", bob.username).stdout
    # a rotate-key re-wraps the private half: the key pair, and so the fingerprint, stay
    assert_ok(bob.run("rotate-key", "--password-stdin", input=f"{bob.password}\n"))
    assert _fingerprint(bob) == bob_print
    assert ls_names(bob, f"/Shared/{alice.username}") == ["A/", "B/"]
    # and the server keeps a published public key: another one is refused
    record = {"public_key": base64.b64encode(IdentityKey.generate().public).decode(), "wrapped_private": "AAAA",
              "gen": 1}
    with api(server, bob) as c:
        r = c.put("/account/identity", json=record)
        assert (r.status_code, r.json()["code"]) == (409, "conflict"), r.text


@pytest.mark.slow
def test_unshare_reencrypt_resumes_after_an_interruption(server, make_machine, lying_proxy, tmp_path):
    proxy, alice = _registered_behind(lying_proxy(server), make_machine(server))
    bob, dave = make_machine(server).register(), make_machine(server).register()
    src = tmp_path / "Projects"
    src.mkdir()
    contents = {f"f{i}.bin": os.urandom(70_000 + i) for i in range(4)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    assert_ok(alice.run("upload", "-r", str(src)))
    for member in (bob, dave):
        assert_ok(alice.run("share", "/Projects", member.username))
    old = member_keys(bob)
    share = share_of(server, alice)
    # the answer to the second re-encrypted file's commit is lost (the server applied it)
    commits = []

    def second_new_key(req) -> bool:
        if any(op["op"] == "commit" and op.get("wrapped_key") for op in req.json()["ops"]):
            commits.append(req)
        return len(commits) == 2
    proxy.lie("POST", "/fs/ops", truncate=True, times=1, when=second_new_key)
    assert_cli_error(alice.run("unshare", "/Projects", bob.username, "--reencrypt", check=False))
    assert len(server.query("SELECT DISTINCT gen FROM share_grants WHERE share_id = ?", share["id"])) == 2
    proxy.honest()
    # run again: what is left is read from the server's records, and it finishes
    out = alice.run("unshare", "/Projects", bob.username, "--reencrypt").stdout
    assert "re-encrypted" in out, out
    assert server.query("SELECT DISTINCT gen FROM share_grants WHERE share_id = ?", share["id"]) == [(2,)]
    assert_nothing_opens(stored_tokens(server), old)
    for name, data in contents.items():
        assert _download(dave, f"/Shared/{alice.username}/Projects/{name}", tmp_path) == data


def test_a_client_holding_the_old_generation_follows_an_unshare_made_elsewhere(server, people):
    """A running client (a mount's vault) of the owner and of a member that stays,
    with the share's keys as they were: after an unshare elsewhere re-sealed the
    folder under a new generation, what they read still opens (they load the
    share's keys again), instead of failing verification."""
    alice, bob, _carol, dave = people
    vaults = [open_vault(LocalState(m.home)) for m in (alice, dave)]
    try:
        before = [sorted(n for n, _ in v.listdir(next(iter(v.domains.shares.values())).root)) for v in vaults]
        assert before[0] == before[1] == ["plan.txt", "sub"]
        assert_ok(alice.run("unshare", "/Projects", bob.username))
        for v in vaults:
            share = next(iter(v.domains.shares.values()))
            assert share.current_gen == 1                      # as loaded before the unshare
            assert sorted(n for n, _ in v.listdir(share.root)) == ["plan.txt", "sub"]
            assert next(iter(v.domains.shares.values())).current_gen == 2
    finally:
        for v in vaults:
            v.ledger.close()
