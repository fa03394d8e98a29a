"""Figures for the admin commands: how fast `minikv rebuild` and `minikv rebalance` go through
100,000 small keys on a local 5-volume cluster (3 replicas, 10 subvolumes), and the peak RSS of
the admin process doing it.

    .venv/bin/python bench/admin.py [--keys 100000] [--concurrency 16] [--out BENCHMARKS.md]

Steps, all on loopback in a fresh folder under /tmp: start 5 `minikv volume`s and a `minikv
server`; PUT the keys (1 KB each) through the index, many at once; stop the index; `rebuild`
into a new index; `rebalance` offline after dropping one volume (5 → 4); start the index on 4
volumes and `verify`; then start it on all 5 and `rebalance -server` online back to 5. Each
admin command runs as its own process and its peak RSS comes from wait4(). Everything is
stopped by process group at the end, whatever happened.

--out writes the table into the file between `<!-- admin:begin -->` and `<!-- admin:end -->`
below the `<!-- notes -->` line (creating either when missing): bench/run.py rewrites what is
above that line and keeps what is below.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minikv.http.client import Pool  # noqa: E402

HOST = "127.0.0.1"
N_VOLUMES = 5
REPLICAS = 3
SUBVOLUMES = 10
VALUE = b"v" * 1024
NOTES = "<!-- notes -->"
BEGIN, END = "<!-- admin:begin -->", "<!-- admin:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not listen on {port} within {timeout}s")


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.ports = [free_port() for _ in range(N_VOLUMES)]
        self.names = [f"{HOST}:{p}" for p in self.ports]
        self.port = free_port()
        self.index: subprocess.Popen | None = None
        self.db = tmp / "index"

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "minikv", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def start_volumes(self) -> None:
        vols = [self.spawn(["volume", "-host", HOST, "-port", str(p), str(self.tmp / f"vol{i}")], f"vol{i}.log")
                for i, p in enumerate(self.ports)]
        for proc, port in zip(vols, self.ports):
            wait_port(port, proc, "a volume")

    def start_index(self, volumes: list[str]) -> None:
        self.index = self.spawn(["server", "-host", HOST, "-port", str(self.port), "-volumes", ",".join(volumes),
                                 "-db", str(self.db), "-replicas", str(REPLICAS),
                                 "-subvolumes", str(SUBVOLUMES)], "index.log")
        wait_port(self.port, self.index, "the index")

    def stop_index(self) -> None:
        if self.index is not None:
            stop_group(self.index)
            self.index = None

    def stop(self) -> None:
        for proc in self.procs:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


async def write_keys(port: int, n: int, concurrency: int) -> float:
    """PUT n keys through the index, `concurrency` at once on keep-alive connections; keys/s."""
    pool = Pool(timeout=30.0, max_idle=concurrency)
    host = f"{HOST}:{port}"
    todo = iter(range(n))
    failed = []

    async def worker() -> None:
        for i in todo:
            resp = await pool.request(host, "PUT", f"/bench/{i:07d}", VALUE)
            if resp.status != 201:
                failed.append((i, resp.status, resp.body[:200]))

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    pool.close()
    if failed:
        raise SystemExit(f"bench: {len(failed)} PUTs failed, first: {failed[0]}")
    return n / elapsed


def sample_memory(pid: int, peak: dict, done: threading.Event) -> None:
    """Track the peak anonymous and file-backed RSS (kB) of a process (the LMDB map is file-backed:
    the pages of the index a command reads count in its RSS, but they are the page cache), and
    as "child RssAnon" / "child RssFile" the largest of its children's (a walk's part processes)."""
    while not done.is_set():
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            children = []
        for who, prefix in ((pid, ""), *((c, "child ") for c in children)):
            try:
                with open(f"/proc/{who}/status") as f:
                    text = f.read()
            except OSError:
                if who == pid:
                    return
                continue
            for line in text.splitlines():
                if line.startswith(("RssAnon:", "RssFile:")):
                    name, value = line.split(":", 1)
                    name = prefix + name
                    peak[name] = max(peak.get(name, 0), int(value.split()[0]))
        time.sleep(0.02)


def run_admin(argv: list[str]) -> dict:
    """Run one admin command; its exit code, wall time, peak RSS (MB) and summary line."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "minikv", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, cwd=ROOT)
    peak: dict = {}
    done = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    try:
        stderr = proc.stderr.read().decode(errors="replace")
    except BaseException:  # interrupted: the command goes with us
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        done.set()
        sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    summary = next((line for line in stderr.splitlines() if re.match(r"^\w+: \d+ ", line)), "")
    if proc.returncode != 0:
        raise SystemExit(f"bench: `minikv {' '.join(argv[:1])}` exited {proc.returncode}:\n{stderr[-3000:]}")
    return {"seconds": elapsed, "rss_mb": usage.ru_maxrss / 1024, "anon_mb": peak.get("RssAnon", 0) / 1024,
            "summary": summary}


def count(summary: str, label: str) -> int:
    m = re.search(r"(\d+) " + re.escape(label), summary)
    return int(m.group(1)) if m else 0


def machine() -> str:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().removeprefix("nginx version: ")
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"Linux {platform.release()}, Python {platform.python_version()}, {nginx}")


def table(n: int, concurrency: int, put_rate: float, results: dict) -> str:
    rows = []
    for name, what in (("rebuild", "rebuild (5 volumes → new index)"),
                       ("rebalance", "rebalance offline, 5 → 4 volumes"),
                       ("verify", "verify, 4 volumes (HEAD of every replica + orphan walk)"),
                       ("online", "rebalance online (`-server`), 4 → 5 volumes")):
        r = results[name]
        moved = count(r["summary"], "moved")
        extra = f", {moved:,} moved ({moved / r['seconds']:,.0f} moves/s)" if name in ("rebalance", "online") else ""
        rows.append(f"| {what} | {r['seconds']:.1f} s | {n / r['seconds']:,.0f} keys/s{extra} | "
                    f"{r['rss_mb']:.0f} MB | {r['anon_mb']:.0f} MB |")
    return "\n".join([
        BEGIN,
        "## Admin commands: rebuild, rebalance, verify",
        "",
        f"{n:,} keys of 1 KB on a local cluster of {N_VOLUMES} volumes ({REPLICAS} replicas, {SUBVOLUMES} "
        f"subvolumes), `-concurrency {concurrency}`; keys/s counts every key the command went through. "
        "Peak RSS is the admin process's own (wait4 ru_maxrss); it includes the pages of the LMDB "
        f"file the command touched (file-backed, the page cache: the index is {results['db_mb']:.0f} MB "
        "here), so the anonymous part (sampled from /proc every 20 ms) is the process's own memory. "
        "Written by "
        f"`.venv/bin/python bench/admin.py --keys {n} --out BENCHMARKS.md` ({machine()}).",
        "",
        "| command | time | rate | peak RSS | of which anonymous |",
        "|---|---|---|---|---|",
        f"| PUT through the index (for scale) | {n / put_rate:.1f} s | {put_rate:,.0f} keys/s | | |",
        *rows,
        "",
        "Summaries printed by the commands:",
        "",
        *[f"- `{results[k]['summary']}`" for k in ("rebuild", "rebalance", "verify", "online")],
        "",
        "Notes: rebuild lists every `<aa>/<bb>` folder of every subvolume (about one listing per file "
        "at this size), so its rate is bound by nginx's JSON listings and our parsing of them. A move "
        "is a streamed GET → PUT between volumes, three compare-and-sets on the record and a DELETE "
        "of the old copy one second later (admin/move.py: readers redirected just before the switch "
        "still find it). What bounds the process's own memory: records are read 1,000 per LMDB "
        "transaction, the walk holds one folder per worker, a value is never held whole, and old "
        "copies waiting their second before deletion are one small task each (moves/s of them). "
        "On a small machine shared with other work, rates move between runs: compare runs made "
        "side by side.",
        END,
    ])


def publish(path: Path, section: str) -> None:
    """Put `section` between its markers (its first and last lines) below the notes marker of
    `path`, in place of the same section of an earlier run (bench/scale.py uses it too)."""
    begin, end = section.splitlines()[0], section.splitlines()[-1]
    text = path.read_text() if path.exists() else ""
    if NOTES not in text:
        text = text.rstrip("\n") + ("\n\n" if text else "") + NOTES + "\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", type=Path)
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: finally stops what we started
    tmp = Path(tempfile.mkdtemp(prefix="minikv-bench-admin-", dir="/tmp"))
    tmp.chmod(0o755)  # nginx workers run as www-data when we are root
    cluster = Cluster(tmp)
    results: dict = {}
    try:
        cluster.start_volumes()
        cluster.start_index(cluster.names)
        print(f"bench: writing {opts.keys:,} keys ...", file=sys.stderr)
        put_rate = asyncio.run(write_keys(cluster.port, opts.keys, 64))
        print(f"bench: {put_rate:,.0f} PUT/s", file=sys.stderr)
        cluster.stop_index()
        common = ["-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), "-concurrency", str(opts.concurrency)]
        rebuilt = tmp / "rebuilt"
        results["rebuild"] = run_admin(["rebuild", "-volumes", ",".join(cluster.names), "-db", str(rebuilt), *common])
        print(f"bench: {results['rebuild']['summary']}", file=sys.stderr)
        results["db_mb"] = sum(f.stat().st_size for f in rebuilt.glob("*.mdb")) / 2**20
        four = cluster.names[:4]
        results["rebalance"] = run_admin(["rebalance", "-volumes", ",".join(four), "-db", str(rebuilt), *common])
        print(f"bench: {results['rebalance']['summary']}", file=sys.stderr)
        cluster.db = rebuilt
        cluster.start_index(four)
        results["verify"] = run_admin(["verify", "-volumes", ",".join(four), "-db", str(rebuilt), *common])
        print(f"bench: {results['verify']['summary']}", file=sys.stderr)
        cluster.stop_index()
        cluster.start_index(cluster.names)
        results["online"] = run_admin(["rebalance", "-server", f"{HOST}:{cluster.port}",
                                       "-concurrency", str(opts.concurrency)])
        print(f"bench: {results['online']['summary']}", file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    section = table(opts.keys, opts.concurrency, put_rate, results)
    print(section)
    if opts.out:
        publish(opts.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
