"""A zkfs server on 127.0.0.1 and `client.py` runs against it, timed and with the
client's peak memory: what the single-machine benches (rotate_full.py, links.py) share."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zkbench.util import free_port

REPO = Path(__file__).resolve().parent.parent.parent
PASSWORD = "bench password 123"


@contextmanager
def local_server(data_dir: Path, env: dict[str, str] | None = None, *,
                 log: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A fresh server on a free port (its process and base URL), stopped at the end.
    ``log``: its output, with an access log line per request, goes there."""
    port = free_port()
    argv = [sys.executable, "-m", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") if log else open(os.devnull, "wb") as out:
        server = subprocess.Popen(argv + (["--log-level", "info"] if log else []), cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


def client(home: Path, *args: str, stdin: str = "") -> tuple[float, int, str]:
    """Run client.py with ``$ZKFS_HOME`` = ``home``: (seconds, peak RSS of that process
    in bytes, stdout); a failure ends the bench with its error."""
    env = {**os.environ, "ZKFS_HOME": str(home), "PYTHONPATH": str(REPO)}
    (home / ".stdin").write_text(stdin)
    with open(home / ".stdin") as i, open(home / ".stdout", "w+") as o, open(home / ".stderr", "w+") as e:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(REPO / "client.py"), *args], env=env, cwd=home,
                                stdin=i, stdout=o, stderr=e)
        _, status, usage = os.wait4(proc.pid, 0)      # this child's own rusage: its peak RSS
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        o.seek(0)
        e.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"client.py {' '.join(args)} failed: {e.read().strip()}")
        return seconds, usage.ru_maxrss * 1024, o.read()


def register(home: Path, server_url: str) -> None:
    """The bench's account, its state in ``home`` (created)."""
    home.mkdir()
    client(home, "register", "bench", "--server", server_url, "--password-stdin", stdin=PASSWORD + "\n")
