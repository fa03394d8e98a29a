"""Thrash (PUT, GET, DELETE of fresh keys, 16 connections) on the PostgreSQL index: this code
against another checkout's, one server each on one PostgreSQL of the run's own, with nginx's own
thrash in the same run, in alternating rounds (nginx, A, B, B, A, nginx, ...). --fetch: GET of a
stored key (302, 100 connections) against nginx's 404 instead. --servers 2: two servers of each
checkout on the one database, one wrk per server at once (half the threads and connections each,
rates added), as bench/run.py measures its "2 servers" figures. --s3: a stored value
read through S3 (unsigned, with x-amz-date), which the index streams from a volume after its
index reads, against nginx's 404. --lmdb: this checkout's
servers on an LMDB index of their own instead (what the PostgreSQL path adds, in the same run).
--wal: after the rounds, one more thrash of each side, then PostgreSQL's WAL counters per loop
(pg_stat_wal; read after PGSTAT's idle flush, ~11 s later).

Each figure is a ratio to the nginx runs of its round; the index's and PostgreSQL's CPU per loop
are read from /proc over the same seconds. The other checkout runs on this one's .venv with its
source first on PYTHONPATH (e.g. a worktree of main):

    .venv/bin/python bench/pg_thrash_ab.py --old ../wt-main [--rounds 3] [--secs 5] [--fetch | --s3] [--servers 2]
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
    children_cpu,
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
    wrk_before = children_cpu()
    urls = [f"http://{HOST}:{port}" for port in ports]
    if mode in ("fetch", "404"):
        res = wrk_many([u + ("/ab-present" if mode == "fetch" else "/ab/missing") for u in urls], secs, 2, 100)
        res.extra["thrash_loops"] = str(res.requests)
    elif mode == "s3":
        res = wrk_many([u + S3_PATH for u in urls], secs, 2, 100, headers=(S3_DATE,))
        res.extra["thrash_loops"] = str(res.requests)
    else:
        res = wrk_many(urls, secs, 16, 16, [str(THRASH_LUA), mode, f"/thrash/{secrets.token_hex(4)}"])
    used = {k: cpu_seconds(v) - before[k] for k, v in pids.items()}
    used["wrk"] = children_cpu() - wrk_before
    errors = int(res.extra.get("thrash_errors", "0")) + res.socket_error_total
    if errors:
        print(f"  {mode} on {ports}: {errors} errors {res.extra.get('thrash_bad', '')[:120]}", file=sys.stderr)
    return res.rps, int(res.extra.get("thrash_loops", "0")), used


S3_PATH = "/ab-s3/present"  # bucket ab-s3, key present: the plain key of the same name
S3_DATE = "x-amz-date: 20250101T000000Z"  # makes a request S3's; unsigned, as no credentials are set


def s3_status(port: int) -> tuple[int, bytes]:
    """An S3 GET of S3_PATH: (status, body)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        name, value = S3_DATE.split(": ")
        conn.request("GET", S3_PATH, headers={name: value})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


WAL = ("SELECT wal_records, wal_bytes, wal_write, wal_sync, (SELECT sum(xact_commit) FROM pg_stat_database) "
       "FROM pg_stat_wal")


def wal_counters(url: str) -> list[float]:
    """PostgreSQL's WAL records, bytes, writes and syncs, and transactions committed, so far."""
    import asyncio

    import asyncpg

    async def read() -> list[float]:
        conn = await asyncpg.connect(url)
        try:
            return [float(x) for x in await conn.fetchrow(WAL)]
        finally:
            await conn.close()

    return asyncio.run(read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (its minikv/ is run as A)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--fetch", action="store_true", help="GET of a stored key instead of thrash")
    ap.add_argument("--s3", action="store_true", help="a stored value read through S3 instead of thrash")
    ap.add_argument("--servers", type=int, default=1, help="servers of each checkout on the database")
    ap.add_argument("--lmdb", action="store_true", help="B: this checkout on LMDB instead of PostgreSQL")
    ap.add_argument("--wal", action="store_true", help="then PostgreSQL's WAL writes and syncs per loop")
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
        dbs = {"A": pg.url(), "B": str(tmp / "lmdb") if opts.lmdb else pg.url()}
        servers = {side: [start_server(cluster, f"{side}{i}", dbs[side], port, source, workers)
                          for i, port in enumerate(ports[side])]
                   for side, source in (("A", opts.old.resolve()), ("B", ROOT))}
        vol = cluster.volume_ports[0]
        volumes = [pid for p in cluster.procs if p.name.startswith("volume") for pid in descendants(p.popen.pid)]
        rates: dict[str, list[float]] = {"A": [], "B": []}
        per_loop: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        mode, ref_mode = ("fetch", "404") if opts.fetch else ("index", "nginx")
        if opts.s3:
            mode, ref_mode = "s3", "404"
        expect_status(ports["A"][0], "PUT", "/ab-present", 201, SMALL_BODY)
        expect_status(ports["A"][0], "PUT", S3_PATH, 201, SMALL_BODY)
        if opts.lmdb:  # B's own index
            expect_status(ports["B"][0], "PUT", "/ab-present", 201, SMALL_BODY)
            expect_status(ports["B"][0], "PUT", S3_PATH, 201, SMALL_BODY)
        for side in ("A", "B"):  # warm up
            for port in ports[side]:
                expect_status(port, "GET", "/ab-present", 302)
                if s3_status(port) != (200, SMALL_BODY):
                    raise SystemExit(f"an S3 GET of {S3_PATH} on {side} did not answer the value: {s3_status(port)}")
            thrash(ports[side], mode, 1, {})

        def pids(side: str) -> dict[str, list[int]]:
            return {"index": [pid for s in servers[side] for pid in descendants(s.popen.pid)],
                    "pg": descendants(pg.proc.pid), "nginx": volumes}

        for r in range(opts.rounds):
            order = ("A", "B") if r % 2 == 0 else ("B", "A")
            ref = thrash([vol], ref_mode, opts.secs, {"nginx": volumes})[0]
            for side in order:
                rps, loops, used = thrash(ports[side], mode, opts.secs, pids(side))
                rates[side].append(rps / ref)
                per_loop[side].append({k: v / loops * 1e6 for k, v in used.items()})
                print(f"round {r} {side}: {rps:,.0f} req/s, nginx {ref:,.0f}: {rps / ref:.3f}x; CPU per loop: "
                      + ", ".join(f"{k} {v:.0f} us" for k, v in per_loop[side][-1].items()), flush=True)
        for side, label in (("A", f"A ({opts.old})"), ("B", "B (this checkout" + (", LMDB)" if opts.lmdb else ")"))):
            got = rates[side]
            print(f"{label}: {mode} median {statistics.median(got):.3f}x nginx (spread {min(got):.3f}-{max(got):.3f}); "
                  "CPU per loop: " + ", ".join(f"{k} {statistics.median(x[k] for x in per_loop[side]):.0f} us"
                                               for k in per_loop[side][0]))
        if opts.wal:
            import time

            for side in ("A", "B") if not opts.lmdb else ("A",):
                time.sleep(11)  # the backends' counters reach pg_stat_wal once they idle
                before = wal_counters(pg.url())
                _, loops, _ = thrash(ports[side], mode, opts.secs, {})
                time.sleep(11)
                d = [b - a for a, b in zip(before, wal_counters(pg.url()))]
                print(f"{side} WAL per loop: {d[0] / loops:.1f} records, {d[1] / loops:.0f} bytes, {d[2] / loops:.2f} "
                      f"writes, {d[3] / loops:.2f} syncs; {d[4] / loops:.2f} commits (read-only ones too), "
                      f"{d[4] / max(d[3], 1):.1f} commits per sync")
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
