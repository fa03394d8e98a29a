"""The index's own cost per request, without sockets: µs of Python for a 404 and a 302.

Feeds minikv.http.server.Connection with request bytes, as tests/test_protocol.py does, on an
App with a real LMDB index (in a temp dir) and no network: what is left is the HTTP layer, the
API and the index read, the part of a request that minikv's code decides. Run it before and after
touching the read path:

    .venv/bin/python bench/protocol.py [-n 200000] [--metrics] [--per-pass 50]

--metrics counts the requests as `-metrics-port` does (minikv.ops.counters.instrument): the
difference is what counting costs the request path. Under `valgrind --tool=callgrind` (with a
small -n and PYTHONHASHSEED=0) the instruction counts of the two are exact and the same from run
to run; valgrind runs ~50x slower, so give it --first-bucket 0.01 too: the answers then fall
in the first latency bucket, and take its path, as they do at full speed, and --fixed-date: the
answers' Date is made once a second, and a run that valgrind and a busy machine stretch by a
minute would count sixty more of them (hundreds of instructions a request).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_protocol import FakeTransport  # noqa: E402

from minikv.api.app import App  # noqa: E402
from minikv.config import Config  # noqa: E402
from minikv.health import Health  # noqa: E402
from minikv.http.client import Pool  # noqa: E402
from minikv.http.server import Batch, Connection, Limits  # noqa: E402
from minikv.index import store as store_module  # noqa: E402
from minikv.index.record import LIVE, encode_data  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2volume  # noqa: E402


async def _no_wait() -> None:
    """Nothing: running it to completion is one pass of the event loop."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="requests per figure")
    ap.add_argument("--metrics", action="store_true", help="count requests as -metrics-port does")
    ap.add_argument("--first-bucket", type=float, help="with --metrics: the first latency bucket's bound, "
                    "seconds (0.0001 in the server)")
    ap.add_argument("--only", choices=("404", "302"), help="measure this answer only (for callgrind: two "
                    "runs with different -n give the instructions per request by difference)")
    ap.add_argument("--fixed-date", action="store_true", help="the answers' Date never changes (for callgrind)")
    ap.add_argument("--per-pass", type=int, default=50, help="requests answered per pass of the event loop "
                    "(50: as under wrk -c100 on two workers; 1: an idle server's one request at a time)")
    opts = ap.parse_args(argv)
    n = opts.n
    if opts.fixed_date:
        from minikv.http import response

        response.time = types.SimpleNamespace(time=(1e9).__float__)  # a C call, as time.time
    loop = uvloop.new_event_loop()  # the server's loop
    asyncio.set_event_loop(loop)
    db = tempfile.mkdtemp(prefix="minikv-protocol-")
    try:
        volumes = [f"127.0.0.1:{p}" for p in range(4001, 4006)]
        config = Config(volumes=volumes, db=db, replicas=3, subvolumes=10)
        # a small map, so that the script also runs under valgrind (which cannot reserve 1 TiB):
        # `valgrind --tool=callgrind` counts instructions, the same from run to run
        store_module.MAP_SIZE = 1 << 30
        store = Store(db)
        pool = Pool()
        app = App(config, store, pool, Health(pool, volumes))
        if opts.metrics:
            from minikv.ops import counters

            if opts.first_bucket:
                counters.FIRST = opts.first_bucket
            instrument = counters.instrument
            instrument(app, counters.Counters())
        placed = key2volume(b"/present", volumes, 3, 10)
        with store.env.begin(write=True, db=store.keys) as txn:  # a record as a PUT leaves it
            txn.put(b"/present", encode_data(LIVE, placed, 5, 0, b"x" * 16, app.epoch))
        # as under wrk -c100 with two workers: 50 connections, each with one request per pass of
        # the event loop, whose answers are written together at the end of the pass
        conns = []
        batch = Batch(loop)
        for _ in range(opts.per_pass):
            conn = Connection(app, Limits(), loop, batch=batch)
            conn.connection_made(FakeTransport())
            conns.append(conn)

        def one_pass(request: bytes) -> None:
            for conn in conns:
                conn.data_received(request)
            loop.run_until_complete(_no_wait())
            for conn in conns:
                conn.transport.out.clear()

        figures = (("404 (missing key)", b"/missing"), ("302 (stored key)", b"/present"))
        for name, path in (f for f in figures if opts.only is None or f[0].startswith(opts.only)):
            request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n" % path
            conns[0].data_received(request)
            loop.run_until_complete(_no_wait())
            status = bytes(conns[0].transport.out[9:12]).decode()
            conns[0].transport.out.clear()
            # best of 5 rounds: other load on a small machine only ever adds time
            passes = max(1, n // 5 // len(conns))
            rounds = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(passes):
                    one_pass(request)
                rounds.append((time.perf_counter() - start) / (passes * len(conns)))
            print(f"{name}: {min(rounds) * 1e6:.2f} µs per request, best of 5 rounds "
                  f"(median {sorted(rounds)[2] * 1e6:.2f}; answered {status})")
        store.close()
    finally:
        shutil.rmtree(db, ignore_errors=True)
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
