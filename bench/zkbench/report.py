"""Table (stdout), CSV, JSON and PNG chart of the results."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

# key, workload, label, unit, better
METRICS = [
    ("seq_write_MBps", "seq_write", "seq_write, settled on server/disk", "MB/s", "higher"),
    ("seq_write_cache_MBps", "seq_write", "seq_write, cp returned (into cache)", "MB/s", "higher"),
    ("seq_read_MBps", "seq_read", "seq_read, cold", "MB/s", "higher"),
    ("rand_read_p50_ms", "rand_read", "rand_read 4 KiB, median", "ms", "lower"),
    ("rand_read_p95_ms", "rand_read", "rand_read 4 KiB, p95", "ms", "lower"),
    ("small_files_fps", "small_files", "small_files rsync, settled", "files/s", "higher"),
    ("small_files_resync_s", "small_files", "small_files 2nd rsync (no-op)", "s", "lower"),
    ("meta_ls_s", "meta_ls", "meta_ls ls -lR, cold", "s", "lower"),
    ("edit_middle_s", "edit_middle", "edit_middle 4 KiB, settled", "s", "lower"),
    ("edit_middle_up_pct", "edit_middle", "edit_middle bytes sent to server", "% of file",
     "lower"),
    ("edit_middle_rchar_pct", "edit_middle", "edit_middle server rchar delta", "% of file",
     "lower"),
    ("git_clone_s", "git_clone", "git clone of a real tree, settled", "s", "lower"),
    ("rss_daemon_peak_MiB", "rss", "peak RSS mount daemon (seq_write)", "MiB", "lower"),
    ("rss_server_peak_MiB", "rss", "peak RSS server (seq_write)", "MiB", "lower"),
]
ORDER = ["local", "zkfs", "rclone", "gocryptfs"]


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """Median over runs of each metric per system, plus check totals."""
    out: dict = {}
    for s in systems:
        rs = [r for r in runs if r["system"] == s]
        med = {}
        for key, *_ in METRICS:
            vals = [r["metrics"][key] for r in rs if key in r["metrics"]]
            if vals:
                med[key] = statistics.median(vals)
        checks = [c for r in rs for c in r["checks"]]
        failed = [c for c in checks if not c["ok"]]
        errors = {k: v for r in rs for k, v in r.get("errors", {}).items()}
        notes = sorted({n for r in rs for n in r.get("notes", [])})
        out[s] = {"metrics": med, "checks_total": len(checks), "checks_failed": failed,
                  "errors": errors, "notes": notes,
                  "unavailable": next((r["unavailable"] for r in rs if r.get("unavailable")),
                                      None)}
    return out


def table_rows(summary: dict, systems: list[str]) -> tuple[list[str], list[list]]:
    others = [s for s in systems if s != "zkfs"] if "zkfs" in systems else []
    header = ["metric", "unit", "better", *systems, *[f"zkfs/{o}" for o in others]]
    rows = []
    keys = []
    for key, _wl, label, unit, better in METRICS:
        vals = [summary[s]["metrics"].get(key) for s in systems]
        if all(v is None for v in vals):
            continue
        ratios = []
        z = summary.get("zkfs", {}).get("metrics", {}).get(key)
        for o in others:
            ov = summary[o]["metrics"].get(key)
            ratios.append(z / ov if z is not None and ov not in (None, 0) else None)
        rows.append([label, unit, better, *vals, *ratios])
        keys.append(key)
    checks = []
    for s in systems:
        sm = summary[s]
        if sm["unavailable"]:
            checks.append("n/a")
        else:
            n, f = sm["checks_total"], len(sm["checks_failed"])
            checks.append(f"{n - f}/{n} ok" + (f" +{len(sm['errors'])} err" if sm["errors"] else ""))
    rows.append(["verification checks passed", "", "", *checks, *[None] * len(others)])
    keys.append("checks")
    return header, rows, keys


def render_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[fmt(c) if i >= 3 and not isinstance(c, str) else (c or "-")
                         for i, c in enumerate(r)] for r in rows]
    for r, raw in zip(cells[1:], rows):
        for i in range(3, len(header)):
            if header[i].startswith("zkfs/") and raw[i] is not None:
                r[i] = f"{fmt(raw[i])}x"
    w = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(str(c).ljust(w[i]) if i < 3 else str(c).rjust(w[i])
                               for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def crypto_table(crypto: dict) -> str:
    res = crypto.get("results", {})
    if not res:
        return "(crypto ceiling not measured)"
    lines = [f"crypto ceiling, 1 MiB messages, MB/s of plaintext (threads: 1 and "
             f"{crypto.get('threads')}):"]
    w = max(len(k) for k in res)
    for k, v in res.items():
        lines.append(f"  {k.ljust(w)}  {v:9.1f}")
    for n in crypto.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list], keys: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", *header])
        for k, r in zip(keys, rows):
            w.writerow([k, *["" if c is None else (f"{c:.6g}" if isinstance(c, float) else c)
                             for c in r]])


def write_crypto_csv(path: Path, crypto: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["implementation_op_threads", "MB_per_s"])
        for k, v in crypto.get("results", {}).items():
            w.writerow([k, f"{v:.6g}"])


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))


COLORS = {"local": "#7f7f7f", "zkfs": "#1f77b4", "rclone": "#ff7f0e", "gocryptfs": "#2ca02c"}


def write_chart(path: Path, summary: dict, systems: list[str], crypto: dict,
                title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in METRICS if any(m[0] in summary[s]["metrics"] for s in systems)]
    has_crypto = bool(crypto.get("results"))
    n = len(panels) + (1 if has_crypto else 0)
    cols = 4
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, (key, wl, label, unit, better) in zip(flat, panels):
        names, vals = [], []
        for s in systems:
            v = summary[s]["metrics"].get(key)
            if v is not None:
                names.append(s)
                vals.append(v)
        bars = ax.bar(names, vals, color=[COLORS.get(s, "#999") for s in names])
        for b, v in zip(bars, vals):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{label}\n({unit}, {better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    used = len(panels)
    if has_crypto:
        ax = flat[used]
        ks = list(crypto["results"])
        vs = [crypto["results"][k] for k in ks]
        short = [k.replace("zkfs_binary_fernet", "zkfs-bin").replace("fernet", "fernet")
                 .replace("_encrypt_", "\nenc ").replace("_decrypt_", "\ndec ") for k in ks]
        bars = ax.bar(range(len(ks)), vs,
                      color=["#1f77b4" if k.startswith("zkfs") else "#9467bd" for k in ks])
        for b, v in zip(bars, vs):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ks)), short, fontsize=6)
        ax.set_title("crypto ceiling, 1 MiB msgs\n(MB/s, higher is better)", fontsize=9)
        ax.margins(y=0.15)
        used += 1
    for ax in flat[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
