"""Client-side test harness: "machines" (one $ZKFS_HOME each) driving the real
`client.py`, and real FUSE mounts via `mount.py` that are always unmounted.

Fixtures (re-exported by conftest.py):
* ``make_machine(server)`` - a fresh client state dir bound to ``server``.
* ``account``              - (server, machine) with a registered, logged-in user.
* ``make_mount(machine)``  - mounts with `mount.py` and guarantees unmount + daemon exit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"


class Machine:
    """One client installation: its own $ZKFS_HOME, talking to one server."""

    def __init__(self, home: Path, server_url: str):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.server_url = server_url
        self.username: str | None = None
        self.password = PASSWORD

    def env(self) -> dict[str, str]:
        env = {**os.environ, "ZKFS_HOME": str(self.home)}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(REPO / "client.py"), *args], input=input,
                              env=self.env(), cwd=self.home, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"client.py {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def register(self, username: str | None = None, password: str = PASSWORD) -> "Machine":
        self.username = username or f"u{uuid.uuid4().hex[:10]}"
        self.password = password
        self.run("register", self.username, "--server", self.server_url, "--password-stdin",
                 input=password + "\n")
        return self

    def login(self, username: str | None = None, password: str | None = None, *,
              check: bool = True) -> subprocess.CompletedProcess:
        self.username = username or self.username
        return self.run("login", self.username, "--server", self.server_url, "--password-stdin",
                        input=(password or self.password) + "\n", check=check)


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Mount:
    """A `mount.py` mount of one machine's account at ``path``."""

    def __init__(self, machine: Machine, path: Path, extra: list[str]):
        self.machine = machine
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.pid: int | None = None

    def _mount_py(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, str(REPO / "mount.py"), *args], env=self.machine.env(),
                              cwd=self.machine.home, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mount.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}\n"
                                 f"{self.log()}")
        return proc

    def start(self) -> "Mount":
        self._mount_py(str(self.path), *self.extra)
        self.pid = self._daemon_pid()
        return self

    def _daemon_pid(self) -> int | None:
        for pidfile in (self.machine.home / "run").glob("mount-*.pid"):
            try:
                pid = int(pidfile.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.path).encode() in cmdline:
                return pid
        return None

    def is_mounted(self) -> bool:
        target = os.path.realpath(self.path)
        with open("/proc/mounts") as f:
            return any(line.split()[1] == target for line in f)

    def unmount(self, *extra: str) -> subprocess.CompletedProcess:
        return self._mount_py("--unmount", str(self.path), *extra)

    def settle(self, timeout: float = 120) -> None:
        """Until the server has everything written so far (close() returns once the
        write-back journal has it)."""
        self._mount_py("--wait", str(self.path), timeout=timeout)

    def status(self) -> str:
        return self._mount_py("--status", str(self.path)).stdout

    def kill(self) -> None:
        """SIGKILL the daemon, leaving a dead mount behind (as a crash would)."""
        assert self.pid
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in (self.machine.home / "logs").glob("*.log"))

    def cleanup(self) -> None:
        if self.is_mounted():
            subprocess.run(["fusermount", "-u", "-z", str(self.path)], capture_output=True)
        if self.pid:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def make_machine(tmp_path_factory):
    def factory(server) -> Machine:
        return Machine(tmp_path_factory.mktemp("machine"), server.url)
    return factory


@pytest.fixture
def account(server, make_machine) -> tuple:
    """A fresh server and one machine with a registered, logged-in user."""
    return server, make_machine(server).register()


@pytest.fixture
def make_mount(tmp_path_factory):
    mounts: list[Mount] = []

    def factory(machine: Machine, *extra: str) -> Mount:
        m = Mount(machine, tmp_path_factory.mktemp("mnt"), list(extra))
        mounts.append(m)
        return m.start()

    yield factory
    for m in mounts:
        m.cleanup()
