"""PostgreSQL + S3 (SeaweedFS) deployments: chunk bytes go straight between the
client and the bucket through presigned URLs bound to one user's object and its
size; the API checks at commit what was uploaded; a sweeper that several nodes
may run at once removes what was never committed."""
from __future__ import annotations

import concurrent.futures
import errno
import os
import re
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from apiuser import ApiUser
from clitools import assert_ok, sha256_file, write_random

pytestmark = [pytest.mark.timeout(240)]

CHUNK = 1024 * 1024


@pytest.fixture
def pg_s3_server(make_server, request):
    """A server on PostgreSQL + S3, whatever the module's backend; ``blobs_query``
    is appended to its s3:// URL."""
    def factory(blobs_query: str = "", **kw):
        from conftest import backend_kwargs
        more = backend_kwargs(request, "postgres")
        more["blobs_url"] += blobs_query
        kw["env"] = {**more.pop("env"), **kw.get("env", {})}
        return make_server(**more, **kw)
    return factory


def upload_urls(a: ApiUser, *blobs: tuple) -> httpx.Response:
    return a.c.post("/blobs/upload-urls", json={"blobs": [
        {"inode": str(i), "blob_id": str(b), "size": n} for i, b, n in blobs]})


def upload_url(a: ApiUser, inode, blob, size: int) -> str:
    r = upload_urls(a, (inode, blob, size))
    assert r.status_code == 200, r.text
    return r.json()["urls"][0]["url"]


def with_path(url: str, old: str, new: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.replace(old, new)))


def cli_round_trip(srv, make_machine, tmp_path, size: int) -> str:
    """Upload and download a file with the CLI; returns the server's log."""
    m = make_machine(srv).register()
    src = write_random(tmp_path / "big.bin", size)
    assert_ok(m.run("upload", str(src)))
    out = tmp_path / "back.bin"
    assert_ok(m.run("download", "/big.bin", "-o", str(out)))
    assert sha256_file(out) == sha256_file(src)
    return srv.log_path.read_text()


def test_cli_round_trip_moves_no_chunk_through_the_api(pg_s3_server, make_machine, tmp_path):
    srv = pg_s3_server()
    log = cli_round_trip(srv, make_machine, tmp_path, 3 * CHUNK + 77)
    # the 4 chunks' upload URLs in 1 to 4 requests (parallel uploads ask together)
    assert 1 <= len(re.findall(r'"POST /api/v1/blobs/upload-urls HTTP/1.1" 200', log)) <= 4, log[-3000:]
    # the download asked for the 4 chunks' URLs in one request
    assert len(re.findall(r'"POST /api/v1/blobs/download-urls HTTP/1.1" 200', log)) == 1, log[-3000:]
    assert not re.search(r'"PUT /api/v1/blobs/', log), "a chunk went through the API node"
    assert not re.search(r'"GET /api/v1/blobs/[^ ]+ HTTP/1.1" 20[06]', log)
    # the bucket holds exactly the 4 chunk objects, under ids only
    objects = srv.stored_objects()
    assert len(objects) == 4
    assert all(re.fullmatch(r"[0-9a-f-]{36}/[0-9a-f-]{36}/[0-9a-f-]{36}", o) for o in objects), objects


def test_presigned_urls_are_bound_to_one_users_object_and_size_and_expire(pg_s3_server):
    srv = pg_s3_server(env={"ZKFS_DIRECT_URL_TTL": "2"})
    a, b = ApiUser(srv), ApiUser(srv)
    fa, fb = a.create(a.root, "f"), b.create(b.root, "f")
    ba, bb = uuid.uuid4(), uuid.uuid4()
    data_a, data_b = os.urandom(5000), os.urandom(5000)
    url_a = upload_url(a, fa, ba, len(data_a))
    url_b = upload_url(b, fb, bb, len(data_b))
    raw = httpx.Client(timeout=30)
    # A's URL writes only A's object, only with the declared size
    assert raw.put(url_a, content=data_a[:-1]).status_code == 403
    assert raw.put(url_a, content=data_a + b"x").status_code == 403
    assert raw.put(with_path(url_a, f"{a.user_id}/{fa}/{ba}", f"{b.user_id}/{fb}/{bb}"),
                   content=data_a).status_code == 403
    assert raw.put(url_a, content=data_a).status_code == 200
    assert raw.put(url_b, content=data_b).status_code == 200
    assert a.commit(fa, [ba]).status_code == 200 and b.commit(fb, [bb]).status_code == 200
    # URLs handed out in a batch are for the user's own existing blobs only
    r = b.c.post("/blobs/download-urls", json={"blobs": [{"inode": str(fa), "blob_id": str(ba)},
                                                         {"inode": str(fb), "blob_id": str(bb)}]})
    assert r.status_code == 200 and [u["blob_id"] for u in r.json()["urls"]] == [str(bb)], r.text
    assert raw.get(r.json()["urls"][0]["url"]).content == data_b
    # a read URL reads only its own object
    r = a.c.get(f"/blobs/{fa}/{ba}", follow_redirects=False)
    assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
    get_a = r.headers["location"]
    assert raw.get(get_a).content == data_a
    assert raw.get(with_path(get_a, f"{a.user_id}/{fa}/{ba}", f"{b.user_id}/{fb}/{bb}")).status_code == 403
    assert raw.get(with_path(get_a, f"{fa}/{ba}", f"{fa}/{uuid.uuid4()}")).status_code == 403
    # B cannot obtain URLs for A's objects: they do not exist for B
    assert b.c.get(f"/blobs/{fa}/{ba}", follow_redirects=False).status_code == 404
    # an expired URL is refused
    late_put = upload_url(a, fa, uuid.uuid4(), 10)
    time.sleep(3.5)
    assert raw.get(get_a).status_code == 403
    assert raw.put(late_put, content=b"0123456789").status_code == 403
    # and without any signature the bucket answers nobody
    anon = urlunsplit(urlsplit(get_a)._replace(query=""))
    assert raw.get(anon).status_code == 403


def test_commit_believes_only_what_was_uploaded(pg_s3_server, s3_endpoint):
    srv = pg_s3_server()
    a = ApiUser(srv)
    f = a.create(a.root, "f")
    never, short, good = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    upload_url(a, f, never, 100)                                    # URL taken, nothing sent
    upload_url(a, f, short, 100)
    store = srv.blob_store()
    # an object of another size under the key (only the bucket's owner could do this)
    s3_endpoint.client().put_object(Bucket=store.bucket, Key=store._key(a.user_id, f, short), Body=b"x" * 99)
    assert httpx.put(upload_url(a, f, good, 100), content=b"g" * 100).status_code == 200
    r = a.commit(f, [good, never])
    assert r.status_code == 400 and "never uploaded" in r.json()["detail"], r.text
    r = a.commit(f, [good, short])
    assert r.status_code == 400 and "99 bytes, not the 100 declared" in r.json()["detail"], r.text
    assert a.inode(f)["version"] == 1
    assert a.commit(f, [good]).status_code == 200
    assert a.c.get(f"/blobs/{f}/{good}").content == b"g" * 100
    # asking again for a staged blob's URL is a retry; for a stored one, a conflict
    assert upload_urls(a, (f, never, 100)).status_code == 200
    assert upload_urls(a, (f, never, 101)).status_code == 409
    assert upload_urls(a, (f, good, 100)).status_code == 409
    # a batch is staged all or none
    fresh = uuid.uuid4()
    assert upload_urls(a, (f, fresh, 5), (f, good, 100)).status_code == 409
    assert upload_urls(a, (f, fresh, 6)).status_code == 200


def test_sweeper_removes_uncommitted_uploads_safely_from_several_nodes(pg_s3_server):
    from server import maintenance
    from server.db import MetadataStore
    from server.sqldb import open_database

    srv = pg_s3_server()
    a = ApiUser(srv)
    f = a.create(a.root, "f")
    kept, dead = uuid.uuid4(), [uuid.uuid4() for _ in range(6)]
    assert httpx.put(upload_url(a, f, kept, 10), content=b"k" * 10).status_code == 200
    for blob in dead:
        assert httpx.put(upload_url(a, f, blob, 10), content=b"d" * 10).status_code == 200
    young = uuid.uuid4()
    assert httpx.put(upload_url(a, f, young, 10), content=b"y" * 10).status_code == 200
    assert a.commit(f, [kept]).status_code == 200
    used = a.c.get("/fs/statfs").json()["used_bytes"]
    # the dead uploads are older than the server keeps staged blobs; the young one is not
    from server.config import STAGED_MAX_AGE
    srv.query("UPDATE blobs SET created_at = created_at - ? WHERE blob_id <> ? AND blob_id <> ?",
              STAGED_MAX_AGE + 3600, str(kept), str(young))
    nodes = [(MetadataStore(open_database(srv.database_url)), srv.blob_store()) for _ in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:      # three nodes sweeping at once
            swept = list(pool.map(lambda n: maintenance.expire(*n)[0], nodes))
    finally:
        for db, _ in nodes:
            db.close()
    assert sum(swept) >= len(dead)
    assert srv.stored_objects() == {f"{a.user_id}/{f}/{kept}", f"{a.user_id}/{f}/{young}"}
    assert srv.query("SELECT count(*) FROM blobs WHERE user_id = ?", str(a.user_id))[0][0] == 2
    assert a.c.get("/fs/statfs").json()["used_bytes"] == used - 6 * 10          # uncharged once
    assert a.commit(f, [kept, dead[0]], base=2).status_code == 400            # swept: gone
    assert a.commit(f, [kept, young], base=2).status_code == 200


def test_blobs_through_the_api_when_direct_transfers_are_off(pg_s3_server, make_machine, tmp_path):
    srv = pg_s3_server("&direct=0")
    a = ApiUser(srv)
    f = a.create(a.root, "f")
    r = upload_urls(a, (f, uuid.uuid4(), 10))
    assert r.status_code == 409 and r.json()["code"] == "direct_unavailable"
    log = cli_round_trip(srv, make_machine, tmp_path, 2 * CHUNK + 5)
    assert re.search(r'"PUT /api/v1/blobs/[^ ]+ HTTP/1.1" 201', log)


# ---------------------------------------------------------------- a lying host, on both backends
@pytest.mark.backends
def test_tampered_chunk_and_rollback_are_eio(shared_server, make_machine, make_mount, tmp_path):
    """What the host stores is edited behind the server: one bit of a chunk object
    (folder or bucket), then a whole file put back to its previous version (rows
    and objects). A mount reads EIO for both, never other bytes."""
    from hostile import mount_log
    srv = shared_server
    machine = make_machine(srv).register()
    m = make_mount(machine)
    (m.path / "t").mkdir()
    chunked, rolled = os.urandom(2 * CHUNK + 100), os.urandom(CHUNK + 7)
    (m.path / "t" / "flip.bin").write_bytes(chunked)
    (m.path / "t" / "roll.bin").write_bytes(rolled)
    m.settle()
    uid = srv.query("SELECT id FROM users WHERE username = ?", machine.username)[0][0]
    # The host knows no names: it tells the two files apart by their stored size.
    sizes = dict(srv.query("SELECT inode, sum(size) FROM blobs WHERE user_id = ? AND committed = 1"
                           " GROUP BY inode", uid))
    flip, roll = sorted(sizes, key=sizes.get, reverse=True)
    # 1. one bit of a chunk
    blob = srv.query("SELECT blob_id FROM blobs WHERE user_id = ? AND inode = ? AND committed = 1"
                     " ORDER BY size DESC, blob_id LIMIT 1", uid, flip)[0][0]
    data = bytearray(srv.read_object(uuid.UUID(uid), uuid.UUID(flip), uuid.UUID(blob)))
    data[len(data) // 2 + 1000] ^= 1
    srv.write_object(uuid.UUID(uid), uuid.UUID(flip), uuid.UUID(blob), bytes(data))
    # 2. a rollback: remember version N, write N+1 through the mount, put N back
    row = srv.query("SELECT version, meta, manifest FROM inodes WHERE user_id = ? AND id = ?", uid, roll)[0]
    old_blobs = srv.query("SELECT blob_id, size FROM blobs WHERE user_id = ? AND inode = ? AND committed = 1",
                          uid, roll)
    old_bytes = {b: srv.read_object(uuid.UUID(uid), uuid.UUID(roll), uuid.UUID(b)) for b, _ in old_blobs}
    (m.path / "t" / "roll.bin").write_bytes(os.urandom(CHUNK + 9))
    wait_committed = time.monotonic() + 20
    while srv.query("SELECT version FROM inodes WHERE user_id = ? AND id = ?", uid, roll)[0][0] == row[0]:
        assert time.monotonic() < wait_committed, "the new version never reached the server"
        time.sleep(0.1)
    srv.query("DELETE FROM blobs WHERE user_id = ? AND inode = ?", uid, roll)
    for b, size in old_blobs:
        srv.write_object(uuid.UUID(uid), uuid.UUID(roll), uuid.UUID(b), old_bytes[b])
        srv.query("INSERT INTO blobs(user_id, inode, blob_id, size, committed, verified, created_at)"
                  " VALUES (?, ?, ?, ?, 1, 1, 0)", uid, roll, b, size)
    srv.query("UPDATE inodes SET version = ?, meta = ?, manifest = ? WHERE user_id = ? AND id = ?",
              row[0], row[1], row[2], uid, roll)

    fresh = make_mount(machine)            # cold cache, same machine (it saw version N+1)
    for name, why in (("flip.bin", "failed verification"), ("roll.bin", "rolled inode")):
        with pytest.raises(OSError) as exc:
            (fresh.path / "t" / name).read_bytes()
        assert exc.value.errno == errno.EIO, name
        assert why in mount_log(fresh), mount_log(fresh)[-2000:]



def test_a_commit_never_takes_a_blob_a_sweeper_claimed_meanwhile(pg_cluster):
    """Nothing locks a staged blob's row: a sweeper on another node can claim it
    between the moment a commit reads the inode's blobs and the moment it marks
    them committed. The commit must then fail (the object is being deleted),
    never commit a blob without its object."""
    from server.db import MetadataStore
    from server.migrations import migrate
    from server.models import KdfParams, MasterKeyRecord, OpCommit, OpCreate
    from server.sqldb import open_database

    url = pg_cluster.new_database()
    committer, sweeper = MetadataStore(open_database(url)), MetadataStore(open_database(url))
    try:
        migrate(committer.db)
        user, root, f, blob = (uuid.uuid4() for _ in range(4))
        committer.create_user(user, "racer", "x", KdfParams(salt="AAAA", memory_kib=8, iterations=1, lanes=1),
                              MasterKeyRecord(gen=1, wrapped_master="AA==", wrapped_namespace="AA=="), root, "AA==")
        committer.apply_ops(user, [OpCreate(op="create", inode=f, is_dir=False, meta="AA==", parent=root,
                                            name_hash="0" * 64, name="AA==")], {})
        committer.add_blob(committer.get_user(user), f, blob, 10)
        committer.db.transaction(lambda tx: tx.run("UPDATE blobs SET created_at = 0"))

        real = committer.db.transaction

        def interleaved(fn, **kw):
            def with_sweep(tx):
                real_all = tx.all

                def all_(sql, args=()):
                    rows = real_all(sql, args)
                    if sql.startswith("SELECT blob_id, committed, verified, size FROM blobs"):
                        sweeper.claim_staged(time.time() - 3600)      # another node, right now
                    return rows
                tx.all = all_
                return fn(tx)
            return real(with_sweep, **kw)
        committer.db.transaction = interleaved
        op = OpCommit(op="commit", inode=f, base_version=1, meta="AA==", manifest="AA==", blobs=[blob])
        with pytest.raises(Exception) as exc:
            committer.apply_ops(user, [op], {})
        assert getattr(exc.value, "code", None) == "invalid", exc.value
        committer.db.transaction = real
        assert committer.get_blob(user, f, blob) is None          # claimed, not committed
    finally:
        committer.close()
        sweeper.close()


def test_client_falls_back_to_the_api_when_a_batched_url_expired(pg_s3_server):
    """A read URL kept past its life (a client whose clock or queue ran late) is
    refused by the bucket; the client then asks the API again and gets the bytes."""
    from zkfs.api import ApiClient
    srv = pg_s3_server(env={"ZKFS_DIRECT_URL_TTL": "2"})
    a = ApiUser(srv)
    f = a.create(a.root, "f")
    blob = uuid.uuid4()
    assert httpx.put(upload_url(a, f, blob, 6), content=b"stored").status_code == 200
    assert a.commit(f, [blob]).status_code == 200
    api = ApiClient(srv.url, a.token)
    try:
        api.blob_urls_ahead(f, [blob])
        url, _ = api._read_urls[(f, blob)]
        api._read_urls[(f, blob)] = (url, time.monotonic() + 3600)   # kept far too long
        time.sleep(3)
        assert httpx.get(url).status_code == 403
        assert api.get_blob(f, blob) == b"stored"
        assert (f, blob) not in api._read_urls
    finally:
        api.close()
