"""What the operations listener costs the request path: the same index with and without
-metrics-port, in alternating rounds of one run (off, on, on, off, ...), on the same volumes
and the same database.

Each side of a round: wrk on a stored key (302), on a missing key (404) and the thrash loop
(PUT+GET+DELETE of fresh keys, 16 connections, as bench/run.py), with the index's CPU time per
request read from /proc over the same seconds (other load on a shared machine moves all figures:
compare the medians of several rounds, not one round). With the listener on, /metrics is
scraped every second, as bench/run.py --metrics. Before the load, the index's CPU time over the
same seconds with no request ("idle", ms per second: the scrapes and the publishing of counts
with the listener on) is measured too, and taken off the loaded figures for "net" µs per request,
what the requests themselves cost: at a few thousand requests a second on a busy machine a
scrape a second is several µs a request, which says nothing of the request path.

    .venv/bin/python bench/ops_ab.py [--rounds 4] [--secs 3] [--workers N] [--old DIR] [--run-quick 2]

--old DIR also runs the index from another source tree (DIR holds its `minikv` package, e.g.
`git archive main | tar -x -C DIR`), off and on, in the same rounds: old against new in one run.

--run-quick N then runs `bench/run.py --quick` N times each without and with --metrics (off,
on, on, off, ...) and prints their fetch and thrash ratios to nginx.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402 - bench/ is not a package
    HOST,
    REPLICAS,
    SMALL_BODY,
    SUBVOLUMES,
    THRASH_LUA,
    BenchError,
    Cluster,
    _signal_group,
    cpu_seconds,
    default_dir,
    descendants,
    expect_status,
    free_ports,
    minikv_bin,
    wait_http,
    wrk,
)


def scrape_while(port: int, stop: threading.Event) -> None:
    import urllib.request

    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
                resp.read()
        except OSError:
            pass


def start_index(cluster: Cluster, db: Path, port: int, metrics_port: int, workers: int | None,
                code: str | None = None):
    volumes = ",".join(f"{HOST}:{p}" for p in cluster.volume_ports)
    # another source tree's package first on the path: its code, this venv's dependencies
    argv = (["env", f"PYTHONPATH={code}"] if code else []) + [minikv_bin(), "server", "-host", HOST, "-port", str(port), "-volumes", volumes, "-db", str(db),
            "-replicas", str(REPLICAS), "-subvolumes", str(SUBVOLUMES)]
    if workers:
        argv += ["-workers", str(workers)]
    if metrics_port:
        argv += ["-metrics-port", str(metrics_port)]
    proc = cluster.start("index-on" if metrics_port else "index-off", argv, port)
    wait_http(proc, timeout=30)
    return proc


def stop_index(cluster: Cluster, proc) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=10)
    except Exception:  # noqa: BLE001 - whatever is left goes with SIGKILL
        _signal_group(proc, signal.SIGKILL)
        proc.popen.wait(timeout=5)
    cluster.procs.remove(proc)


def side(cluster: Cluster, db: Path, on: bool, secs: int, workers: int | None,
         code: str | None = None) -> dict[str, tuple[float, float, float]]:
    """{"302": (req/s, index CPU µs per request, the same net of idle), "404": ..., "thrash": ...,
    "idle": (0, index CPU ms per second with no request, 0)} for one index start."""
    port, mport = free_ports(2)
    proc = start_index(cluster, db, port, mport if on else 0, workers, code)
    stop = threading.Event()
    try:
        expect_status(port, "GET", "/ab-present", 302)
        expect_status(port, "GET", "/ab-missing", 404)
        wrk(f"http://{HOST}:{port}/ab-missing", 1, 2, 100)  # warm the workers
        if on:
            threading.Thread(target=scrape_while, args=(mport, stop), daemon=True).start()
        pids = descendants(proc.popen.pid)
        before = cpu_seconds(pids)
        time.sleep(secs)
        idle = (cpu_seconds(pids) - before) / secs  # seconds of CPU a second, with no request
        out = {"idle": (0.0, idle * 1e3, 0.0)}
        token = uuid.uuid4().hex[:8]  # fresh thrash keys: the sides share one database
        runs = {"302": ("/ab-present", 2, 100, None), "404": ("/ab-missing", 2, 100, None),
                "thrash": ("", 16, 16, [str(THRASH_LUA), "index", f"/thrash/{token}"])}
        for name, (path, threads, conns, script) in runs.items():
            before = cpu_seconds(pids)
            res = wrk(f"http://{HOST}:{port}{path}", secs, threads, conns, script)
            used = cpu_seconds(pids) - before
            if script and (res.extra.get("thrash_errors") != "0" or res.socket_error_total):
                raise BenchError(f"thrash: {res.extra.get('thrash_bad', '')[:200]}, socket errors {res.socket_errors}")
            out[name] = (res.rps, used / res.requests * 1e6, (used - idle * secs) / res.requests * 1e6)
        return out
    finally:
        stop.set()
        stop_index(cluster, proc)


RATIO_ROWS = ("fetch missing (404)", "fetch present (302)", "thrash: PUT+GET+DELETE, 16 conns")


def run_quick(metrics: bool) -> list[str]:
    """bench/run.py --quick (with --metrics or not): its fetch and thrash ratios to nginx."""
    argv = [sys.executable, str(Path(__file__).resolve().parent / "run.py"), "--quick"]
    done = subprocess.run(argv + (["--metrics"] if metrics else []), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \|[^|]*\|[^|]*\| ([\d.]+×) \|",
                                                          done.stdout, re.M)}
    return [found.get(row, "?") for row in RATIO_ROWS]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of sides (off+on, per code), mirrored in turn")
    ap.add_argument("--secs", type=int, default=3, help="seconds of wrk per figure per side")
    ap.add_argument("--workers", type=int, help="-workers of the index (its default if not given)")
    ap.add_argument("--old", help="a source tree of minikv to run too, off and on, in the same rounds")
    ap.add_argument("--run-quick", type=int, default=0, help="then N runs of bench/run.py --quick per side")
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="minikv-ab-", dir=default_dir()))
    tmp.chmod(0o755)
    cluster = Cluster(tmp)
    codes = [("new", None)] + ([("old", str(Path(opts.old).resolve()))] if opts.old else [])
    sides = [(code, on) for code in codes for on in (False, True)]
    results: dict[tuple, list[dict]] = {(code[0], on): [] for code, on in sides}
    try:
        cluster.up()  # the volumes, and an index that stores the key every side reads
        ip = cluster.index_port
        expect_status(ip, "PUT", "/ab-present", 201, SMALL_BODY)
        index = cluster.index
        stop_index(cluster, index)
        db = tmp / "index"
        for r in range(opts.rounds):
            for (label, code), on in (sides if r % 2 == 0 else sides[::-1]):
                res = side(cluster, db, on, opts.secs, opts.workers, code)
                results[(label, on)].append(res)
                print(f"round {r + 1} {label} {'on ' if on else 'off'}: idle {res['idle'][1]:5.1f} ms/s  " + "  ".join(
                    f"{k} {rps:8,.0f} req/s {us:5.1f} µs/req (net {net:5.1f})" for k, (rps, us, net) in res.items()
                    if k != "idle"), flush=True)
    except BenchError as e:
        print(f"ab: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for label, _ in codes:
        for on in (False, True):
            idle = [x["idle"][1] for x in results[(label, on)]]
            print(f"idle   {label} {'on ' if on else 'off'}: CPU ms/s median {statistics.median(idle):.1f} "
                  f"({' / '.join(f'{x:.1f}' for x in idle)})")
    for name in ("404", "302", "thrash"):
        for label, _ in codes:
            for on in (False, True):
                runs = results[(label, on)]
                rps = [x[name][0] for x in runs]
                us = [x[name][1] for x in runs]
                net = [x[name][2] for x in runs]
                print(f"{name:6} {label} {'on ' if on else 'off'}: req/s median {statistics.median(rps):8,.0f} "
                      f"({' / '.join(f'{x:,.0f}' for x in rps)}); CPU µs/req median {statistics.median(us):.1f} "
                      f"({' / '.join(f'{x:.1f}' for x in us)}); net of idle {statistics.median(net):.1f} "
                      f"({' / '.join(f'{x:.1f}' for x in net)})")
            # on/off of the same round (minutes apart at most): the load of the machine moves less
            ratios = [b[name][0] / a[name][0] for a, b in zip(results[(label, False)], results[(label, True)])]
            print(f"{name:6} {label} on/off req/s: median {statistics.median(ratios):.3f} "
                  f"({' / '.join(f'{x:.2f}' for x in ratios)})")
    quick: dict[bool, list[list[str]]] = {False: [], True: []}
    try:
        for r in range(opts.run_quick):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                quick[on].append(run_quick(on))
                print(f"bench/run.py --quick{' --metrics' if on else ''}: "
                      + ", ".join(f"{name} {ratio}" for name, ratio in zip(RATIO_ROWS, quick[on][-1])), flush=True)
    except BenchError as e:
        print(f"ab: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
