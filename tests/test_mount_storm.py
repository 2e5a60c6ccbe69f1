"""A randomized syscall storm against one mount (issue 12): several processes,
fixed seeds, a few thousand calls with extreme arguments (sizes up to 2**63-1,
names of 255/256/1024 bytes, paths past PATH_MAX, huge xattrs, rename flags,
odd modes and times). No call may kill or wedge the daemon, none may give EIO;
afterwards the mount must still round-trip data, also after a remount, and its
log must hold no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mount_helpers import Mounts, mounts  # noqa: F401 (fixture)

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.timeout(500), pytest.mark.slow]
WORKERS, CALLS = 4, 800


WATCHDOG_SECONDS = 400   # the mounts fixture kills hung daemons after this


def test_syscall_storm_leaves_the_mount_alive_and_correct(server, mounts):
    machine = mounts.machine(server)
    m = mounts.mount(machine)
    shared = m.path / "storm"
    shared.mkdir()
    procs = [subprocess.Popen([sys.executable, str(HERE / "storm_worker.py"), str(shared), str(seed), str(CALLS)],
                              stdout=subprocess.PIPE, text=True) for seed in range(WORKERS)]
    reports = []
    for p in procs:
        out, _ = p.communicate(timeout=360)
        assert p.returncode == 0, out
        reports.append(json.loads(out))
    violations = [v for r in reports for v in r["violations"]]
    assert violations == [], violations
    seen = sum((sum(r["seen"].values()) for r in reports))
    assert seen >= WORKERS * CALLS // 2            # (some steps need an open descriptor first)
    assert sum(r["seen"].get("ok", 0) for r in reports) > WORKERS * CALLS // 10

    # still a working filesystem
    data = os.urandom(3 << 20) + b"tail"
    (m.path / "after.bin").write_bytes(data)
    assert (m.path / "after.bin").read_bytes() == data
    os.listdir(shared)
    log = m.log()
    assert "Traceback" not in log, log[-4000:]
    assert "integrity check failed" not in log
    m.unmount()
    again = mounts.mount(machine)
    assert (again.path / "after.bin").read_bytes() == data
    os.listdir(again.path / "storm")
