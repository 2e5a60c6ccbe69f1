"""A real scale-out deployment: two API nodes on one PostgreSQL and one S3 bucket,
HAProxy in front, FUSE mounts through it (one per node, each failing over to the
other). A node SIGKILLed during a 300 MB copy, PostgreSQL restarted under a live
mount: nothing half-written, nothing lost."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from clitools import write_random
from conftest import TEST_SECRET, ServerProcess
from loadbalancer import LoadBalancer
from mount_helpers import Mounts, mounts, sha256_file, wait_until  # noqa: F401 (fixture)

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

MiB = 1024 * 1024


WATCHDOG_SECONDS = 420   # the mounts fixture kills hung daemons after this


@pytest.fixture
def deployment(tmp_path_factory, pg_cluster, s3_endpoint):
    """Two nodes sharing a database and a bucket prefix, HAProxy in front."""
    database, blobs = pg_cluster.new_database(), s3_endpoint.blobs_url("n" + uuid.uuid4().hex[:10])
    env = {**s3_endpoint.env(), "ZKFS_SECRET_KEY": TEST_SECRET}
    # The nodes believe X-Forwarded-For from the balancer only (it adds the header).
    nodes = [ServerProcess(tmp_path_factory.mktemp(f"node{i}"), database_url=database, blobs_url=blobs, env=env,
                           extra_args=["--trusted-proxy", "127.0.0.1"]) for i in range(2)]
    lb = None
    try:
        for node in nodes:
            node.start()
        lb = LoadBalancer([n.port for n in nodes], tmp_path_factory.mktemp("haproxy")).start()
        yield SimpleNamespace(nodes=nodes, lb=lb, url=lb.url, pg=pg_cluster,
                              on_node=[SimpleNamespace(url=u) for u in lb.node_urls])
    finally:
        if lb:
            lb.stop()
        for node in nodes:
            node.stop()


def uploads_via(node: ServerProcess) -> int:
    """How many requests for chunk upload URLs this node answered."""
    return len(re.findall(r'"POST /api/v1/blobs/upload-urls', node.log_path.read_text(errors="replace")))


def sweep_everything_staged(node: ServerProcess) -> None:
    """What the sweeper does an hour after a client died, now: age every staged
    blob past the limit and run the periodic cleanup (as any node would)."""
    from server import maintenance
    from server.db import MetadataStore
    from server.sqldb import open_database
    node.query("UPDATE blobs SET created_at = created_at - 7200 WHERE committed <> 1")
    db = MetadataStore(open_database(node.database_url))
    try:
        maintenance.expire(db, node.blob_store())
    finally:
        db.close()


def test_node_killed_during_a_300_mb_copy(deployment, mounts, tmp_path):
    first = mounts.machine(deployment.on_node[0])          # A's mount talks to node A
    other = mounts.machine(deployment.on_node[1], register=False)
    other.login(first.username, first.password)
    a, b = mounts.mount(first), mounts.mount(other)
    old = write_random(tmp_path / "old.bin", 8 * MiB + 3)
    shutil.copyfile(old, a.path / "big.bin")
    wait_until(lambda: (b.path / "big.bin").exists() and os.path.getsize(b.path / "big.bin") == 8 * MiB + 3,
               20, what="the first version in B")
    old_sha = sha256_file(old)
    assert sha256_file(b.path / "big.bin") == old_sha

    new = write_random(tmp_path / "new.bin", 300 * MiB)
    new_sha = sha256_file(new)
    node_a = deployment.nodes[0]
    copy = subprocess.Popen(["cp", str(new), str(a.path / "big.bin")], stderr=subprocess.PIPE, text=True)
    # Kill node A once a good part of the copy has gone through the nodes.
    wait_until(lambda: node_a.query("SELECT count(*) FROM blobs WHERE committed = 0")[0][0] >= 60
               or copy.poll() is not None, 300, interval=0.2, what="the copy under way")
    assert copy.poll() is None, "the copy ended before node A could be killed"
    assert uploads_via(node_a) > 0, "the copy did not go through node A"
    before_kill = uploads_via(deployment.nodes[1])
    node_a.kill()
    _, err = copy.communicate(timeout=400)
    print(f"copy after node A died: exit {copy.returncode} {err.strip()}")
    assert copy.returncode == 0 or "Input/output error" in err, err

    # B (through the load balancer, now node B alone) sees one whole version, never a mix.
    def whole() -> str | None:
        try:
            sha = sha256_file(b.path / "big.bin")
        except OSError:
            return None
        return sha if sha in (old_sha, new_sha) else "mixed"
    if copy.returncode == 0:
        # the rest of the copy went through node B
        assert uploads_via(deployment.nodes[1]) > before_kill
        wait_until(lambda: whole() == new_sha, 120, interval=1, what="the new version in B")
    else:
        assert whole() in (old_sha, new_sha)
    assert sha256_file(a.path / "big.bin") == sha256_file(b.path / "big.bin")

    # Once the sweeper ran, the bucket holds exactly the committed blobs.
    node_b = deployment.nodes[1]
    sweep_everything_staged(node_b)
    committed = {f"{u}/{i}/{bl}" for u, i, bl in node_b.query(
        "SELECT user_id, inode, blob_id FROM blobs WHERE committed = 1")}
    assert node_b.query("SELECT count(*) FROM blobs WHERE committed <> 1")[0][0] == 0
    assert node_b.stored_objects() == committed
    assert len(committed) >= (300 if whole() == new_sha else 8)
    assert sha256_file(b.path / "big.bin") == whole()


def test_postgres_restarted_under_a_live_mount(deployment, mounts, tmp_path):
    machine = mounts.machine(deployment)
    m = mounts.mount(machine)
    written: dict[str, bytes] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        try:
            while not stop.is_set() or i < 40:
                name = f"f{i:03d}.bin"
                data = os.urandom(1000 + 4096 * (i % 7)) if i % 10 else os.urandom(3 * MiB)
                (m.path / name).write_bytes(data)
                written[name] = data
                if i % 5 == 4:
                    (m.path / f"dir{i}").mkdir()
                    os.rename(m.path / name, m.path / f"dir{i}" / name)
                    written[f"dir{i}/{name}"] = written.pop(name)
                i += 1
                time.sleep(0.05)
        except BaseException as e:          # reported by the test
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(written) >= 10 or errors, 60, what="writes before the restart")
        deployment.pg.stop()
        time.sleep(3)                       # operations stall meanwhile
        deployment.pg.start()
        wait_until(lambda: len(written) >= 30 or errors, 120, what="writes after the restart")
    finally:
        stop.set()
        t.join(240)
    assert not errors, errors
    log = "".join(n.log_path.read_text(errors="replace") for n in deployment.nodes)
    assert "database connection lost: retrying" in log, "the restart was not noticed by the nodes"
    for name, data in written.items():
        assert (m.path / name).read_bytes() == data, name
    # a fresh machine (nothing cached) reads the same through the nodes
    other = mounts.machine(deployment, register=False)
    other.login(machine.username, machine.password)
    fresh = mounts.mount(other)
    for name, data in written.items():
        assert (fresh.path / name).read_bytes() == data, name
