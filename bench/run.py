"""Benchmark minikv's index server against nginx, measured in the same run.

Starts a private cluster on free loopback ports in a temp dir (5 `minikv volume` servers and one
`minikv server` with 3 replicas and 10 subvolumes) and measures the figures of DESIGN.md
"Performance method". Every figure is taken next to an nginx reference measured moments apart
on the same machine, so the ratios hold up on a small, noisy machine where absolute numbers don't.
Each side of a ratio is measured twice in mirrored order (nginx, index, index, nginx): 2 x 5 s
of wrk, which is the design's 10 s per figure.

    .venv/bin/python bench/run.py [--quick] [--out BENCHMARKS.md]

--quick runs wrk 2 x 3 s per side and PUTs a 64 MB file instead of 256 MB (smoke runs).
--metrics runs the index with its operations listener (-metrics-port) and scrapes /metrics every
second: an A/B against a run without it shows what seeing the cluster costs the request path.
--postgres adds the index on PostgreSQL in the same run (a PostgreSQL of the run's own, pg_local.py,
on the same volumes): the fetches and thrash through one index server, then through two on the
same database (two wrk processes at once, one per server, rates added), and `minikv rebuild` of
100,000 keys' files into PostgreSQL (and into LMDB, for reference). --no-big skips the big PUT
and S3 figures.
--out rewrites the file with the command, the table and the machine; whatever follows the line
`<!-- notes -->` in the old file is kept, so notes written by people survive reruns.
Exit status: 0 when every measurement ran and checked out (targets missed are results, not
failures), 1 when a check failed (wrong status codes, thrash errors, md5 mismatch), 2 on usage.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
THRASH_LUA = BENCH_DIR / "thrash.lua"
NOTES_MARKER = "<!-- notes -->"

N_VOLUMES = 5
REPLICAS = 3
SUBVOLUMES = 10
SMALL_BODY = b"x" * 1024
HOST = "127.0.0.1"


class BenchError(Exception):
    """A measurement could not be made or its result is wrong: the run stops."""


def minikv_bin() -> str:
    # The venv that runs this script is the one minikv is installed in.
    here = Path(sys.executable).parent / "minikv"
    if here.exists():
        return str(here)
    found = shutil.which("minikv")
    if not found:
        raise BenchError("cannot find the minikv command (run with .venv/bin/python)")
    return found


def _scrape(port: int) -> None:
    """A scraper far keener than Prometheus's usual 15 s, for the whole run (a daemon thread)."""
    while True:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
                resp.read()
        except OSError:
            pass
        time.sleep(1.0)


def free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is picked so the kernel can't hand out one twice.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10.0):
    """One request without following redirects; returns (status, headers, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def expect_status(port: int, method: str, path: str, want: int, body: bytes | None = None):
    status, headers, data = http_request(port, method, path, body)
    if status != want:
        raise BenchError(
            f"{method} http://{HOST}:{port}{path}: got {status}, want {want}: {data[:200]!r}"
        )
    return headers


# --- the cluster -------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int


@dataclass
class Cluster:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    volume_ports: list[int] = field(default_factory=list)
    index_port: int = 0
    index_names: tuple[str, ...] = ("index",)  # the processes whose CPU is the index's
    extra_roots: list[int] = field(default_factory=list)  # more of them, started elsewhere (PostgreSQL)
    metrics: bool = False  # --metrics: the index runs its operations listener, scraped every second

    def start(self, name: str, argv: list[str], port: int) -> Proc:
        log = self.tmp / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            # Own session = own process group, so stop() reaches nginx and forked workers too.
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.tmp, start_new_session=True,
            )
        proc = Proc(name, popen, log, port)
        self.procs.append(proc)
        return proc

    def up(self) -> None:
        exe = minikv_bin()
        ports = free_ports(N_VOLUMES + 2)
        self.volume_ports, self.index_port = ports[:N_VOLUMES], ports[N_VOLUMES]
        extra = ["-metrics-port", str(ports[-1])] if self.metrics else []
        for i, port in enumerate(self.volume_ports):
            vdir = self.tmp / f"volume{i}"
            vdir.mkdir()
            self.start(f"volume{i}", [exe, "volume", "-host", HOST, "-port", str(port), str(vdir)], port)
        for proc in self.procs:
            wait_http(proc, timeout=20)
        volumes = ",".join(f"{HOST}:{p}" for p in self.volume_ports)
        index = self.start("index", [
            exe, "server", "-host", HOST, "-port", str(self.index_port), "-volumes", volumes,
            "-db", str(self.tmp / "index"), "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), *extra,
        ], self.index_port)
        wait_http(index, timeout=30)
        if self.metrics:
            threading.Thread(target=_scrape, args=(ports[-1],), daemon=True).start()

    @property
    def index(self) -> Proc:
        return next(p for p in self.procs if p.name == "index")

    def stop(self) -> None:
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Whatever is still in a group (a stuck leader, an orphaned nginx worker) goes now.
        for proc in self.procs:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                print(f"bench: warning: {proc.name} (pid {proc.popen.pid}) did not exit", file=sys.stderr)


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)  # start_new_session: the pgid is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(proc: Proc, lines: int = 20) -> str:
    try:
        return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(proc: Proc, timeout: float) -> None:
    """Wait until the port answers HTTP (any status); fail early if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} before answering on port "
                f"{proc.port}; log {proc.log}:\n{log_tail(proc)}"
            )
        try:
            http_request(proc.port, "GET", "/bench-probe-not-a-key", timeout=2)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not answer on port {proc.port} within {timeout:.0f}s:\n"
                             f"{log_tail(proc)}")
        time.sleep(0.1)


# --- processes of the index, for RSS ------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """pid and all its descendants, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm (field 2) may hold spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def peak_rss_mb(pids: list[int]) -> dict[int, float]:
    """VmHWM (peak resident set) of each process, in MB."""
    peaks = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.M)
        if m:
            peaks[pid] = int(m.group(1)) / 1024
    return peaks


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of the living processes among `pids` (all their threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def children_cpu() -> float:
    """CPU time of this script's finished children (wrk, curl)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class CpuUse:
    """CPU-seconds spent by each part of the machine during some measurements."""
    nginx: float = 0.0  # every volume: `minikv volume` and its nginx processes
    index: float = 0.0  # `minikv server` and its workers
    client: float = 0.0  # wrk or curl
    wall: float = 0.0

    def add(self, other: CpuUse) -> None:
        self.nginx += other.nginx
        self.index += other.index
        self.client += other.client
        self.wall += other.wall


def measure_cpu(cluster: Cluster, action: Callable[[], object]) -> tuple[object, CpuUse]:
    """Run `action` (which runs one client process) and say where the CPU went meanwhile."""
    volumes = [pid for p in cluster.procs if p.name.startswith("volume") for pid in descendants(p.popen.pid)]
    index = [pid for p in cluster.procs if p.name in cluster.index_names for pid in descendants(p.popen.pid)]
    index += [pid for root in cluster.extra_roots for pid in descendants(root)]
    before = (cpu_seconds(volumes), cpu_seconds(index), children_cpu(), time.perf_counter())
    result = action()
    after = (cpu_seconds(volumes), cpu_seconds(index), children_cpu(), time.perf_counter())
    return result, CpuUse(*(b - a for a, b in zip(before, after)))


# --- wrk ---------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    extra: dict[str, str]
    output: str
    slices: list[float] = field(default_factory=list)  # req/s of each wrk run merged in here

    @property
    def socket_error_total(self) -> int:
        return sum(self.socket_errors.values())


def ratio_text(ratio: float, target: float) -> str:
    """`ratio` to two decimals, or three when two would show it equal to `target` while it
    is not (0.118 against 0.12 showed as "0.12×" beside a "no")."""
    text = f"{ratio:.2f}"
    if float(text) == target and ratio != target:
        text = f"{ratio:.3f}"
    return text + "×"


def parse_wrk(text: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(r"Socket errors:\s*connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock:
        socket_errors = dict(zip(socket_errors, map(int, sock.groups()), strict=True))
    # Lines the Lua script's done() prints: "thrash_<name> <value>"
    extra = dict(re.findall(r"^(thrash_\w+)[ \t]*(.*)$", text, re.M))
    return WrkResult(float(rps.group(1)), int(total.group(1)), int(non.group(1)) if non else 0,
                     socket_errors, extra, text, [float(rps.group(1))])


def merge(runs: list[WrkResult]) -> WrkResult:
    """One result from wrk runs of equal length: mean rate, summed counters."""
    extra: dict[str, str] = {}
    for key in ("thrash_errors", "thrash_loops"):
        if all(key in r.extra for r in runs):
            extra[key] = str(sum(int(r.extra[key]) for r in runs))
    bad = " ".join(r.extra["thrash_bad"].strip() for r in runs if r.extra.get("thrash_bad"))
    if bad:
        extra["thrash_bad"] = bad
    return WrkResult(
        rps=sum(r.rps for r in runs) / len(runs),
        requests=sum(r.requests for r in runs),
        non_2xx_3xx=sum(r.non_2xx_3xx for r in runs),
        socket_errors={k: sum(r.socket_errors[k] for r in runs) for k in runs[0].socket_errors},
        extra=extra,
        output="\n".join(r.output for r in runs),
        slices=[x for r in runs for x in r.slices],
    )


def interleaved(runs: dict[str, Callable[[], WrkResult]]) -> dict[str, WrkResult]:
    """Run each measurement twice, in the order A B .. B A, and merge each pair.

    Load from other work on the machine comes in bursts of seconds; measured back to back, one
    side of a ratio can catch a burst the other side misses. Mirrored halves spread any drift
    over both sides evenly.
    """
    order = [*runs, *reversed(runs)]
    done: dict[str, list[WrkResult]] = {}
    for name in order:
        done.setdefault(name, []).append(runs[name]())
    return {name: merge(results) for name, results in done.items()}


def wrk(url: str, duration: int, threads: int, conns: int, script: list[str] | None = None,
        headers: tuple[str, ...] = ()) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s"]
    for header in headers:
        argv += ["-H", header]
    if script:
        argv += ["-s", script[0], url, "--", *script[1:]]
    else:
        argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish: {shlex.join(argv)}") from e
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {shlex.join(argv)}\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def wrk_many(urls: list[str], duration: int, threads: int, conns: int,
             script: list[str] | None = None, headers: tuple[str, ...] = ()) -> WrkResult:
    """wrk on each URL at once, the threads and connections split between them; rates added."""
    if len(urls) == 1:
        return wrk(urls[0], duration, threads, conns, script, headers)
    n = len(urls)
    found: list = [None] * n

    def one(i: int) -> None:
        # each wrk its own key prefix: their Lua counters start alike
        mine = script and [*script[:-1], f"{script[-1]}-{i}"]
        try:
            found[i] = wrk(urls[i], duration, max(1, threads // n), max(1, conns // n), mine, headers)
        except BenchError as e:
            found[i] = e

    runs = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    for r in found:
        if isinstance(r, BenchError):
            raise r
    total = merge(found)
    total.rps = sum(r.rps for r in found)
    total.slices = [total.rps]
    return total


# --- the figures -------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    minikv: str
    reference: str
    ratio: str
    target: str
    met: str


@dataclass
class Bench:
    cluster: Cluster
    slice_secs: int  # each side of a ratio gets two wrk runs of this length
    big_mb: int
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    data_dir: str = ""
    notes: list[str] = field(default_factory=list)
    bounds: list[str] = field(default_factory=list)  # what limits the figures, measured in this run

    def check_fetch(self, name: str, res: WrkResult, all_errors: bool) -> None:
        # wrk counts every status >= 400 as "Non-2xx or 3xx": all of them for a 404 figure,
        # none of them for a 200/302 figure.
        want = res.requests if all_errors else 0
        if res.non_2xx_3xx != want:
            self.problems.append(f"{name}: {res.non_2xx_3xx} of {res.requests} responses were >= 400, "
                                 f"expected {want}")
        if res.socket_error_total:
            self.notes.append(f"{name}: socket errors {res.socket_errors}")

    def fetch(self, ports: list[int] | None = None, label: str = "", targets=(1.0, 0.8)) -> None:
        """`ports`: the index servers to measure together (default: the LMDB index)."""
        c = self.cluster
        vol = c.volume_ports[0]
        ports = ports or [c.index_port]
        ip = ports[0]
        # Check by hand what wrk will hit, so a rate is never a rate of wrong answers.
        expect_status(ip, "GET", "/bench-missing", 404)
        expect_status(vol, "GET", "/bench/missing", 404)
        if label and http_request(ip, "GET", "/bench-present")[0] == 302:
            pass  # stored by the previous set, on the same index
        else:
            expect_status(ip, "PUT", "/bench-present", 201, SMALL_BODY)
        for port in ports:
            expect_status(port, "GET", "/bench-missing", 404)
            if not expect_status(port, "GET", "/bench-present", 302).get("Location", ""):
                raise BenchError("GET of a stored key: 302 without Location")
        if not label:  # the next sets of figures find it there
            expect_status(vol, "PUT", "/bench/present", 201, SMALL_BODY)
        expect_status(vol, "GET", "/bench/present", 200)

        # A short first run so the index's workers are warm before anything counts.
        wrk_many([f"http://{HOST}:{p}/bench-missing" for p in ports], 1, 2, 100)

        d = self.slice_secs
        res = interleaved({
            "nginx 404": lambda: wrk(f"http://{HOST}:{vol}/bench/missing", d, 2, 100),
            "nginx 200": lambda: wrk(f"http://{HOST}:{vol}/bench/present", d, 2, 100),
            "fetch missing": lambda: wrk_many([f"http://{HOST}:{p}/bench-missing" for p in ports], d, 2, 100),
            "fetch present": lambda: wrk_many([f"http://{HOST}:{p}/bench-present" for p in ports], d, 2, 100),
        })
        ref404, ref200, missing, present = (res[k] for k in ("nginx 404", "nginx 200", "fetch missing",
                                                             "fetch present"))
        for name, r in res.items():
            self.check_fetch(name, r, all_errors="404" in name or "missing" in name)
            self.notes.append(f"{label}{name}: " + " / ".join(f"{x:,.0f}" for x in r.slices) + " req/s per run")

        self.add_rate(f"{label}fetch missing (404)", missing, ref404, "nginx 404", targets[0])
        self.add_rate(f"{label}fetch present (302)", present, ref404, "nginx 404", targets[1])
        if not label:
            self.rows.append(Row("nginx present file (200), for information", "",
                                 f"{ref200.rps:,.0f} req/s", "", "", ""))

    def add_rate(self, figure: str, res: WrkResult, ref: WrkResult, what: str, target: float) -> None:
        ratio = res.rps / ref.rps
        self.rows.append(Row(figure, f"{res.rps:,.0f} req/s", f"{ref.rps:,.0f} req/s ({what})",
                             ratio_text(ratio, target), f"≥ {target:g}×", "yes" if ratio >= target else "**no**"))

    def thrash(self, ports: list[int] | None = None, label: str = "", target: float = 0.35) -> None:
        c = self.cluster
        d = self.slice_secs
        ports = ports or [c.index_port]

        cpu = {"nginx": CpuUse(), "index": CpuUse(), "replicas": CpuUse()}

        def run(port: int | list[int], mode: str) -> WrkResult:
            # A fresh token per wrk run: the Lua counters restart at 0, the keys must not.
            token = secrets.token_hex(4)
            urls = [f"http://{HOST}:{p}" for p in (port if isinstance(port, list) else [port])]
            # -t16 -c16: one connection per wrk thread, so each Lua state runs one sequential loop.
            res, use = measure_cpu(c, lambda: wrk_many(urls, d, 16, 16, [str(THRASH_LUA), mode, f"/thrash/{token}"]))
            cpu[mode].add(use)
            return res

        both = interleaved({
            "thrash nginx": lambda: run(c.volume_ports[0], "nginx"),
            "thrash index": lambda: run(ports, "index"),
            # not a figure: what the index's loop costs nginx, for the bound below
            "thrash replicas": lambda: run(c.volume_ports[0], "replicas"),
        })
        rep = both.pop("thrash replicas")
        if rep.extra.get("thrash_errors") != "0" or rep.socket_error_total:
            self.problems.append(f"thrash replicas (for the bound): {rep.extra.get('thrash_bad', '')[:120]}, "
                                 f"socket errors {rep.socket_errors}")
        ref, idx = both["thrash nginx"], both["thrash index"]
        errs = {}
        for name, res in both.items():
            self.notes.append(f"{label}{name}: " + " / ".join(f"{x:,.0f}" for x in res.slices) + " req/s per run")
            if "thrash_errors" not in res.extra:
                raise BenchError(f"{name}: the Lua script printed no counters:\n{res.output}")
            errs[name] = int(res.extra["thrash_errors"]) + res.socket_error_total
            if errs[name]:
                self.problems.append(
                    f"{name}: {res.extra['thrash_errors']} unexpected statuses "
                    f"({res.extra.get('thrash_bad', '').strip()[:120]}), socket errors {res.socket_errors}")
        ratio = idx.rps / ref.rps
        ok = ratio >= target and errs["thrash index"] == 0
        self.thrash_bound(cpu, *(int(r.extra.get("thrash_loops", 0)) for r in (ref, idx, rep)), label=label)
        self.rows.append(Row(
            f"{label}thrash: PUT+GET+DELETE, 16 conns",
            f"{idx.rps:,.0f} req/s, {errs['thrash index']} errors",
            f"{ref.rps:,.0f} req/s, {errs['thrash nginx']} errors",
            ratio_text(ratio, target), f"≥ {target:g}×, 0 errors", "yes" if ok else "**no**"))

    def thrash_bound(self, cpu: dict[str, CpuUse], ref_loops: int, idx_loops: int, rep_loops: int,
                     label: str = "") -> None:
        """How far the thrash ratio could go at all, from the CPU each part spends per loop.

        Both loops keep the cores busy, so loops/s go as 1 / (CPU-seconds per loop). With an
        index that cost nothing, a loop through it would still cost what nginx spends on the
        index's six requests (measured straight, `thrash.lua replicas`: PUT three files, DELETE
        them) plus what wrk spends on its three requests (as in the direct loop)."""
        if not (ref_loops and idx_loops and rep_loops):
            return
        ref, idx, reps = cpu["nginx"], cpu["index"], cpu["replicas"]
        cores = len(os.sched_getaffinity(0))
        us = 1e6
        direct = (ref.nginx + ref.client) / ref_loops
        six = reps.nginx / rep_loops
        wrk3 = ref.client / ref_loops
        own = idx.index / idx_loops
        self.bounds += [
            f"{label}thrash, CPU per loop in µs: straight to nginx (PUT, GET, DELETE), nginx {ref.nginx / ref_loops * us:.0f}"
            f" + wrk {wrk3 * us:.0f} = {direct * us:.0f}; through the index, nginx "
            f"{idx.nginx / idx_loops * us:.0f} + wrk {idx.client / idx_loops * us:.0f} + the index {own * us:.0f} "
            f"(the cores were {(ref.nginx + ref.client) / (ref.wall * cores):.0%} and "
            f"{(idx.nginx + idx.client + idx.index) / (idx.wall * cores):.0%} busy with these processes); "
            f"the index's six requests straight to nginx (3 PUTs, 3 DELETEs) cost nginx {six * us:.0f}.",
            f"{label}thrash ceiling: with an index that cost nothing, a loop would still cost nginx's {six * us:.0f} + "
            f"wrk's {wrk3 * us:.0f} µs: at most {direct / (six + wrk3):.2f}× the direct loop "
            f"({direct / ((idx.nginx + idx.client) / idx_loops):.2f}× at the costs seen under the index's own "
            f"run, where everything is slower for sharing the cores with more processes). 0.35× needs the "
            f"index at {max(0.0, direct / 0.35 - six - wrk3) * us:.0f} µs of CPU per loop or less "
            f"(3 answers, 6 requests, 4 index writes); it takes {own * us:.0f} µs.",
        ]

    def big_put_bound(self, cpu: dict[str, CpuUse], path: Path, n_ref: int, n_idx: int, ref_secs: float,
                      three_times: list[float]) -> None:
        """How fast a 3-replica PUT could be on this machine at all: the replicas' nginx work and
        the md5 of the value must both be done, on the same cores, whatever the index does. The
        replicas' share is measured as three curls PUTting straight to three volumes at once."""
        cores = len(os.sched_getaffinity(0))
        ref, idx, three = cpu["nginx"], cpu["index"], cpu["three"]
        md5 = md5_cpu_seconds(path)
        replicas = three.nginx / len(three_times)
        floor = (replicas + md5) / cores
        own = idx.index / n_idx - md5
        budget = 2 * ref_secs * cores - replicas - md5 - ref.client / n_ref
        self.bounds += [
            f"big PUT, CPU-seconds per PUT: straight to nginx, nginx {ref.nginx / n_ref:.2f} + curl "
            f"{ref.client / n_ref:.2f} (it took {ref_secs:.2f} s); {REPLICAS} curls straight to {REPLICAS} volumes "
            f"at once, nginx {replicas:.2f} (they took {statistics.median(three_times):.2f} s: "
            f"{statistics.median(three_times) / ref_secs:.2f}× the reference); through the index, nginx "
            f"{idx.nginx / n_idx:.2f} + curl {idx.client / n_idx:.2f} + the index {idx.index / n_idx:.2f}, "
            f"of which the md5 of {self.big_mb} MB is {md5:.2f} (OpenSSL, measured here on one thread).",
            f"big PUT floor: the replicas' nginx work and the md5 alone need {replicas + md5:.2f} CPU-seconds, "
            f"at least {floor:.2f} s on {cores} cores: {floor / ref_secs:.2f}× the reference PUT if the index "
            f"and curl cost nothing. 2× leaves the index {max(0.0, budget):.2f} CPU-seconds besides the md5 "
            f"(receiving the value once, sending it {REPLICAS} times, with curl sending it once); it takes "
            f"{own:.2f}. And an md5 cannot be split across cores: hashing the value takes {md5:.2f} s "
            f"on one, {md5 / ref_secs:.2f}× the reference PUT on its own.",
        ]

    def big_put(self) -> None:
        c = self.cluster
        path = c.tmp / "big.bin"
        want = random_file(path, self.big_mb)

        cpu = {"nginx": CpuUse(), "index": CpuUse(), "three": CpuUse()}

        def put_three(n: int) -> float:
            """Not a figure: the replicas' share of an index PUT, as one curl per replica straight
            to its own volume, all at once (what an index that cost nothing would leave)."""
            urls = [f"http://{HOST}:{port}/bench/three{n}" for port in c.volume_ports[:REPLICAS]]
            secs, use = measure_cpu(c, lambda: curl_put_many(path, urls))
            cpu["three"].add(use)
            for port in c.volume_ports[:REPLICAS]:
                http_request(port, "DELETE", f"/bench/three{n}")
            return secs

        def put_nginx(n: int) -> float:
            secs, use = measure_cpu(c, lambda: curl_put(path, f"http://{HOST}:{c.volume_ports[0]}/bench/big{n}"))
            cpu["nginx"].add(use)
            # deleted at once, on both sides, so every PUT starts with the same free memory
            http_request(c.volume_ports[0], "DELETE", f"/bench/big{n}")
            return secs

        peaks: dict[int, float] = {}

        def put_index(n: int) -> float:
            url = f"http://{HOST}:{c.index_port}/bigkey{n}"
            secs, use = measure_cpu(c, lambda: curl_put(path, url))
            cpu["index"].add(use)
            # Right after the PUT, before anything else could raise the peaks.
            for pid, mb in peak_rss_mb(descendants(c.index.popen.pid)).items():
                peaks[pid] = max(mb, peaks.get(pid, 0.0))
            try:
                got = curl_md5(url)
            except BenchError as e:
                # Say what the index answered, not just what curl made of it.
                status, headers, _ = http_request(c.index_port, "GET", f"/bigkey{n}")
                raise BenchError(f"{e}\nthe index answers GET /bigkey{n} with {status} {headers!r}") from None
            if got != want:
                raise BenchError(f"big PUT: GET {url} (redirect followed) returned md5 {got}, "
                                 f"the file has {want}")
            http_request(c.index_port, "DELETE", f"/bigkey{n}")
            return secs

        # Mirrored like the wrk runs, for the same reason: nginx, index, index, nginx, three times.
        ref_times, idx_times = [], []
        for n in range(3):
            ref_times.append(put_nginx(2 * n))
            idx_times += [put_index(2 * n), put_index(2 * n + 1)]
            ref_times.append(put_nginx(2 * n + 1))
        three_times = [put_three(n) for n in range(2)]
        self.big_put_bound(cpu, path, len(ref_times), len(idx_times), statistics.median(ref_times), three_times)
        path.unlink()
        if not peaks:
            raise BenchError("cannot read VmHWM of the index processes")
        ref_secs, idx_secs = statistics.median(ref_times), statistics.median(idx_times)
        self.notes.append("big PUT seconds per run: nginx " + " / ".join(f"{t:.2f}" for t in ref_times)
                          + ", index " + " / ".join(f"{t:.2f}" for t in idx_times))

        ratio = idx_secs / ref_secs
        self.rows.append(Row(
            f"big PUT {self.big_mb} MB ({REPLICAS} replicas vs 1 PUT), time",
            f"{idx_secs:.2f} s", f"{ref_secs:.2f} s (one PUT to one nginx)",
            ratio_text(ratio, 2), "≤ 2×", "yes" if ratio <= 2 else "**no**"))
        worst = max(peaks.values())
        self.rows.append(Row(
            "big PUT, index peak RSS per process", f"{worst:.0f} MB (max of {len(peaks)} processes)",
            "", "", "≤ 100 MB", "yes" if worst <= 100 else "**no**"))
        self.notes.append("index peak RSS (VmHWM) by pid: "
                          + ", ".join(f"{pid}: {mb:.0f} MB" for pid, mb in sorted(peaks.items())))

    def big_s3(self) -> None:
        """S3 at disk speed, both as the issue measured them: a GET through the index (botocore
        follows no redirect, so the bytes pass through it) against the same file straight from
        nginx, and boto3's multipart upload (upload_file: 8 MB parts, 10 threads) against a
        plain-API `curl -T` PUT of the same file through the index."""
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config as BotoConfig
        except ImportError:
            self.notes.append("S3 big GET / multipart: skipped, boto3 is not installed (pip install -e .[test])")
            return
        c = self.cluster
        path = c.tmp / "big-s3.bin"
        want = random_file(path, self.big_mb)
        index = f"http://{HOST}:{c.index_port}"
        s3 = boto3.client("s3", endpoint_url=index, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1", config=BotoConfig(s3={"addressing_style": "path"}))
        transfer = TransferConfig()  # boto3's defaults, as users get them

        # GET: one stored value, read straight from the volume its 302 names, and through S3
        curl_put(path, f"{index}/bench-s3/get")
        status, headers, _ = http_request(c.index_port, "GET", "/bench-s3/get")
        location = headers.get("Location", "")
        if status != 302 or not location:
            raise BenchError(f"S3 big GET: the plain API answered {status} {headers!r} for the stored value")
        s3_get = ["-H", "x-amz-date: 20250101T000000Z"]  # an S3 request, unsigned: the client costs nothing
        if curl_md5(f"{index}/bench-s3/get", s3_get) != want:
            raise BenchError("S3 big GET: the bytes through the index are not the file's")
        ref_get, s3_gets = [], []
        for _ in range(3):  # mirrored: nginx, index, index, nginx
            ref_get.append(curl_get(location, []))
            s3_gets += [curl_get(f"{index}/bench-s3/get", s3_get), curl_get(f"{index}/bench-s3/get", s3_get)]
            ref_get.append(curl_get(location, []))
        http_request(c.index_port, "DELETE", "/bench-s3/get")

        def plain_put(n: int) -> float:
            secs = curl_put(path, f"{index}/bench-s3/plain{n}")
            http_request(c.index_port, "DELETE", f"/bench-s3/plain{n}")
            return secs

        def multipart(n: int) -> float:
            start = time.perf_counter()
            s3.upload_file(str(path), "bench-s3", f"mp{n}", Config=transfer)
            secs = time.perf_counter() - start
            if n == 0 and curl_md5(f"{index}/bench-s3/mp0", []) != want:
                raise BenchError("S3 multipart: the assembled object is not the file")
            s3.delete_object(Bucket="bench-s3", Key=f"mp{n}")
            return secs

        ref_put, mp_puts = [], []
        for n in range(2):
            ref_put.append(plain_put(2 * n))
            mp_puts += [multipart(2 * n), multipart(2 * n + 1)]
            ref_put.append(plain_put(2 * n + 1))
        path.unlink()
        self.notes.append("S3 big GET seconds per run: nginx " + " / ".join(f"{t:.2f}" for t in ref_get)
                          + ", S3 through the index " + " / ".join(f"{t:.2f}" for t in s3_gets))
        self.notes.append("S3 multipart seconds per run: plain-API PUT " + " / ".join(f"{t:.2f}" for t in ref_put)
                          + ", boto3 upload_file " + " / ".join(f"{t:.2f}" for t in mp_puts))
        ratio = statistics.median(s3_gets) / statistics.median(ref_get)
        self.rows.append(Row(
            f"S3 big GET {self.big_mb} MB through the index, time", f"{statistics.median(s3_gets):.2f} s",
            f"{statistics.median(ref_get):.2f} s (GET straight from nginx)",
            ratio_text(ratio, 1.3), "≤ 1.3×", "yes" if ratio <= 1.3 else "**no**"))
        ratio = statistics.median(mp_puts) / statistics.median(ref_put)
        self.rows.append(Row(
            f"S3 multipart upload {self.big_mb} MB (boto3 upload_file), time", f"{statistics.median(mp_puts):.2f} s",
            f"{statistics.median(ref_put):.2f} s (plain-API curl -T through the index)",
            ratio_text(ratio, 1.5), "≤ 1.5×", "yes" if ratio <= 1.5 else "**no**"))


# --- the index on PostgreSQL ------------------------------------------------------------

PG_TARGETS = {"missing": 0.3, "present": 0.25, "thrash": 0.12, "rebuild": 10_000}  # issue 12's
REBUILD_KEYS = 100_000


def start_postgres(cluster: Cluster, servers: int = 3):
    """A PostgreSQL of the run's own (its unix socket only) and `servers` index servers on it,
    on the benchmark's volumes. Returns (the instance, the servers' ports). The first has its
    default workers (one per core), for the "1 server" figures; the others split the cores
    between them, as servers sharing a host should (README), for the "2 servers" ones."""
    sys.path.insert(0, str(ROOT))
    from minikv.pg_local import LocalPostgres

    pg = LocalPostgres(cluster.tmp / "postgres", max_connections=200)
    if why := pg.problem():
        raise BenchError(f"--postgres: {why}")
    pg.init()
    pg.start()
    cluster.extra_roots.append(pg.proc.pid)
    exe = minikv_bin()
    volumes = ",".join(f"{HOST}:{p}" for p in cluster.volume_ports)
    ports = free_ports(servers)
    shared = ["-workers", str(max(1, (os.cpu_count() or 1) // (servers - 1)))]
    for i, port in enumerate(ports):
        proc = cluster.start(f"pg-index{i}", [
            exe, "server", "-host", HOST, "-port", str(port), "-volumes", volumes, "-db", pg.url(),
            "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES), *(shared if i else [])], port)
        wait_http(proc, timeout=60)
    return pg, ports


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    secs = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr[-2000:]}")
    # the summary line ("rebuild: 100000 keys found, ..."), not the notes after it
    return secs, next((line for line in done.stderr.splitlines() if re.match(r"^\w+: \d+ ", line)), "")


def remove_empty_folders(folders: list[str]) -> int:
    """rmdir every empty folder of the key layout (`svXX/...`, `<aa>/...`) below `folders`,
    bottom up; how many. nginx's own folders (body_temp, .nginx) are left alone."""
    gone = 0
    for top in folders:
        for entry in os.listdir(top):
            if not re.fullmatch(r"sv[0-9A-F]{2}|[0-9a-f]{2}", entry):
                continue
            for path, _, files in os.walk(os.path.join(top, entry), topdown=False):
                if not files and not os.listdir(path):
                    os.rmdir(path)
                    gone += 1
    return gone


def rebuild_rows(bench: Bench, pg, n: int = REBUILD_KEYS) -> None:
    """`minikv rebuild` of n keys' files (written straight into the volume folders, 3 replicas,
    as bench/scale.py does) into PostgreSQL, and into LMDB for reference, one after the other."""
    from scale import pg_database, write_files

    from minikv.volume.nginx import take_over_directories, worker_user

    c = bench.cluster
    names = [f"{HOST}:{p}" for p in c.volume_ports]
    folders = [str(c.tmp / f"volume{i}") for i in range(len(names))]
    # the fetch and thrash runs left one empty <aa>/<bb> folder per key they deleted (nginx's
    # DELETE removes the file only), which a rebuild would list too: gone first, as `minikv gc`
    # given the folders removes them, so that the rebuild reads what its 100k keys made
    emptied = remove_empty_folders(folders)
    bench.notes.append(f"rebuild: {emptied:,} empty folders the runs before had left were removed first")
    write_files(folders, names, n, b"v" * 100, 2)
    if (user := worker_user()) is not None:
        # written as root into running volumes: give the new folders to nginx's workers, as
        # `minikv volume` does at its start, or later PUTs into them fail (403, rename EACCES)
        for folder in folders:
            top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                take_over_directories(top, user[2], user[3])
            finally:
                os.close(top)
    common = ["-volumes", ",".join(names), "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES)]
    exe = minikv_bin()
    # over HTTP (the volumes' listings), then from the volume folders on this machine
    for how, local in (("over HTTP", []), ("from the local folders", folders)):
        lmdb_secs, lmdb_line = timed([exe, "rebuild", *common, "-db", str(c.tmp / f"rebuilt{len(local)}"), *local])
        pg_secs, pg_line = timed([exe, "rebuild", *common, "-db", pg_database(pg, f"rebuilt{len(local)}"),
                                  *local])
        keys = int(m.group(1)) if (m := re.search(r"(\d+) keys", pg_line)) else n
        bench.notes.append(f"rebuild {how} into PostgreSQL: {pg_line}; into LMDB: {lmdb_line}")
        rate = keys / pg_secs
        bench.rows.append(Row(f"PostgreSQL: rebuild {how} of {keys:,} keys (3 replicas on {len(names)} volumes)",
                              f"{rate:,.0f} keys/s ({pg_secs:.1f} s)",
                              f"LMDB: {keys / lmdb_secs:,.0f} keys/s ({lmdb_secs:.1f} s)", "",
                              f"≥ {PG_TARGETS['rebuild']:,} keys/s",
                              "yes" if rate >= PG_TARGETS["rebuild"] else "**no**"))


def postgres_figures(bench: Bench) -> None:
    c = bench.cluster
    pg, ports = start_postgres(c)
    try:
        for label, measured in (("PostgreSQL, 1 server: ", ports[:1]), ("PostgreSQL, 2 servers: ", ports[1:])):
            c.index_names = tuple(f"pg-index{ports.index(p)}" for p in measured)
            bench.fetch(measured, label, (PG_TARGETS["missing"], PG_TARGETS["present"]))
            bench.thrash(measured, label, PG_TARGETS["thrash"])
        rebuild_rows(bench, pg)
    finally:
        for p in [p for p in c.procs if p.name.startswith("pg-index")]:
            _signal_group(p, signal.SIGTERM)
            p.popen.wait(timeout=20)
        pg.stop()
        c.index_names = ("index",)


def random_file(path: Path, mb: int) -> str:
    """Write `mb` MB of random bytes to `path`; their md5 (hex)."""
    md5 = hashlib.md5()
    with open(path, "wb") as f:
        for _ in range(mb):
            chunk = os.urandom(1 << 20)
            md5.update(chunk)
            f.write(chunk)
    return md5.hexdigest()


def curl_get(url: str, extra: list[str]) -> float:
    """Seconds to GET the URL into /dev/null (no redirect followed: the answer itself)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *extra, url]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - start
    if done.returncode != 0 or done.stdout.strip() != "200":
        raise BenchError(f"{shlex.join(argv)}: exit {done.returncode}, status {done.stdout.strip()!r}, "
                         f"{done.stderr.strip()}")
    return secs


def md5_cpu_seconds(path: Path) -> float:
    """CPU time of hashing the file with OpenSSL's md5 as the index does (1 MB updates, reads
    not counted): the part of a PUT no amount of engineering in the index removes."""
    md5 = hashlib.md5()
    spent = 0.0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start = time.thread_time()
            md5.update(chunk)
            spent += time.thread_time() - start
    return spent


def curl_put_many(path: Path, urls: list[str]) -> float:
    """PUT the file to every URL at once, one curl each; seconds until the last answered."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path), url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for url in urls]
    outs = [p.communicate(timeout=600) for p in procs]
    secs = time.perf_counter() - start
    for url, p, (out, err) in zip(urls, procs, outs):
        if p.returncode != 0 or out.strip() != "201":
            raise BenchError(f"curl -T {path} {url}: exit {p.returncode}, status {out.strip()!r}, {err.strip()}")
    return secs


def curl_put(path: Path, url: str) -> float:
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path), url]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - start
    if done.returncode != 0 or done.stdout.strip() != "201":
        raise BenchError(f"{shlex.join(argv)}: exit {done.returncode}, status {done.stdout.strip()!r}, "
                         f"{done.stderr.strip()}")
    return secs


def curl_md5(url: str, extra: list[str] | None = None) -> str:
    """GET with redirects followed, hashed as it streams (no copy of the file in memory)."""
    argv = ["curl", "-sS", "-f", "-L", *(extra or []), url]
    md5 = hashlib.md5()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            md5.update(chunk)
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.wait(timeout=60) != 0:
            raise BenchError(f"{shlex.join(argv)}: exit {p.returncode}: {err.strip()}")
    return md5.hexdigest()


# --- output ------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = ["| figure | minikv | nginx reference | ratio | target | met |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.minikv} | {r.reference} | {r.ratio} | {r.target} | {r.met} |" for r in rows]
    return "\n".join(lines)


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else "?"


def machine_info(n_index_procs: int) -> list[str]:
    cpu = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"nproc: {len(os.sched_getaffinity(0))} ({cpu})",
        f"kernel: {platform.system()} {platform.release()}",
        f"python: {platform.python_version()} ({platform.python_implementation()})",
        f"nginx: {first_line(['nginx', '-v']).removeprefix('nginx version: ')}",
        f"wrk: {first_line(['wrk', '-v']).split(' Copyright')[0]}",
        f"curl: {' '.join(first_line(['curl', '--version']).split()[:2])}",
        f"index processes: {n_index_procs} (`minikv server` with its default workers)",
    ]


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(ROOT)
    except ValueError:
        pass
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join([str(exe), str(script), *sys.argv[1:]])


def write_out(path: Path, report: str) -> None:
    kept = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            kept = old.split(NOTES_MARKER, 1)[1].lstrip("\n")
    text = report.rstrip("\n") + "\n\n" + NOTES_MARKER + "\n" + (kept if kept else "")
    path.write_text(text)


def render(bench: Bench, info: list[str], quick: bool) -> str:
    d = bench.slice_secs
    parts = [
        "# Benchmarks",
        "",
        f"Made by `{command_line()}` from the repo root. Everything above the notes marker is "
        "rewritten by each run; text below it is kept.",
        "",
        "Each figure is minikv's index against nginx on the same machine in the same run "
        f"({N_VOLUMES} volumes, {REPLICAS} replicas, {SUBVOLUMES} subvolumes, all on 127.0.0.1), so "
        "the ratio is the figure; absolute rates move with whatever else the machine is doing. "
        f"Data lives in {bench.data_dir}: on tmpfs both sides are measured on CPU alone; on this "
        "VM's disk, dirty-page writeback made single runs of the same command vary up to 5x.",
        "",
        f"- Fetches: `wrk -t2 -c100 -d{d}s`, a missing key (404) and a stored key (302, not followed) "
        "on the index; the reference is one nginx volume answering a missing file (404).",
        f"- Thrash: `wrk -t16 -c16 -d{d}s -s bench/thrash.lua`, each connection looping PUT (1 KB), "
        "GET (302 not followed; 200 on nginx), DELETE of a fresh key; rate is requests/s; "
        "errors are responses with another status plus socket errors.",
        f"- Every wrk measurement runs twice, {d} s each, mirrored (nginx, index, index, nginx) so "
        "bursts of other load fall on both sides; the table has the mean, Details each run.",
        f"- Big PUT: `curl -T` of {bench.big_mb} MB of random bytes to the index (which writes "
        f"{REPLICAS} replicas) vs to one nginx volume; mirrored too, six each, median time in the table. Every "
        "index PUT is checked by md5 through the index (redirect followed); peak RSS is the "
        "largest VmHWM of any index process, read right after each PUT.",
        f"- S3 big GET: `curl` of a stored {bench.big_mb} MB value through the index with an `x-amz-date` "
        "header (S3, unsigned: the client costs nothing) vs the same file straight from the nginx "
        "its 302 names; S3 multipart: boto3 `upload_file` with its default transfer settings (8 MB "
        "parts, 10 threads) vs a plain-API `curl -T` PUT of the same file through the index. "
        "Mirrored, median time in the table.",
        "",
    ]
    if quick:
        parts += ["**Quick run (smoke test): shorter wrk runs and a smaller file; not the published figures.**", ""]
    parts += [table(bench.rows), ""]
    if bench.problems:
        parts += ["Checks that failed:", "", *[f"- {p}" for p in bench.problems], ""]
    if bench.bounds:
        parts += ["What bounds the figures, measured in this run (CPU time of each process group, "
                  "from /proc, over the same wrk and curl runs as the table):", "",
                  *[f"- {b}" for b in bench.bounds], ""]
    if bench.notes:
        parts += ["Details:", "", *[f"- {n}" for n in bench.notes], ""]
    parts += ["Machine:", "", *[f"- {line}" for line in info], ""]
    return "\n".join(parts)


def default_dir() -> Path | None:
    """tmpfs when it can hold the big PUTs (the file, 3 replicas, the nginx copy, twice)."""
    shm = Path("/dev/shm")
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if free > 4 << 30 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s wrk runs and a 64 MB file (smoke test)")
    ap.add_argument("--out", type=Path, help="rewrite this markdown file with the results")
    ap.add_argument("--metrics", action="store_true",
                    help="run the index with -metrics-port and scrape /metrics every second (A/B its cost)")
    ap.add_argument("--postgres", action="store_true",
                    help="also the index on PostgreSQL (one server, then two): fetches, thrash, rebuild")
    ap.add_argument("--no-big", action="store_true", help="skip the big PUT and S3 figures")
    ap.add_argument("--dir", type=Path, default=default_dir(),
                    help="where the volumes and index live (default: /dev/shm when it has room, so "
                         "the figures measure the software and not this machine's disk writeback)")
    opts = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: finally stops what we started
    for tool in ("wrk", "curl", "nginx"):
        if not shutil.which(tool):
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2

    tmp = Path(tempfile.mkdtemp(prefix="minikv-bench-", dir=opts.dir))
    # mkdtemp makes it 0700; run as root, the volumes' nginx workers drop to an unprivileged
    # user who must be able to reach the volume folders inside.
    tmp.chmod(0o755)
    cluster = Cluster(tmp, metrics=opts.metrics)
    # Two runs per side: 2 x 5 s = the design's 10 s per figure; --quick runs 2 x 3 s.
    bench = Bench(cluster, slice_secs=3 if opts.quick else 5, big_mb=64 if opts.quick else 256)
    bench.data_dir = "tmpfs (/dev/shm)" if str(tmp).startswith("/dev/shm") else f"{tmp.parent} (disk)"
    started = time.monotonic()
    failed = True
    try:
        cluster.up()
        n_index = len(descendants(cluster.index.popen.pid))
        bench.fetch()
        bench.thrash()
        if opts.postgres:
            postgres_figures(bench)
        if not opts.no_big:
            bench.big_put()
            bench.big_s3()
        failed = False
    except BenchError as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        if failed and (tmp / "logs").is_dir():
            # The temp dir goes away; the servers' logs are what explains a failure.
            keep = Path(tempfile.mkdtemp(prefix="minikv-bench-logs-"))
            shutil.copytree(tmp / "logs", keep, dirs_exist_ok=True)
            print(f"bench: server logs kept in {keep}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    report = render(bench, machine_info(n_index), opts.quick)
    print(report)
    print(f"(took {time.monotonic() - started:.0f} s)")
    if opts.out:
        write_out(opts.out, report)
        print(f"wrote {opts.out}")
    if bench.problems:
        print("bench: some checks failed, see above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
