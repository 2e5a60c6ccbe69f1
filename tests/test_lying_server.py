"""A server that lies in its *answers* (docs/THREAT_MODEL.md §3, column "lie in an
answer"), against the real client: the real server behind tests/lying_proxy.py,
which rewrites what the server says and records what it received.

One server and one account serve the module where the lies allow it (every
derivation costs the floor's Argon2id, ~0.25 s here); tests that need a fresh
account or server make their own.
"""
from __future__ import annotations

import base64
import json
import re
import sqlite3
import uuid

import pytest

from apiuser import ApiUser, b64, register_body
from harness import Machine, Mount
from hostile import error_line
from lying_proxy import add_entry, drop_entry

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def owner(shared_server, tmp_path_factory) -> Machine:
    """The module's account, registered and logged in directly (no proxy)."""
    return Machine(tmp_path_factory.mktemp("owner"), shared_server.url).register()


def _via(proxy, tmp_path_factory, username: str | None = None) -> Machine:
    m = Machine(tmp_path_factory.mktemp("via-proxy"), proxy.url)
    m.username = username
    return m


def _no_secret_sent(proxy) -> None:
    """Nothing derived from the password reached the (lying) server: no login, no
    password change, no request carrying an auth key."""
    sent = [r for r in proxy.received if r.path in ("/auth/login", "/account/password", "/users")
            or b"auth_key" in r.body]
    assert not sent, [(r.method, r.path) for r in sent]


# ================================================================ KDF downgrade
WEAK = {
    "memory 8 KiB": {"memory_kib": 8},
    "memory 8 MiB": {"memory_kib": 8192},
    "one pass": {"iterations": 1},
    "3-byte salt": {"salt": base64.b64encode(b"abc").decode()},
    "64 lanes": {"lanes": 64},
    "absurd memory (the client's RAM)": {"memory_kib": 64 * 1024 * 1024},
}


def test_weak_kdf_parameters_are_refused_before_anything_is_derived(owner, lying_proxy, tmp_path_factory):
    """A fresh machine whose server serves weak Argon2id parameters (as the issue's
    attack did: m=8 KiB, t=1, a fixed 3-byte salt) logs in with nothing derived from
    the password leaving it: the proxy sees the KDF lookup and nothing else."""
    proxy = lying_proxy(owner.server_url)
    for what, change in WEAK.items():
        proxy.honest()
        proxy.received.clear()
        proxy.lie("GET", "/auth/kdf", lambda body, req, change=change: {"kdf": body["kdf"] | change})
        fresh = _via(proxy, tmp_path_factory)
        line = error_line(fresh.login(owner.username, owner.password, check=False))
        assert "refusing to hash the password" in line and "nothing was sent" in line, (what, line)
        assert [(r.method, r.path) for r in proxy.received] == [("GET", "/auth/kdf")], what
        assert not (fresh.home / "keys.json").exists()


def test_other_salt_or_parameters_above_the_floor_fail_the_check(owner, lying_proxy, tmp_path_factory):
    """Above the floor, the parameters must be the account's own: another salt (a
    fixed one would let a server precompute guesses for every user at once) or
    other parameters fail the account's kdf check before the auth key is sent."""
    proxy = lying_proxy(owner.server_url)
    for change in ({"salt": base64.b64encode(bytes(16)).decode()}, {"iterations": 4},
                   {"memory_kib": 2 * 65536}, {"lanes": 1}):
        proxy.honest()
        proxy.received.clear()
        proxy.lie("GET", "/auth/kdf", lambda body, req, change=change: {"kdf": body["kdf"] | change})
        fresh = _via(proxy, tmp_path_factory)
        line = error_line(fresh.login(owner.username, owner.password, check=False))
        assert "wrong username or password" in line, (change, line)
        _no_secret_sent(proxy)
    # the honest answer logs in through the same proxy
    proxy.honest()
    fresh = _via(proxy, tmp_path_factory)
    fresh.login(owner.username, owner.password)


def test_every_path_that_derives_refuses_weak_parameters(owner, lying_proxy, tmp_path_factory, tmp_path):
    """passwd, rotate-key and mount.py --password-file derive keys from a password
    too: each refuses the weak parameters with one line and sends nothing derived."""
    proxy = lying_proxy(owner.server_url)
    m = _via(proxy, tmp_path_factory, owner.username)
    m.login(owner.username, owner.password)                  # honest so far
    proxy.lie("GET", "/auth/kdf", lambda body, req: {"kdf": body["kdf"] | {"memory_kib": 8, "iterations": 1}})
    proxy.received.clear()
    pw = owner.password + "\n"
    for args, stdin in ((("passwd", "--password-stdin"), pw + "new password 789\n"),
                        (("rotate-key", "--password-stdin"), pw)):
        line = error_line(m.run(*args, input=stdin, check=False))
        assert "refusing to hash the password" in line, (args, line)
    (tmp_path / "pw").write_text(owner.password + "\n")
    mount = Mount(m, tmp_path / "mnt", ["--password-file", str(tmp_path / "pw")])
    try:
        proc = mount._mount_py(str(mount.path), *mount.extra, check=False)
    finally:
        mount.cleanup()
    assert proc.returncode != 0 and "refusing to hash the password" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    _no_secret_sent(proxy)


def test_server_refuses_weak_parameters_and_the_test_knob_cannot_weaken(owner, shared_server, tmp_path_factory):
    """The server refuses registrations and password changes below the floor or
    without a check; ZKFS_KDF_MEMORY_KIB (the tests' old way to cheapen accounts)
    has no effect: a new account gets the floor."""
    c = shared_server.client()
    for bad in ({"memory_kib": 8192}, {"iterations": 1}, {"salt": b64(3)}, {"lanes": 64}, {"check": None}):
        body = register_body("w" + uuid.uuid4().hex[:10], b64(32), uuid.uuid4())
        body["kdf"] = body["kdf"] | bad
        r = c.post("/users", json=body)
        assert r.status_code == 422, (bad, r.text)
        user = ApiUser(shared_server)
        r = user.c.put("/account/password", json={
            "current_auth_key": user.auth_key, "new_auth_key": b64(32),
            "new_kdf": user.kdf | bad, "master_keys": []})
        assert r.status_code == 422, (bad, r.text)
    m = Machine(tmp_path_factory.mktemp("knob"), shared_server.url)
    env = m.env
    m.env = lambda: env() | {"ZKFS_KDF_MEMORY_KIB": "8192"}
    m.register()
    kdf = c.get("/auth/kdf", params={"username": m.username}).json()["kdf"]
    assert (kdf["memory_kib"], kdf["iterations"]) == (65536, 3) and len(base64.b64decode(kdf["salt"])) == 16


def test_accounts_from_before_the_check_get_one_at_their_next_login(shared_server, tmp_path_factory, lying_proxy):
    """An account made before kdf checks (its stored parameters have none) keeps
    working; its next login adds the check, after which a server that swaps the
    salt is caught. Before that, the migration window: such a swap is not."""
    m = Machine(tmp_path_factory.mktemp("legacy"), shared_server.url).register()
    db = sqlite3.connect(shared_server.data_dir / "app.db", timeout=30)
    try:
        kdf = json.loads(db.execute("SELECT kdf_json FROM users WHERE username = ?", (m.username,)).fetchone()[0])
        db.execute("UPDATE users SET kdf_json = ? WHERE username = ?",
                   (json.dumps(kdf | {"check": None}), m.username))
        db.commit()
        fresh = Machine(tmp_path_factory.mktemp("legacy-2"), shared_server.url)
        fresh.login(m.username, m.password)
        stored = json.loads(db.execute("SELECT kdf_json FROM users WHERE username = ?",
                                       (m.username,)).fetchone()[0])
    finally:
        db.close()
    assert stored == kdf, "the login put back the check the client computes"
    proxy = lying_proxy(shared_server)
    proxy.lie("GET", "/auth/kdf", lambda body, req: {"kdf": body["kdf"] | {"salt": base64.b64encode(bytes(16)).decode()}})
    line = error_line(_via(proxy, tmp_path_factory).login(m.username, m.password, check=False))
    assert "wrong username or password" in line
    _no_secret_sent(proxy)


# ================================================================ seal times
def test_nothing_the_server_stores_carries_a_seal_time(owner, shared_server, tmp_path):
    """Every Fernet token has an 8-byte timestamp in clear: the client writes a
    constant there, so the server cannot read when each key, name, attribute set,
    manifest or chunk segment was sealed (mtimes, renames...)."""
    from hostile import HostileServer
    from zkfs.format import segment_token_size, SEGMENT_SIZE
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small.txt").write_text("seal times\n")
    (tmp_path / "d" / "big.bin").write_bytes(bytes(range(256)) * 1200)      # 300 KiB: a stored blob
    owner.run("upload", "-r", str(tmp_path / "d"), "--to", "/seal")
    hs = HostileServer(shared_server.data_dir, owner.username)
    try:
        tokens = []
        for row in hs.db.execute("SELECT wrapped_master, wrapped_namespace FROM master_keys WHERE user_id = ?",
                                 (hs.user_id,)):
            tokens += [base64.b64decode(v) for v in row]
        for row in hs.db.execute("SELECT meta, manifest FROM inodes WHERE user_id = ?", (hs.user_id,)):
            tokens += [base64.b64decode(v) for v in row if v]
        tokens += [base64.b64decode(r[0]) for r in hs.db.execute(
            "SELECT name FROM dentries WHERE user_id = ?", (hs.user_id,))]
        store = shared_server.data_dir / "storage" / hs.user_id
        full = segment_token_size(SEGMENT_SIZE)
        for path in store.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                tokens += [data[i:i + full] for i in range(0, len(data), full)]   # one per segment
        assert len(tokens) > 10
        assert {t[1:9] for t in tokens} == {bytes(8)}, "a token carries its seal time"
    finally:
        hs.close()


# ================================================================ acknowledged versions
def _under_report(body, req):
    """/fs/ops answered with every version one lower than the one written."""
    for res in body["results"]:
        if res.get("version"):
            res["version"] -= 1
    return body


def _ledger(machine: Machine, inode) -> int | None:
    db = sqlite3.connect(machine.home / "versions.db")
    try:
        row = db.execute("SELECT version FROM versions WHERE inode = ?", (inode.bytes,)).fetchone()
    finally:
        db.close()
    return row[0] if row else None


def test_an_under_reported_version_is_an_error_and_no_rollback_window(owner, shared_server, lying_proxy,
                                                                      tmp_path_factory, tmp_path):
    """The issue's rollback: after a commit, the client recorded the version the
    server *reported*. Under-reporting it, the server could later serve the version
    before, and `download` took it. Now the answer that disagrees with what the
    client wrote is one error line, the ledger holds the written version, and the
    old version served later is refused as a rollback."""
    from hostile import HostileServer, uploads
    proxy = lying_proxy(shared_server)
    m = _via(proxy, tmp_path_factory)
    m.login(owner.username, owner.password)
    src = tmp_path / "ack.txt"
    src.write_text("version one\n")
    m.run("upload", str(src), "--to", "/ack")
    inode = uploads(m)["/ack/ack.txt"]
    hs = HostileServer(shared_server.data_dir, owner.username)
    try:
        before = hs.snapshot(inode)
        proxy.lie("POST", "/fs/ops", _under_report)
        src.write_text("version two, acknowledged as one\n")
        line = error_line(m.run("upload", str(src), "--to", "/ack", check=False))
        assert f"acknowledged version {before.row['version']} of inode {inode}" in line, line
        assert _ledger(m, inode) == before.row["version"] + 1
        proxy.honest()
        hs.restore(before)                      # the server serves the version before
        out = tmp_path / "out"
        line = error_line(m.run("download", "/ack/ack.txt", "-o", str(out), check=False))
        assert f"rolled inode {inode} back" in line, line
        assert not out.exists()
    finally:
        hs.close()


def test_an_under_reported_version_through_the_mount_is_eio(owner, shared_server, lying_proxy,
                                                            tmp_path_factory, make_mount):
    """The mount commits through the same check: fsync of a file whose commit is
    acknowledged with another version fails with EIO, and the ledger keeps the
    version written."""
    import errno
    import os
    from hostile import HostileServer
    proxy = lying_proxy(shared_server)
    m = _via(proxy, tmp_path_factory)
    m.login(owner.username, owner.password)
    mount = make_mount(m)
    path = mount.path / "mount-ack.txt"
    path.write_text("one\n")
    mount.settle()
    hs = HostileServer(shared_server.data_dir, owner.username)
    try:
        entry = hs.db.execute("SELECT inode FROM dentries d JOIN inodes i ON i.id = d.inode AND i.user_id = d.user_id"
                              " WHERE d.user_id = ? ORDER BY i.changed_seq DESC LIMIT 1", (hs.user_id,)).fetchone()
        inode = uuid.UUID(entry[0])
        version = hs.inode(inode)["version"]
        proxy.lie("POST", "/fs/ops", _under_report)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b"two\n")
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
        finally:
            proxy.honest()
            try:
                os.close(fd)
            except OSError:
                pass
        assert hs.inode(inode)["version"] == version + 1
        assert _ledger(m, inode) == version + 1
    finally:
        hs.close()


# ================================================================ setuid, setgid, devices
def test_download_drops_setuid_and_setgid_and_mounts_are_nosuid_nodev(owner, make_mount, tmp_path):
    """A file stored as setuid/setgid (shared with you, or written by anyone who
    ever held a key) downloads with its permission bits only, as cp and tar do
    without -p; a mount is nosuid,nodev, so the stored modes and device numbers
    never act as such on this machine."""
    import os
    import stat
    src = tmp_path / "suid.sh"
    src.write_text("#!/bin/sh\nid\n")
    os.chmod(src, 0o6755 | stat.S_ISVTX)
    owner.run("upload", str(src), "--to", "/suid")
    out = tmp_path / "out"
    owner.run("download", "/suid/suid.sh", "-o", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    mount = make_mount(owner)
    assert stat.S_IMODE((mount.path / "suid" / "suid.sh").stat().st_mode) & stat.S_ISUID   # stored as such
    with open("/proc/mounts") as f:
        options = next(line.split()[3] for line in f if line.split()[1] == os.path.realpath(mount.path))
    assert {"nosuid", "nodev"} <= set(options.split(",")), options


# ================================================================ plain http
def _non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if any."""
    import ipaddress
    import socket
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.200", 9))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def test_plain_http_to_a_remote_host_needs_insecure_http(owner, shared_server, lying_proxy,
                                                         tmp_path_factory, tmp_path):
    """http:// to anything but this machine is refused with one line, before any
    connection (the auth key and the token would cross the network in clear, and
    anyone on the path could lie like a server); --insecure-http allows it, and
    `login` saves that choice for the commands and mounts that follow."""
    remote = "http://192.0.2.254:9"          # TEST-NET: refused before anything is tried
    m = Machine(tmp_path_factory.mktemp("http"), remote)
    for args in (("register", "someone", "--server", remote, "--password-stdin"),
                 ("login", "someone", "--server", remote, "--password-stdin")):
        line = error_line(m.run(*args, input="long enough password\n", check=False))
        assert "refusing plain http:// to 192.0.2.254" in line and "--insecure-http" in line, line
    (m.home / "config.json").write_text(json.dumps({"server": remote, "token": "t"}))
    assert "refusing plain http://" in error_line(m.run("ls", check=False))
    mount = Mount(m, tmp_path / "mnt", [])
    proc = mount._mount_py(str(mount.path), check=False)
    assert proc.returncode != 0 and "refusing plain http://" in proc.stderr, proc.stderr

    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback address on this machine for the --insecure-http half")
    proxy = lying_proxy(shared_server, host=addr)      # the real server, reached over the network
    m = Machine(tmp_path_factory.mktemp("http-ok"), proxy.url)
    assert "refusing plain http://" in error_line(m.login(owner.username, owner.password, check=False))
    m.run("login", owner.username, "--server", proxy.url, "--password-stdin", "--insecure-http",
          input=owner.password + "\n")
    m.run("ls")                                        # the saved choice
    assert json.loads((m.home / "config.json").read_text())["insecure_http"] is True


# ================================================================ key generations
def test_a_retired_key_generation_is_refused_by_a_fresh_process_and_mount(owner, shared_server, lying_proxy,
                                                                           tmp_path_factory, tmp_path):
    """After a rotate-key, a server that kept the retired master key record serves
    the account as it was (current_gen and keys of the old generation): new file
    keys would be wrapped under a retired, perhaps leaked, key. A machine that has
    seen the new generation keeps it as a floor in $ZKFS_HOME: every command and
    a new mount refuse the old one (before, only a running process did)."""
    proxy = lying_proxy(shared_server)
    m = _via(proxy, tmp_path_factory)
    m.login(owner.username, owner.password)
    token = json.loads((m.home / "config.json").read_text())["token"]
    old = shared_server.client().get("/account", headers={"Authorization": f"Bearer {token}"}).json()
    owner.run("rotate-key", "--password-stdin", input=owner.password + "\n")
    m.run("ls")                                          # this machine sees the new generation
    proxy.lie("GET", "/account", lambda body, req: old)
    proxy.lie("GET", "/fs/changes", lambda body, req: body | {"key_gen": old["current_gen"]})
    why = (f"the server rolled the master key back from generation {old['current_gen'] + 1} "
           f"to {old['current_gen']}")
    assert why in error_line(m.run("ls", check=False))
    mount = Mount(m, tmp_path / "mnt", [])
    try:
        proc = mount._mount_py(str(mount.path), check=False)
    finally:
        mount.cleanup()
    assert proc.returncode != 0 and why in proc.stderr, proc.stderr
    # a fresh machine has no floor: it cannot tell (documented)
    fresh = _via(proxy, tmp_path_factory)
    fresh.login(owner.username, owner.password)


# ================================================================ change feed, ranges, bodies
def test_an_old_change_feed_position_is_refused_by_the_mount(owner, shared_server, lying_proxy,
                                                             tmp_path_factory, make_mount):
    """The account's change counter only grows: a feed that answers with a position
    older than one the mount has seen (its own ops' included) is a replayed state,
    logged as an integrity failure rather than taken as the new starting point."""
    from hostile import log_lines, mount_log
    from mount_helpers import wait_until
    proxy = lying_proxy(shared_server)
    m = _via(proxy, tmp_path_factory)
    m.login(owner.username, owner.password)
    mount = make_mount(m)
    (mount.path / "feed.txt").write_text("an op of our own\n")
    proxy.lie("GET", "/fs/changes", lambda body, req: body | {"seq": body["seq"] - 1, "inodes": [], "seqs": []})
    wait_until(lambda: log_lines(mount_log(mount), "integrity check failed", "change feed went back"), 10,
               what="the refused feed position in the mount's log")


def _other_segments(shared_server):
    """Rewrites a Range answer (a run of 64 KiB segments of a chunk) into as many
    bytes of the same blob from another position: valid tokens under the same key."""
    from zkfs.format import SEGMENT_SIZE, segment_token_size
    full = segment_token_size(SEGMENT_SIZE)

    def rewrite(data: bytes, req) -> bytes:
        whole = shared_server.client().get(req.path, headers={"Authorization": req.headers["authorization"]}).content
        start = 0 if not whole.startswith(data) else full
        return whole[start:start + len(data)]
    return rewrite


def test_range_answers_with_other_bytes_and_truncated_bodies(owner, shared_server, lying_proxy,
                                                             tmp_path_factory, make_mount, tmp_path):
    """A random read through the mount fetches single segments by Range: another
    segment of the same chunk served instead is EIO (never its bytes). A body cut
    short of its Content-Length is a broken answer: the CLI gives up after its
    retries with one line and writes nothing."""
    import errno
    import os
    from hostile import log_lines, mount_log
    data = os.urandom(300_000)
    (tmp_path / "ranged.bin").write_bytes(data)
    owner.run("upload", str(tmp_path / "ranged.bin"), "--to", "/range")
    proxy = lying_proxy(shared_server)
    m = _via(proxy, tmp_path_factory)
    m.login(owner.username, owner.password)
    mount = make_mount(m)
    path = mount.path / "range" / "ranged.bin"
    proxy.lie("GET", r"/blobs/.*", _other_segments(shared_server), json=False)
    with open(path, "rb") as f:                        # a random read: a Range request
        f.seek(140_000)
        with pytest.raises(OSError) as exc:
            f.read(4096)
    assert exc.value.errno == errno.EIO
    assert log_lines(mount_log(mount), "integrity check failed", "chunk 0 of inode .* failed verification")
    assert any("range" in r.headers for r in proxy.requests("GET", r"/blobs/.*"))
    proxy.honest()
    proxy.lie("GET", r"/blobs/.*", truncate=True)
    out = tmp_path / "out"
    line = error_line(m.run("download", "/range/ranged.bin", "-o", str(out), check=False))
    assert "cannot reach the server" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# ================================================================ listings (rows 40-42)
LISTING = r"/fs/dirs/[^/]+/entries"


@pytest.mark.parametrize("lie", ["hidden", "brought_back", "old_listing"])
def test_listing_lies(owner, lying_proxy, tmp_path_factory, tmp_path, lie):
    """A listing with an entry hidden, with a deleted one brought back, or an old
    listing of a folder this client has seen newer: the folder's sealed entry set
    (or its version) says so, in one line; never a listing the server chose."""
    src = tmp_path / "src"
    src.mkdir()
    for n in ("a.txt", "b.txt", "c.txt"):
        (src / n).write_text(n)
    owner.run("upload", "-r", str(src), "--to", f"/lies-{lie}")
    folder = f"/lies-{lie}/src"
    proxy = lying_proxy(owner.server_url)
    viewer = _via(proxy, tmp_path_factory)
    viewer.login(owner.username, owner.password)
    seen: list[dict] = []
    proxy.lie("GET", LISTING, lambda body, req: seen.append(body) or body)
    viewer.run("ls", folder)                            # honest: the viewer knows the folder now
    before = seen[-1]
    if lie == "hidden":
        rewrite = drop_entry(before["entries"][0]["name_hash"])
        expected = "does not match its sealed entry set"
    elif lie == "brought_back":
        owner.run("rm", f"{folder}/c.txt")
        viewer.run("ls", folder)
        now = {e["name_hash"] for e in seen[-1]["entries"]}
        gone = next(e for e in before["entries"] if e["name_hash"] not in now)
        rewrite = add_entry(gone)
        expected = "does not match its sealed entry set"
    else:
        (src / "d.txt").write_text("d")
        owner.run("upload", str(src / "d.txt"), "--to", folder)
        viewer.run("ls", folder)                        # the viewer saw the newer folder
        rewrite = lambda body, req: before             # noqa: E731
        expected = "rolled inode .* back"
    proxy.honest()
    proxy.lie("GET", f"/fs/dirs/{before['dir']['id']}/entries", rewrite)     # that folder's listings only
    assert re.search(expected, error_line(viewer.run("ls", folder, check=False)))
    assert re.search(expected, error_line(viewer.run("download", f"{folder}/a.txt", "-o", str(tmp_path),
                                                     check=False)))
