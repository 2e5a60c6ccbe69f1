"""Small helpers shared by the CLI-level tests (test_cli, test_zero_knowledge,
test_isolation). Everything drives the real `client.py` (via harness.Machine)
against a real server; nothing here is mocked."""
from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path

from harness import Machine


def new_machine(tmp_path_factory, server) -> Machine:
    """A fresh client installation (own $ZKFS_HOME); usable from any fixture scope."""
    return Machine(tmp_path_factory.mktemp("machine"), server.url)


def unique(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_random(path: Path, size: int, seed: int | None = None) -> Path:
    """``size`` pseudo-random bytes (fast, incompressible, never all zero)."""
    import random
    rng = random.Random(seed if seed is not None else uuid.uuid4().int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def assert_cli_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """One clear line on stderr starting with ``error:``, non-zero exit, no traceback.
    Each needle (case-insensitive; ``a|b`` means either) must appear in that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"expected failure, got success:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in out, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    low = line.lower()
    for needle in needles:
        assert any(n.lower() in low for n in needle.split("|")), f"{needle!r} not in {line!r}"
    return line


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def config(machine: Machine) -> dict:
    return read_json(machine.home / "config.json")


def keys_file(machine: Machine) -> dict:
    return read_json(machine.home / "keys.json")


def uploads(machine: Machine) -> dict:
    return read_json(machine.home / "uploaded_file.json")


def user_id(machine: Machine) -> str:
    return keys_file(machine)["user_id"]


def ls_names(machine: Machine, path: str = "/") -> list[str]:
    """Names printed by `ls PATH` (directories keep their trailing slash)."""
    proc = machine.run("ls", path)
    assert_ok(proc)
    return [_ls_name(line) for line in proc.stdout.splitlines() if line.strip()]


def _ls_name(line: str) -> str:
    # "<mode> <size right-aligned in 12> <YYYY-MM-DD> <HH:MM> <name>"
    parts = line.split(None, 4)
    return parts[4]


def ls_sizes(machine: Machine, path: str = "/") -> dict[str, int]:
    proc = machine.run("ls", path)
    assert_ok(proc)
    out = {}
    for line in proc.stdout.splitlines():
        if line.strip():
            parts = line.split(None, 4)
            out[parts[4]] = int(parts[1])
    return out
