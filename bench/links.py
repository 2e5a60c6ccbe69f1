#!/usr/bin/env python3
"""Links for anyone: downloading a linked 1 GiB file in headless Chromium (the page at
/s/<id>: WebCrypto decryption, saved through a service worker's stream) against
`client.py fetch`, with the memory each takes. See bench/README.md.

    python bench/links.py [--sizes 256,1024,3072] [--runs 2] [--quick] [--workdir DIR]

A fresh server on 127.0.0.1, one account; per size, a file of random bytes uploaded and
linked. Each run, each way, the saved file's SHA-256 is checked against the source.

* Chromium (Debian's, driven by Playwright; a fresh profile each run): from the click on
  Download to the download's completion, MB/s. Memory: every Chromium process's peak
  resident set (``VmHWM`` in /proc, the kernel's own high-water mark, read when the
  download completes), the renderers' (the tab's and the service worker's) apart from
  the browser process's, their RSS once the page is ready (before the download), and
  the page's V8 heap (CDP ``Performance.getMetrics``, polled every 100 ms).
* `client.py fetch`: the whole process (start-up included), MB/s, and its peak RSS
  (``wait4``'s ``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from zkbench.localzkfs import client, local_server, register

MiB = 1 << 20
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def chromium_processes() -> list[psutil.Process]:
    """This process's Chromium descendants (through Playwright's driver)."""
    return [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name()]


def peak_rss(proc: psutil.Process) -> int:
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def is_renderer(proc: psutil.Process) -> bool:
    try:
        return "--type=renderer" in proc.cmdline()
    except psutil.Error:
        return False


def browser_run(browser, url: str, size: int, want_sha: str) -> dict:
    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")
        page.goto(url)
        page.wait_for_selector("#save", state="visible")
        ready_rss = {p.pid: p.memory_info().rss for p in chromium_processes() if is_renderer(p)}
        heap = [0]      # polled here between the download's events (Playwright is not thread-safe)
        start = time.perf_counter()
        with page.expect_download(timeout=1800_000) as started:
            page.click("#save")
        download = started.value
        while True:
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            heap[0] = max(heap[0], int(metrics.get("JSHeapTotalSize", 0)))
            if "verified" in page.inner_text("#done") or page.is_visible("#error"):
                break
            page.wait_for_timeout(100)
        path = download.path()               # waits until the browser has written all of it
        seconds = time.perf_counter() - start
        if download.failure() is not None or sha256(Path(path)) != want_sha:
            raise SystemExit(f"the browser's download failed or differs: {download.failure()}")
        procs = chromium_processes()
        renderers = [p for p in procs if is_renderer(p)]
        out = {"seconds": seconds, "mbps": size / seconds / 1e6,
               "renderer_peak": max(peak_rss(p) for p in renderers),
               "renderers_ready": max(ready_rss.values()) if ready_rss else 0,
               "browser_peak": max((peak_rss(p) for p in procs if "--type=" not in " ".join(p.cmdline())),
                                   default=0),
               "all_peak_sum": sum(peak_rss(p) for p in procs), "js_heap_peak": heap[0],
               "renderers": len(renderers), "each": sorted(peak_rss(p) // MiB for p in renderers)}
        Path(path).unlink()
        return out
    finally:
        context.close()


def run(args) -> None:
    from playwright.sync_api import sync_playwright
    work = Path(tempfile.mkdtemp(prefix="zkfs-linkbench-", dir=args.workdir))
    try:
        with local_server(work / "server", {"ZKFS_LINK_FETCHES_PER_MINUTE": "1000000"}) as (_server, url):
            home = work / "home"
            register(home, url)
            rows = [measure(home, work, size_mib, args.runs, sync_playwright) for size_mib in args.sizes]
        print(f"\n{args.runs} runs per size, medians (MB/s) and the highest peaks (MiB):")
        print("| file | upload | `fetch` MB/s | `fetch` peak RSS | page MB/s | tab renderer peak (ready) "
              "| browser process peak | page V8 heap peak |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['size_mib']} MiB | {r['upload']:.1f} s | {r['fetch_mbps']:.0f} | {r['fetch_rss']:.0f} "
                  f"| {r['page_mbps']:.0f} | {r['renderer_peak']:.0f} ({r['renderer_ready']:.0f}) "
                  f"| {r['browser_peak']:.0f} | {r['js_heap']:.1f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(home: Path, work: Path, size_mib: int, runs: int, sync_playwright) -> dict:
    size = size_mib * MiB
    name = f"linked-{size_mib}.bin"
    src = work / name
    with open(src, "wb") as f:
        for _ in range(size_mib // 8):
            f.write(os.urandom(8 * MiB))
        f.write(os.urandom(size % (8 * MiB)))
    want = sha256(src)
    up = client(home, "upload", str(src))[0]
    src.unlink()
    url = client(home, "link", "/" + name)[2].strip()
    fetches = []
    for _ in range(runs):
        dest = work / "fetched.bin"
        seconds, rss, _ = client(home, "fetch", url, "-o", str(dest))
        if sha256(dest) != want:
            raise SystemExit("client.py fetch saved other bytes")
        dest.unlink()
        fetches.append((size / seconds / 1e6, rss))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = [browser_run(browser, url, size, want) for _ in range(runs)]
        finally:
            browser.close()
    row = {"size_mib": size_mib, "upload": up,
           "fetch_mbps": statistics.median(m for m, _ in fetches), "fetch_rss": max(r for _, r in fetches) / MiB,
           "page_mbps": statistics.median(r["mbps"] for r in pages),
           "renderer_peak": max(r["renderer_peak"] for r in pages) / MiB,
           "renderer_ready": max(r["renderers_ready"] for r in pages) / MiB,
           "browser_peak": max(r["browser_peak"] for r in pages) / MiB,
           "js_heap": max(r["js_heap_peak"] for r in pages) / MiB}
    print(f"{size_mib} MiB: fetch runs {[round(m) for m, _ in fetches]} MB/s, page runs "
          f"{[round(r['mbps']) for r in pages]} MB/s, renderers' peaks {[r['each'] for r in pages]} MiB",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="file sizes in MiB, comma-separated (default 256,1024,3072; "
                                                     "64 with --quick)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.sizes = [int(x) for x in (args.sizes or ("64" if args.quick else "256,1024,3072")).split(",")]
    run(args)


if __name__ == "__main__":
    main()
