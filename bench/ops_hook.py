"""What the request path pays for -metrics-port: the counting wrapper around App.handle, timed
against the bare call, with prometheus_client's own counters (plain and multiprocess mode) beside
it for comparison. A micro-benchmark (timeit), one process, no network:

    .venv/bin/python bench/ops_hook.py
"""

from __future__ import annotations

import os
import tempfile
import time
import timeit

from minikv.http.server import Request
from minikv.ops.counters import Counters, instrument

ANSWER = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
N = 1_000_000


class App:
    def handle(self, req):
        return ANSWER


def per_call(stmt, number: int = N) -> float:
    # CPU time, not wall time: the machine may be shared, and what counts is what we spend
    return min(timeit.repeat(stmt, number=number, repeat=5, timer=time.process_time)) / number * 1e9


def main() -> None:
    req = Request(b"GET", b"/missing", [], True, None, None, False)
    bare = App()
    counted = App()
    instrument(counted, Counters())
    base = per_call(lambda: bare.handle(req))
    hooked = per_call(lambda: counted.handle(req))
    io = [0, 0]
    data = b"x" * 80
    added = per_call(lambda: io.__setitem__(0, io[0] + len(data)))
    print(f"App.handle bare:              {base:7.0f} ns/call")
    print(f"App.handle counted:           {hooked:7.0f} ns/call  (+{hooked - base:.0f} ns)")
    print(f"one byte counter (x3/request): {added:6.0f} ns/add (IO[i] += len(data), measured as a call)")

    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    c = Counter("x", "x", ["method", "status"], registry=registry)
    h = Histogram("y", "y", ["method"], registry=registry)
    print(f"prometheus_client inc+observe: {per_call(lambda: (c.labels('GET', '404').inc(), h.labels('GET').observe(1e-5)), N // 10):6.0f} ns")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        import importlib

        import prometheus_client.values

        importlib.reload(prometheus_client.values)
        import prometheus_client.metrics

        importlib.reload(prometheus_client.metrics)
        registry = CollectorRegistry()
        c = prometheus_client.metrics.Counter("x", "x", ["method", "status"], registry=registry)
        h = prometheus_client.metrics.Histogram("y", "y", ["method"], registry=registry)
        t = per_call(lambda: (c.labels('GET', '404').inc(), h.labels('GET').observe(1e-5)), N // 10)
        print(f"prometheus_client multiprocess inc+observe: {t:6.0f} ns")


if __name__ == "__main__":
    main()
