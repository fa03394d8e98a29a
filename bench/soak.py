"""Long-run and durability-cost measurements of the index (scripts, not CI).

    .venv/bin/python bench/soak.py soak [--minutes 10] [--rate 200] [--json out.json]
    .venv/bin/python bench/soak.py putrate [--seconds 10] [--size 4096]

`soak`: a steady mixed load (PUT 1-64 KB, GET with a sample of redirects followed and checked,
DELETE; the live key count held near 2,000) at a fixed request rate on a local cluster (3
volumes, 3 replicas, 10 subvolumes, 2 index workers). Every 10 s it samples what must stay flat
over a long run: the index processes' resident memory and open files, nginx's memory and open
files, request latency (p50/p99/max of that interval), errors, and whether the clients kept up
with the rate. Prints a table per minute and the first-minute/last-minute comparison.

`putrate`: PUT throughput of fresh keys with and without `-fsync` (fsync'd LMDB commits), with
wrk and a Lua script (16 connections, 4 KB values) against a cluster of 5 volumes, 3 replicas,
10 subvolumes, the index with its default workers; also counts, with strace when it is there,
the sync calls the index makes per PUT. Each mode is measured twice, in the order
default, fsync, fsync, default, so a drift of the machine does not favour either.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import Cluster  # noqa: E402


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def new_root(tag: str, shm: bool = False) -> Path:
    where = "/dev/shm" if shm and os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix=f"minikv-{tag}-", dir=where))
    root.chmod(0o755)  # nginx workers (www-data under root) must reach the volumes
    return root


# ---------------------------------------------------------------- process figures


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def figures(pids: list[int]) -> tuple[int, int, int]:
    """(total RSS in KB, largest single RSS in KB, open files) of these processes."""
    rss = [rss_kb(p) for p in pids]
    return sum(rss), max(rss, default=0), sum(open_files(p) for p in pids)


# ---------------------------------------------------------------- soak


class Soak:
    LIVE_TARGET = 2000

    def __init__(self, cluster: Cluster, rate: float, threads: int = 8):
        self.c = cluster
        self.rate = rate
        self.threads = threads
        self.lock = threading.Lock()
        self.live: list[str] = []
        self.md5: dict[str, str] = {}
        self.seq = 0
        self.t0 = 0.0
        self.stop_at = 0.0
        self.lat: list[float] = []  # this interval's latencies
        self.errors: dict[str, int] = {}
        self.interval_errors = 0
        self.late = 0.0  # how far behind schedule the clients were at worst, this interval
        self.ops = 0

    def _next_slot(self) -> float | None:
        with self.lock:
            t = self.t0 + self.seq / self.rate
            self.seq += 1
        return None if t >= self.stop_at else t

    def worker(self, i: int) -> None:
        rnd = random.Random(i)
        s = requests.Session()
        while (slot := self._next_slot()) is not None:
            wait = slot - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                self.late = max(self.late, -wait)
            try:
                self.one(s, rnd)
            except requests.RequestException as e:
                self._error(f"{type(e).__name__}")
                s.close()

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1
            self.interval_errors += 1

    def one(self, s: requests.Session, rnd: random.Random) -> None:
        with self.lock:
            n = len(self.live)
        r = rnd.random()
        if n < self.LIVE_TARGET * 0.9 or (r < 0.3 and n < self.LIVE_TARGET * 1.1):
            key = f"/soak/{uuid.uuid4().hex}"
            data = os.urandom(rnd.randrange(1 << 10, 64 << 10))
            t = time.monotonic()
            resp = s.put(self.c.url(key), data=data, timeout=30)
            self._done(t, resp, 201, "PUT")
            if resp.status_code == 201:
                with self.lock:
                    self.live.append(key)
                    self.md5[key] = hashlib.md5(data).hexdigest()
        elif r < 0.7 or n <= self.LIVE_TARGET * 0.9:
            with self.lock:
                key = rnd.choice(self.live)
            t = time.monotonic()
            resp = s.get(self.c.url(key), allow_redirects=False, timeout=30)
            self._done(t, resp, 302, "GET")
            if resp.status_code == 302 and rnd.random() < 0.1:  # follow and check a sample
                body = s.get(resp.headers["Location"], timeout=30).content
                if hashlib.md5(body).hexdigest() != self.md5.get(key, hashlib.md5(body).hexdigest()):
                    self._error("GET: wrong bytes")
        else:
            with self.lock:
                if not self.live:
                    return
                key = self.live.pop(rnd.randrange(len(self.live)))
                self.md5.pop(key, None)
            t = time.monotonic()
            resp = s.delete(self.c.url(key), timeout=30)
            self._done(t, resp, 204, "DELETE")

    def _done(self, t: float, resp: requests.Response, want: int, method: str) -> None:
        took = time.monotonic() - t
        with self.lock:
            self.lat.append(took)
            self.ops += 1
        if resp.status_code != want:
            self._error(f"{method} {resp.status_code}")

    def sample(self, elapsed: float) -> dict:
        with self.lock:
            lat, self.lat = sorted(self.lat), []
            errors, self.interval_errors = self.interval_errors, 0
            late, self.late = self.late, 0.0
            ops, self.ops = self.ops, 0
            live = len(self.live)
        index = tree(self.c.index.proc.pid)
        nginx = [p for v in self.c.volumes for p in tree(v.proc.pid)[1:]]  # below `minikv volume`
        i_rss, i_max, i_fds = figures(index)
        n_rss, _, n_fds = figures(nginx)
        mdb = self.c.root / "index" / "data.mdb"

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0

        return {"t": round(elapsed), "ops": ops, "errors": errors, "live_keys": live,
                "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
                "max_ms": round(lat[-1] * 1000 if lat else 0.0, 1), "late_s": round(late, 3),
                "index_procs": len(index), "index_rss_mb": round(i_rss / 1024, 1),
                "index_rss_max_mb": round(i_max / 1024, 1), "index_fds": i_fds,
                "nginx_rss_mb": round(n_rss / 1024, 1), "nginx_fds": n_fds,
                "lmdb_mb": round(mdb.stat().st_size / 2**20, 1) if mdb.exists() else 0}

    def run(self, seconds: float, every: float = 10.0) -> list[dict]:
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + seconds
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.threads)]
        for t in threads:
            t.start()
        samples = []
        nxt = self.t0 + every
        while time.monotonic() < self.stop_at:
            time.sleep(max(0.0, min(nxt, self.stop_at) - time.monotonic()))
            if time.monotonic() >= nxt:
                samples.append(self.sample(time.monotonic() - self.t0))
                log(json.dumps(samples[-1]))
                nxt += every
        for t in threads:
            t.join(60)
        return samples


def per_minute(samples: list[dict]) -> list[dict]:
    rows = []
    for minute in range(0, max((s["t"] for s in samples), default=0) // 60 + 1):
        group = [s for s in samples if minute * 60 < s["t"] <= (minute + 1) * 60]
        if not group:
            continue
        last = group[-1]
        rows.append({
            "minute": minute + 1,
            "req/s": round(sum(s["ops"] for s in group) / (10 * len(group))),
            "errors": sum(s["errors"] for s in group),
            "p50 ms": round(statistics.median(s["p50_ms"] for s in group), 2),
            "p99 ms": round(max(s["p99_ms"] for s in group), 2),
            "max ms": max(s["max_ms"] for s in group),
            "index RSS MB": last["index_rss_mb"], "index fds": last["index_fds"],
            "nginx RSS MB": last["nginx_rss_mb"], "nginx fds": last["nginx_fds"],
            "live keys": last["live_keys"], "LMDB MB": last["lmdb_mb"],
        })
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(out)


def cmd_soak(args) -> int:
    root = new_root("soak")
    c = Cluster(root, volumes=3, replicas=3, subvolumes=10, workers=2).start()
    try:
        soak = Soak(c, args.rate)
        log(f"soak: {args.minutes} min at {args.rate:g} req/s")
        samples = soak.run(args.minutes * 60)
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
    rows = per_minute(samples)
    print(markdown(rows))
    if samples:
        first, last = samples[0], samples[-1]
        print(f"\nindex RSS {first['index_rss_mb']} -> {last['index_rss_mb']} MB, index fds {first['index_fds']} -> "
              f"{last['index_fds']}, nginx RSS {first['nginx_rss_mb']} -> {last['nginx_rss_mb']} MB, nginx fds "
              f"{first['nginx_fds']} -> {last['nginx_fds']}; errors {dict(soak.errors) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rate": args.rate, "minutes": args.minutes, "samples": samples,
                                               "errors": soak.errors}, indent=1))
    return 0 if not soak.errors else 1


# ---------------------------------------------------------------- PUT rate with and without -fsync

PUT_LUA = """
-- each wrk thread PUTs fresh keys PREFIX/<thread>/<n>; counts answers other than 201
local next_id = 0
function setup(thread) thread:set("id", next_id); next_id = next_id + 1 end
local n = 0
local body = string.rep("v", tonumber(os.getenv("PUT_SIZE") or "4096"))
local prefix = os.getenv("PUT_PREFIX") or "/put"
bad = 0
function request()
   n = n + 1
   return wrk.format("PUT", string.format("%s/%d/%d", prefix, id, n), {}, body)
end
function response(status) if status ~= 201 then bad = bad + 1 end end
"""


def wrk_puts(url: str, seconds: int, size: int, lua: Path) -> dict:
    env = {**os.environ, "PUT_SIZE": str(size), "PUT_PREFIX": f"/put-{uuid.uuid4().hex[:8]}"}
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, env=env, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)

    def latency(q: str) -> str:
        m = re.search(rf"^\s*{q}%\s+(\S+)", out, re.M)
        return m.group(1) if m else "?"

    return {"rps": rps, "p50": latency("50"), "p99": latency("99"),
            "errors": int(non2xx.group(1)) if non2xx else 0}


def sync_calls_per_put(c: Cluster, puts: int = 50) -> float | None:
    """fsync/fdatasync/msync calls the index makes per PUT (strace), None without strace."""
    if not shutil.which("strace") or os.geteuid() != 0:
        return None
    pids = tree(c.index.proc.pid)
    out = Path(tempfile.mktemp(prefix="minikv-strace-"))
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,msync,sync_file_range",
                               "-o", str(out), *sum((["-p", str(p)] for p in pids), [])],
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    s = requests.Session()
    for _ in range(puts):
        s.put(c.url(f"/strace/{uuid.uuid4().hex}"), data=b"v" * 100)
    tracer.send_signal(signal.SIGINT)  # our own strace: detach, print the summary
    tracer.wait(10)
    text = out.read_text()
    out.unlink()
    calls = sum(int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?\w+$",
                                                      text, re.M))
    return calls / puts


def cmd_putrate(args) -> int:
    lua = Path(tempfile.mktemp(suffix=".lua", prefix="minikv-put-"))
    lua.write_text(PUT_LUA)
    results: dict[str, list[dict]] = {"default": [], "-fsync": []}
    syncs: dict[str, float | None] = {}
    try:
        for mode in ("default", "-fsync", "-fsync", "default"):
            # volumes on tmpfs, the index on disk: what is measured is the index's commits, not
            # the disk writeback of the values (which made runs of one mode differ 4x)
            root = new_root("putrate", shm=True)
            db = new_root("putrate-db")
            workers = os.cpu_count() or 1
            c = Cluster(root, volumes=5, replicas=3, subvolumes=10, workers=workers,
                        flags=["-db", str(db)] + ([] if mode == "default" else ["-fsync"])).start()
            try:
                time.sleep(1)
                if mode not in syncs:
                    syncs[mode] = sync_calls_per_put(c)
                r = wrk_puts(c.url("/"), args.seconds, args.size, lua)
                log(f"{mode}: {r}")
                results[mode].append(r)
            finally:
                c.stop()
                shutil.rmtree(root, ignore_errors=True)
                shutil.rmtree(db, ignore_errors=True)
    finally:
        lua.unlink()
    print("| index | PUT req/s (two runs) | mean | p50 | p99 | errors | sync calls per PUT |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        mean = statistics.mean(r["rps"] for r in runs)
        sc = syncs.get(mode)
        rates = " / ".join(f"{r['rps']:,.0f}" for r in runs)
        print(f"| {mode} | {rates} | {mean:,.0f} | "
              f"{runs[0]['p50']} / {runs[1]['p50']} | {runs[0]['p99']} / {runs[1]['p99']} | "
              f"{sum(r['errors'] for r in runs)} | {'?' if sc is None else f'{sc:.1f}'} |")
    d = statistics.mean(r["rps"] for r in results["default"])
    f = statistics.mean(r["rps"] for r in results["-fsync"])
    print(f"\n-fsync keeps {f / d:.0%} of the default PUT rate")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("soak", help="steady mixed load; memory, files and latency over time")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--rate", type=float, default=200, help="requests per second")
    p.add_argument("--json")
    p = sub.add_parser("putrate", help="PUT throughput with and without -fsync")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: finally stops what we started
    return cmd_soak(args) if args.cmd == "soak" else cmd_putrate(args)


if __name__ == "__main__":
    sys.exit(main())
