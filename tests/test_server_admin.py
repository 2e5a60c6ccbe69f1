"""Server administration and account policy: registration open/invite/closed and
its per-address throttle, `python -m server users ...`, case-insensitive unique
usernames, configuration sources, and versioned schema migrations (an old data
dir is upgraded, wrapped keys move into the database; an unknown schema is
refused)."""
from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import sys
import uuid

import pytest

from apiuser import ApiUser, b64, client, fresh_addr, register_body
from conftest import REPO, ServerProcess

pytestmark = pytest.mark.timeout(180)


def admin(srv: ServerProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "server", *args, "--data-dir", str(srv.data_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def register(srv, username: str, addr: str | None = None, **extra):
    with client(srv, addr or fresh_addr()) as c:
        return c.post("/users", json=register_body(username, b64(32), uuid.uuid4()) | extra)


def test_registration_policies_and_invites(make_server):
    closed = make_server(extra_args=["--registration", "closed"])
    r = register(closed, "u" + uuid.uuid4().hex[:8])
    assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text

    srv = make_server(extra_args=["--registration", "invite"])
    name = "u" + uuid.uuid4().hex[:8]
    assert register(srv, name).status_code == 403
    assert register(srv, name, invite="not-an-invite").status_code == 403
    code = admin(srv, "users", "add-invite").stdout.strip()
    assert len(code) >= 20
    assert register(srv, name, invite=code).status_code == 201
    assert register(srv, name + "x", invite=code).status_code == 403       # single use
    # a registration refused for another reason keeps its invite
    code2 = admin(srv, "users", "add-invite").stdout.strip()
    assert register(srv, name.upper(), invite=code2).status_code == 409    # name taken
    assert register(srv, name + "y", invite=code2).status_code == 201


def test_registration_is_throttled_per_address(make_server):
    srv = make_server(env={"ZKFS_REGISTRATIONS_PER_HOUR": "3"})
    addr = fresh_addr()
    codes = [register(srv, "u" + uuid.uuid4().hex[:8], addr).status_code for _ in range(5)]
    assert codes == [201, 201, 201, 429, 429], codes
    assert register(srv, "u" + uuid.uuid4().hex[:8], fresh_addr()).status_code == 201


def test_usernames_are_case_insensitive_and_unique(shared_server):
    a = ApiUser(shared_server, username="Mixed" + uuid.uuid4().hex[:8])
    r = register(shared_server, a.username.lower())
    assert r.status_code == 409 and r.json()["code"] == "exists", r.text
    with client(shared_server, fresh_addr()) as c:
        assert c.post("/auth/login", json={"username": a.username.upper(),
                                           "auth_key": a.auth_key}).status_code == 200
        real = c.get("/auth/kdf", params={"username": a.username}).json()
        assert c.get("/auth/kdf", params={"username": a.username.swapcase()}).json() == real
        ghost = "Ghost" + uuid.uuid4().hex[:8]
        assert (c.get("/auth/kdf", params={"username": ghost}).json()
                == c.get("/auth/kdf", params={"username": ghost.lower()}).json())


def test_users_command(server):
    a, b = ApiUser(server), ApiUser(server)
    f = a.create(a.root, "f", key=True)
    a.put_blob(f, os.urandom(5000))
    listing = admin(server, "users", "list").stdout
    assert a.username in listing and b.username in listing
    # an account's own quota, then back to the server's default (none)
    assert admin(server, "users", "set-quota", a.username, "6000").returncode == 0
    st = a.c.get("/fs/statfs").json()
    assert st["quota_bytes"] == 6000 and st["used_bytes"] > 5000
    r = a.c.put(f"/blobs/{f}/{uuid.uuid4()}", content=os.urandom(2000))
    assert r.status_code == 507 and r.json()["code"] == "no_space"
    assert b.c.put(f"/blobs/{b.create(b.root, 'g')}/{uuid.uuid4()}", content=os.urandom(2000)).status_code == 201
    admin(server, "users", "set-quota", a.username.upper(), "none")
    assert a.c.get("/fs/statfs").json()["quota_bytes"] is None
    # deleting an account removes its data; bad input is one line
    admin(server, "users", "delete", a.username)
    assert a.c.get("/account").status_code == 401
    assert not (server.data_dir / "storage" / str(a.user_id)).exists()
    assert b.c.get("/account").status_code == 200
    assert "no account named" in one_error_line(admin(server, "users", "delete", "nobody-here", check=False))
    assert "not a number" in one_error_line(admin(server, "users", "set-quota", b.username, "lots",
                                                  check=False))


def test_configuration_file_and_clear_errors(tmp_path):
    data = tmp_path / "data"
    cfg = tmp_path / "zkfs.toml"
    cfg.write_text(f'database = "sqlite://{data}/meta.db"\nblobs = "{data}/chunks"\nquota_bytes = 12345\n')
    srv = ServerProcess(tmp_path / "run", extra_args=["--config", str(cfg)])
    try:
        srv.start()
        a = ApiUser(srv)
        f = a.create(a.root, "f")
        a.put_blob(f, b"x" * 100)
        assert a.c.get("/fs/statfs").json()["quota_bytes"] == 12345
        assert (data / "meta.db").exists() and (data / "chunks" / str(a.user_id)).is_dir()
    finally:
        srv.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text('databse = "x"\n')
    for args, words in [(["--config", str(bad)], "unknown setting(s) databse"),
                        (["--database", "mysql://x/y"], "unsupported database URL"),
                        (["--database", "postgresql://nobody@127.0.0.1:1/x"], "same secret")]:
        proc = subprocess.run([sys.executable, "-m", "server", *args, "--port", "1"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=60)
        assert words in one_error_line(proc), proc.stderr


# The schema and sqlite triggers of the release before versioned migrations.
_LEGACY_TRIGGERS = """
CREATE TRIGGER blobs_usage_add AFTER INSERT ON blobs BEGIN
    UPDATE users SET used_bytes = used_bytes + NEW.size WHERE id = NEW.user_id;
END;
CREATE TRIGGER blobs_usage_del AFTER DELETE ON blobs BEGIN
    UPDATE users SET used_bytes = used_bytes - OLD.size WHERE id = OLD.user_id;
END;
"""


def test_an_old_data_dir_is_upgraded_and_an_unknown_schema_refused(tmp_path):
    from server.migrations import LATEST, V1
    data = tmp_path / "old"
    (data / "storage").mkdir(parents=True)
    conn = sqlite3.connect(data / "app.db")
    conn.executescript(V1 + _LEGACY_TRIGGERS)
    uid, root, f, blob = (str(uuid.uuid4()) for _ in range(4))
    kdf = '{"alg":"argon2id","salt":"AAAAAAAAAAAAAAAAAAAAAA==","memory_kib":65536,"iterations":3,"lanes":4}'
    with conn:
        conn.execute("INSERT INTO users(id, username, auth_hash, kdf_json, current_gen, root_inode, created_at)"
                     " VALUES (?, 'olduser', 'x', ?, 1, ?, 0)", (uid, kdf, root))
        conn.execute("INSERT INTO inodes(user_id, id, is_dir, version, meta) VALUES (?, ?, 1, 1, 'cm9vdA==')",
                     (uid, root))
        conn.execute("INSERT INTO inodes(user_id, id, is_dir, version, meta, manifest, key_gen)"
                     " VALUES (?, ?, 0, 2, 'bWV0YQ==', 'bWFu', 1)", (uid, f))
        conn.execute("INSERT INTO dentries VALUES (?, ?, 'ab', ?, 0, 'bmFtZQ==')", (uid, root, f))
        conn.execute("INSERT INTO blobs VALUES (?, ?, ?, 7, 1, 0)", (uid, f, blob))
    conn.close()
    fdir = data / "storage" / uid / f
    fdir.mkdir(parents=True)
    wrapped = os.urandom(60)
    (fdir / "key").write_bytes(wrapped)
    (fdir / blob).write_bytes(b"chunk!!")

    srv = ServerProcess(data)
    try:
        srv.start()
        assert not (fdir / "key").exists() and (fdir / blob).exists()
    finally:
        srv.stop()
    db = srv.metadata()
    assert db.get_key(uuid.UUID(uid), uuid.UUID(f)) == (1, base64.b64encode(wrapped).decode(), None)
    meta = len("cm9vdA==") + len("bWV0YQ==") + len("bWFu") + len(base64.b64encode(wrapped)) + len("bmFtZQ==")
    assert db.used_bytes(uuid.UUID(uid)) == 7 + meta
    db.close()

    conn = sqlite3.connect(data / "app.db")
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (LATEST + 1,))
    conn.close()
    proc = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(data), "--port", "1"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert "newer than this server knows" in one_error_line(proc)


def test_a_schema_at_version_3_gains_the_links_tables_and_keeps_its_batches(tmp_path):
    # Links came as migration 4, after issue 14's applied_batches (3), and shared folders
    # as 5: a database a server at version 3 made must still get both, its batch answers
    # untouched.
    from server.migrations import MIGRATIONS, migrate, version
    from server.sqldb import SqliteDatabase
    db = SqliteDatabase(tmp_path / "app.db")

    def make_v3(tx):
        for step in MIGRATIONS[:3]:
            step(tx, db.kind, None)
        tx.run("CREATE TABLE schema_version(version INTEGER NOT NULL)")
        tx.run("INSERT INTO schema_version(version) VALUES (3)")
        tx.run("INSERT INTO applied_batches VALUES ('u', 'b', '{}', 0)")
    db.transaction(make_v3)
    assert version(db) == 3
    assert migrate(db) == (3, 5)
    assert db.all("SELECT batch_id, answer FROM applied_batches") == [("b", "{}")]
    assert db.all("SELECT count(*) FROM links") == [(0,)] and db.all("SELECT count(*) FROM link_blobs") == [(0,)]
    assert db.all("SELECT count(*) FROM shares") == [(0,)]
    db.close()
