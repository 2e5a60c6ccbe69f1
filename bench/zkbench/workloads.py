"""Source data and the workloads. Every workload verifies its result."""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
import statistics
import subprocess
import time
from pathlib import Path

from .util import RssPoller, io_counters, log

MiB = 1 << 20
MB = 1e6
SEED = 20240601
CHUNK = 4 * MiB
RAND_READS = 200
RAND_BS = 4096
EDIT_BS = 4096
CMD_TIMEOUT = 3600


# =============================================================================== data
class Dataset:
    """The big random file (+ its sha256, and the sha256 after the 4 KiB middle edit)
    and the fixed-seed small-file tree. Generated once per harness run."""

    def __init__(self, root: Path, size_mib: int, nfiles: int, ndirs: int = 100) -> None:
        self.root = root
        self.size = size_mib * MiB
        self.nfiles = nfiles
        self.ndirs = min(ndirs, max(1, nfiles))
        self.big = root / "big.bin"
        self.tree = root / "tree"
        rng = random.Random(SEED)
        self.edit_off = (self.size // 2) // EDIT_BS * EDIT_BS
        self.edit_data = rng.randbytes(EDIT_BS)
        nblocks = self.size // RAND_BS
        self.rand_offsets = [rng.randrange(nblocks) * RAND_BS for _ in range(RAND_READS)]
        self.tree_sizes: list[int] = []
        self.tree_bytes = 0

    def generate(self, big: bool = True, tree: bool = True) -> None:
        """big: the random file; tree: the small-file tree (only what a run needs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        if big:
            self._generate_big()
        if tree:
            self._generate_tree()
        log(f"data: {self.size / MiB if big else 0:.0f} MiB file + "
            f"{self.nfiles if tree else 0} files ({self.tree_bytes / MiB:.1f} MiB) "
            f"in {time.monotonic() - t0:.1f}s")

    def generate_git(self, source: Path, nfiles: int) -> None:
        """A local repository of a real source tree: the first `nfiles` regular files of
        `source` (sorted walk), one commit; git_clone clones it over file:// (git's
        transport: a pack sent and unpacked, then the checkout, as from a server)."""
        t0 = time.monotonic()
        self.git_src = self.root / "gitsrc"
        self.git_src.mkdir(parents=True)
        n = 0
        for dirpath, dirs, files in os.walk(source):
            dirs.sort()
            for fn in sorted(files):
                p = Path(dirpath, fn)
                if n >= nfiles or p.is_symlink() or not p.is_file():
                    continue
                dst = self.git_src / p.relative_to(source)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(p.read_bytes())
                n += 1
        if n < nfiles:
            log(f"git_clone: {source} has only {n} files")
        self.git_nfiles = n
        self.git_bytes = sum(f.stat().st_size for f in self.git_src.rglob("*") if f.is_file())
        for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"import {source}"]):
            _git(self.git_src, *cmd)
        log(f"data: git repo of {n} files ({self.git_bytes / MiB:.1f} MiB) from {source} "
            f"in {time.monotonic() - t0:.1f}s")

    def _generate_big(self) -> None:
        h, he = hashlib.sha256(), hashlib.sha256()
        e0, e1 = self.edit_off, self.edit_off + EDIT_BS
        with open(self.big, "wb") as f:
            pos = 0
            while pos < self.size:
                n = min(CHUNK, self.size - pos)
                b = os.urandom(n)
                f.write(b)
                h.update(b)
                if pos < e1 and pos + n > e0:  # splice the edit into the expected hash
                    mb = bytearray(b)
                    a, z = max(e0, pos), min(e1, pos + n)
                    mb[a - pos:z - pos] = self.edit_data[a - e0:z - e0]
                    he.update(mb)
                else:
                    he.update(b)
                pos += n
        self.big_sha = h.hexdigest()
        self.edited_sha = he.hexdigest()

    def _generate_tree(self) -> None:
        # small-file tree: sizes log-uniform in [1 KiB, 64 KiB], fixed seed
        rng = random.Random(SEED + 1)
        lo, hi = math.log(1024), math.log(64 * 1024)
        for d in range(self.ndirs):
            (self.tree / f"d{d:03d}").mkdir(parents=True, exist_ok=True)
            os.chmod(self.tree / f"d{d:03d}", 0o755)
        os.chmod(self.tree, 0o755)
        for i in range(self.nfiles):
            size = min(64 * 1024, max(1024, int(round(math.exp(rng.uniform(lo, hi))))))
            p = self.tree / f"d{i % self.ndirs:03d}" / f"f{i:05d}.bin"
            p.write_bytes(rng.randbytes(size))
            os.chmod(p, 0o644)
            self.tree_sizes.append(size)
        self.tree_bytes = sum(self.tree_sizes)


# =============================================================================== helpers
class Result:
    def __init__(self, system: str) -> None:
        self.system = system
        self.metrics: dict[str, float] = {}
        self.raw: dict[str, object] = {}
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.errors: dict[str, str] = {}

    def check(self, name: str, ok: bool, detail: str = "", fatal: bool = True) -> bool:
        """fatal=False: a behaviour finding about the system, not a data-integrity failure."""
        self.checks.append({"name": name, "ok": bool(ok), "detail": "" if ok else detail,
                            "fatal": fatal})
        if not ok:
            log(f"  CHECK FAILED [{self.system}] {name}: {detail}")
        return ok

    def as_dict(self) -> dict:
        return {"system": self.system, "metrics": self.metrics, "raw": self.raw,
                "checks": self.checks, "notes": self.notes, "errors": self.errors}


def _remount(sys_, res: Result, why: str) -> None:
    log(f"   {sys_.name}: remount + drop caches ({why})")
    ok, note = sys_.remount_cold()
    if not ok and note not in res.notes:
        res.notes.append(note)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _wire_delta(sys_, w0):
    w1 = sys_.wire()
    if w0 is None or w1 is None:
        return None, None
    return w1[0] - w0[0], w1[1] - w0[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT, **kw)


def _git(repo: Path, *args: str) -> str:
    # the mount's files may belong to another uid than the harness's: trust them all
    r = _run(["git", "-c", "safe.directory=*", "-c", "user.name=zkbench",
              "-c", "user.email=zkbench@localhost", "-C", str(repo), *args])
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo} exited {r.returncode}: "
                           f"{r.stderr.strip()[-1000:]}")
    return r.stdout


# =============================================================================== workloads
def seq_write(sys_, ds: Dataset, res: Result) -> None:
    dst = sys_.target / "big.bin"
    w0 = sys_.wire()
    io0 = io_counters(sys_.server_procs())
    since = time.time_ns()
    groups = {"daemon": sys_.daemon_procs(), "server": sys_.server_procs()}
    with RssPoller(groups) as rp:
        t0 = time.monotonic()
        r = _run(["cp", str(ds.big), str(dst)])
        t_cp = time.monotonic()
        if r.returncode != 0:
            raise RuntimeError(f"cp failed: {r.stderr.strip()}")
        info = sys_.settle("seq_write", since_ns=since, sizes=[ds.size], count=1,
                           timeout=max(600, ds.size / (2 * MB)))
        t_set = time.monotonic()
    m = res.metrics
    m["seq_write_MBps"] = ds.size / MB / (t_set - t0)
    m["seq_write_cache_MBps"] = ds.size / MB / (t_cp - t0)
    res.raw["seq_write"] = {"cp_s": t_cp - t0, "settled_s": t_set - t0, **info}
    if "daemon" in rp.peak:
        m["rss_daemon_peak_MiB"] = rp.peak["daemon"] / MiB
    if "server" in rp.peak:
        m["rss_server_peak_MiB"] = rp.peak["server"] / MiB
    up, down = _wire_delta(sys_, w0)
    if up is not None:
        res.raw["seq_write"].update(wire_up=up, wire_down=down, wire_up_ratio=up / ds.size)
    if sys_.server_procs():
        io1 = io_counters(sys_.server_procs())
        res.raw["seq_write"]["server_rchar"] = io1["rchar"] - io0["rchar"]
    st = os.stat(dst)
    res.check("seq_write size", st.st_size == ds.size, f"{st.st_size} != {ds.size}")


def seq_read(sys_, ds: Dataset, res: Result) -> None:
    _remount(sys_, res, "seq_read")
    path = sys_.target / "big.bin"
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    total = 0
    t0 = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            total += n
    dt = time.monotonic() - t0
    res.metrics["seq_read_MBps"] = ds.size / MB / dt
    res.raw["seq_read"] = {"s": dt, "bytes": total}
    res.check("seq_read length", total == ds.size, f"read {total} of {ds.size}")
    sha = _sha256_file(path)  # untimed verification pass
    res.check("seq_read sha256", sha == ds.big_sha, f"{sha} != {ds.big_sha}")


def _pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rand_read(sys_, ds: Dataset, res: Result) -> None:
    _remount(sys_, res, "rand_read")
    path = sys_.target / "big.bin"
    lat: list[float] = []
    got: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass
        for off in ds.rand_offsets:
            t = time.perf_counter()
            b = os.pread(fd, RAND_BS, off)
            lat.append((time.perf_counter() - t) * 1000)
            got.append(b)
    finally:
        os.close(fd)
    res.metrics["rand_read_p50_ms"] = statistics.median(lat)
    res.metrics["rand_read_p95_ms"] = _pct(lat, 0.95)
    res.raw["rand_read"] = {"n": len(lat), "mean_ms": statistics.fmean(lat), "max_ms": max(lat)}
    bad = 0
    with open(ds.big, "rb") as f:
        for off, b in zip(ds.rand_offsets, got):
            if os.pread(f.fileno(), RAND_BS, off) != b:
                bad += 1
    res.check("rand_read content", bad == 0, f"{bad} of {len(got)} reads differ")


_TRANSFERRED = re.compile(r"Number of regular files transferred:\s*([\d,]+)")


def _rsync_ok(r: subprocess.CompletedProcess, what: str, res: Result) -> None:
    if r.returncode in (23, 24):  # partial: usually chown/chmod not supported by the fs
        msg = (r.stderr.strip().splitlines() or [""])[-1]
        res.notes.append(f"{what}: rsync exit {r.returncode} ({msg[:200]})")
    elif r.returncode != 0:
        raise RuntimeError(f"{what}: rsync exit {r.returncode}: {r.stderr.strip()[-1000:]}")


def small_files(sys_, ds: Dataset, res: Result) -> None:
    dst = sys_.target / "tree"
    src = f"{ds.tree}/"
    w0 = sys_.wire()
    since = time.time_ns()
    t0 = time.monotonic()
    r = _run(["rsync", "-a", src, f"{dst}/"])
    t_rs = time.monotonic()
    _rsync_ok(r, "small_files", res)
    info = sys_.settle("small_files", since_ns=since, sizes=ds.tree_sizes, count=ds.nfiles)
    t_set = time.monotonic()
    sys_.check_settled(res, "small_files")
    res.metrics["small_files_fps"] = ds.nfiles / (t_set - t0)
    res.raw.setdefault("small_files", {}).update({"rsync_s": t_rs - t0, "settled_s": t_set - t0,
                              "rsync_fps": ds.nfiles / (t_rs - t0), **info})
    up, down = _wire_delta(sys_, w0)
    if up is not None:
        res.raw["small_files"].update(wire_up=up, wire_down=down,
                                      wire_up_ratio=up / max(1, ds.tree_bytes))
    # second rsync: must transfer nothing
    since = time.time_ns()
    t0 = time.monotonic()
    r = _run(["rsync", "-a", "--itemize-changes", "--stats", src, f"{dst}/"])
    t1 = time.monotonic()
    _rsync_ok(r, "small_files resync", res)
    m = _TRANSFERRED.search(r.stdout)
    n = int(m.group(1).replace(",", "")) if m else -1
    itemized = sum(1 for line in r.stdout.splitlines() if line[:2] in (">f", "<f", "cf"))
    res.metrics["small_files_resync_s"] = t1 - t0
    res.raw["small_files_resync"] = {"s": t1 - t0, "transferred": n, "itemized_files": itemized}
    res.check("small_files 2nd rsync transfers nothing", n == 0 and itemized == 0,
              f"{n} files transferred ({itemized} itemized)"
              + (" - the fs does not keep rsync's mtimes" if n > 0 else ""), fatal=False)
    if n != 0:  # let re-uploads finish before the next remount (untimed)
        info = sys_.settle("small_files_resync", since_ns=since, count=max(n, 0))
        res.raw["small_files_resync"]["settled_s"] = time.monotonic() - t0


_LS_FILE = re.compile(r"^-")


def meta_ls(sys_, ds: Dataset, res: Result) -> None:
    _remount(sys_, res, "meta_ls")
    dst = sys_.target / "tree"
    t0 = time.monotonic()
    r = _run(["ls", "-lR", str(dst)])
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ls -lR failed: {r.stderr.strip()[-500:]}")
    files = sum(1 for line in r.stdout.splitlines() if _LS_FILE.match(line))
    res.metrics["meta_ls_s"] = dt
    res.raw["meta_ls"] = {"s": dt, "files_listed": files}
    res.check("meta_ls file count", files == ds.nfiles, f"listed {files} of {ds.nfiles}")
    # content check of the whole tree (untimed): checksum dry-run must want no transfer
    r = _run(["rsync", "-a", "--checksum", "--dry-run", "--itemize-changes",
              f"{ds.tree}/", f"{dst}/"])
    diff = [line for line in r.stdout.splitlines() if line[:2] in (">f", "<f", "cf")]
    res.check("small_files content (rsync --checksum)", r.returncode in (0, 23, 24)
              and not diff, f"rsync exit {r.returncode}, {len(diff)} files differ: {diff[:3]}")


def edit_middle(sys_, ds: Dataset, res: Result) -> None:
    path = sys_.target / "big.bin"
    w0 = sys_.wire()
    servers = sys_.server_procs()
    io0 = io_counters(servers)
    since = time.time_ns()
    t0 = time.monotonic()
    with open(path, "r+b", buffering=0) as f:
        f.seek(ds.edit_off)
        f.write(ds.edit_data)
    t_close = time.monotonic()
    info = sys_.settle("edit_middle", since_ns=since, sizes=[ds.size], count=1,
                       timeout=max(600, ds.size / (2 * MB)))
    t_set = time.monotonic()
    io1 = io_counters(servers)
    res.metrics["edit_middle_s"] = t_set - t0
    raw = {"close_s": t_close - t0, "settled_s": t_set - t0, "offset": ds.edit_off, **info}
    if sys_.networked:
        up, down = _wire_delta(sys_, w0)
        if up is not None:
            res.metrics["edit_middle_up_pct"] = 100.0 * up / ds.size
            raw.update(wire_up=up, wire_down=down)
        if servers:
            rchar = io1["rchar"] - io0["rchar"]
            res.metrics["edit_middle_rchar_pct"] = 100.0 * rchar / ds.size
            raw.update(server_rchar=rchar, server_wchar=io1["wchar"] - io0["wchar"])
    res.raw["edit_middle"] = raw
    _remount(sys_, res, "edit_middle verify")
    st = os.stat(path)
    sha = _sha256_file(path)
    res.check("edit_middle sha256 after remount", sha == ds.edited_sha and st.st_size == ds.size,
              f"size {st.st_size}, sha {sha[:16]} != {ds.edited_sha[:16]}")


def _tree_sizes(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under root, .git left out."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if dirpath == str(root):
            dirs[:] = [d for d in dirs if d != ".git"]
        for fn in files:
            p = os.path.join(dirpath, fn)
            out[os.path.relpath(p, root)] = os.lstat(p).st_size
    return out


def git_clone(sys_, ds: Dataset, res: Result) -> None:
    dst = sys_.target / "clone"
    w0 = sys_.wire()
    since = time.time_ns()
    t0 = time.monotonic()
    r = _run(["git", "-c", "safe.directory=*", "clone", "-q", f"file://{ds.git_src}", str(dst)])
    t_clone = time.monotonic()
    if r.returncode != 0:
        raise RuntimeError(f"git clone exited {r.returncode}: {r.stderr.strip()[-1000:]}")
    info = sys_.settle("git_clone", since_ns=since, count=ds.git_nfiles)
    t_set = time.monotonic()
    sys_.check_settled(res, "git_clone")
    res.metrics["git_clone_s"] = t_set - t0
    res.raw.setdefault("git_clone", {}).update({
        "clone_s": t_clone - t0, "settled_s": t_set - t0, "files": ds.git_nfiles,
        "bytes": ds.git_bytes, **info})
    up, down = _wire_delta(sys_, w0)
    if up is not None:
        res.raw["git_clone"].update(wire_up=up, wire_down=down)
    # untimed, without a remount: every name and size as in the source, the content of
    # every 25th file (reading all 5,000 over the WAN profile takes minutes: ~4 round trips
    # a file), and git finds the work tree clean (it compares stat data with its index)
    want = _tree_sizes(ds.git_src)
    have = _tree_sizes(dst)
    bad = sorted(set(want.items()) ^ set(have.items()))
    sample = sorted(want)[::25]
    bad += [p for p in sample
            if _sha256_file(ds.git_src / p) != _sha256_file(dst / p)]
    res.check("git_clone work tree (names, sizes, 1 in 25 by sha256)", not bad,
              f"{len(bad)} differ: {bad[:3]}")
    dirty = _git(dst, "status", "--porcelain").splitlines()
    res.check("git_clone git status clean", not dirty, f"{len(dirty)} entries: {dirty[:3]}")


WORKLOADS = [
    ("seq_write", seq_write, ()),
    ("seq_read", seq_read, ("seq_write",)),
    ("rand_read", rand_read, ("seq_write",)),
    ("small_files", small_files, ()),
    ("meta_ls", meta_ls, ("small_files",)),
    ("edit_middle", edit_middle, ("seq_write",)),
    ("git_clone", git_clone, ()),
]
