"""Thrash (PUT, GET, DELETE of fresh keys, 16 connections) on the PostgreSQL index: this code
against another checkout's, one server each on one PostgreSQL of the run's own, with nginx's own
thrash in the same run, in alternating rounds (nginx, A, B, B, A, nginx, ...). --fetch: GET of a
stored key (302, 100 connections) against nginx's 404 instead. --servers 2: two servers of each
checkout on the one database, one wrk per server at once (half the threads and connections each,
rates added), as bench/run.py measures its "2 servers" figures.

Each figure is a ratio to the nginx runs of its round; the index's and PostgreSQL's CPU per loop
are read from /proc over the same seconds. The other checkout runs on this one's .venv with its
source first on PYTHONPATH (e.g. a worktree of main):

    .venv/bin/python bench/pg_thrash_ab.py --old ../wt-main [--rounds 3] [--secs 5] [--fetch] [--servers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402 - bench/ is not a package
    HOST,
    REPLICAS,
    ROOT,
    SMALL_BODY,
    SUBVOLUMES,
    THRASH_LUA,
    Cluster,
    _signal_group,
    cpu_seconds,
    default_dir,
    descendants,
    expect_status,
    free_ports,
    wait_http,
    wrk_many,
)


def start_server(cluster: Cluster, name: str, url: str, port: int, source: Path | None, workers: int = 0):
    """`minikv server` on PostgreSQL; `source`: another checkout whose minikv is run instead;
    `workers`: 0 for its default (one per core)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    volumes = ",".join(f"{HOST}:{p}" for p in cluster.volume_ports)
    argv = [sys.executable, "-m", "minikv", "server", "-host", HOST, "-port", str(port), "-volumes", volumes,
            "-db", url, "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES)]
    if workers:
        argv += ["-workers", str(workers)]
    saved = os.environ.copy()
    os.environ.update(env)  # Cluster.start passes this process's environment on
    try:
        proc = cluster.start(name, argv, port)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    wait_http(proc, timeout=60)
    return proc


def thrash(ports: list[int], mode: str, secs: int, pids: dict[str, list[int]]) -> tuple[float, int, dict[str, float]]:
    """(req/s, loops, CPU seconds of each group of `pids`) of one wrk thrash run on `ports` at
    once; mode "fetch" and "404": wrk on /ab-present (302) and /ab/missing (nginx's 404), a loop
    per request."""
    before = {k: cpu_seconds(v) for k, v in pids.items()}
    urls = [f"http://{HOST}:{port}" for port in ports]
    if mode in ("fetch", "404"):
        res = wrk_many([u + ("/ab-present" if mode == "fetch" else "/ab/missing") for u in urls], secs, 2, 100)
        res.extra["thrash_loops"] = str(res.requests)
    else:
        res = wrk_many(urls, secs, 16, 16, [str(THRASH_LUA), mode, f"/thrash/{secrets.token_hex(4)}"])
    used = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
    errors = int(res.extra.get("thrash_errors", "0")) + res.socket_error_total
    if errors:
        print(f"  {mode} on {ports}: {errors} errors {res.extra.get('thrash_bad', '')[:120]}", file=sys.stderr)
    return res.rps, int(res.extra.get("thrash_loops", "0")), used


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (its minikv/ is run as A)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--fetch", action="store_true", help="GET of a stored key instead of thrash")
    ap.add_argument("--servers", type=int, default=1, help="servers of each checkout on the database")
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from minikv.pg_local import LocalPostgres

    tmp = Path(tempfile.mkdtemp(prefix="minikv-pgab-", dir=default_dir()))
    tmp.chmod(0o755)
    cluster = Cluster(tmp)
    pg = None
    try:
        cluster.up()
        pg = LocalPostgres(tmp / "postgres", max_connections=200)
        pg.init()
        pg.start()
        free = free_ports(2 * opts.servers)
        ports = {"A": free[:opts.servers], "B": free[opts.servers:]}
        # several servers split the cores between them, as bench/run.py's "2 servers" do
        workers = max(1, (os.cpu_count() or 1) // opts.servers) if opts.servers > 1 else 0
        servers = {side: [start_server(cluster, f"{side}{i}", pg.url(), port, source, workers)
                          for i, port in enumerate(ports[side])]
                   for side, source in (("A", opts.old.resolve()), ("B", ROOT))}
        vol = cluster.volume_ports[0]
        volumes = [pid for p in cluster.procs if p.name.startswith("volume") for pid in descendants(p.popen.pid)]
        rates: dict[str, list[float]] = {"A": [], "B": []}
        per_loop: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        mode, ref_mode = ("fetch", "404") if opts.fetch else ("index", "nginx")
        expect_status(ports["A"][0], "PUT", "/ab-present", 201, SMALL_BODY)
        for side in ("A", "B"):  # warm up
            for port in ports[side]:
                expect_status(port, "GET", "/ab-present", 302)
            thrash(ports[side], mode, 1, {})
        for r in range(opts.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            ref = thrash([vol], ref_mode, opts.secs, {"nginx": volumes})[0]
            for side in order:
                pids = {"index": [pid for s in servers[side] for pid in descendants(s.popen.pid)],
                        "pg": descendants(pg.proc.pid)}
                rps, loops, used = thrash(ports[side], mode, opts.secs, pids)
                rates[side].append(rps / ref)
                per_loop[side].append((used["index"] / loops * 1e6, used["pg"] / loops * 1e6))
                print(f"round {r} {side}: {rps:,.0f} req/s, nginx {ref:,.0f}: {rps / ref:.3f}x; CPU per loop: "
                      f"index {per_loop[side][-1][0]:.0f} us, PostgreSQL {per_loop[side][-1][1]:.0f} us", flush=True)
        for side, label in (("A", f"A ({opts.old})"), ("B", "B (this checkout)")):
            print(f"{label}: {mode} median {statistics.median(rates[side]):.3f}x nginx; CPU per loop: index "
                  f"{statistics.median(x for x, _ in per_loop[side]):.0f} us, PostgreSQL "
                  f"{statistics.median(y for _, y in per_loop[side]):.0f} us")
        return 0
    finally:
        for proc in cluster.procs:
            if proc.name[:1] in ("A", "B"):
                _signal_group(proc, signal.SIGTERM)
                proc.popen.wait(timeout=20)
        cluster.procs = [p for p in cluster.procs if p.name[:1] not in ("A", "B")]
        if pg is not None:
            pg.stop()
        cluster.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
