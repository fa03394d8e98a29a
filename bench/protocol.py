"""The index's own cost per request, without sockets: µs of Python for a 404 and a 302.

Feeds minikv.http.server.Connection with request bytes, as tests/test_protocol.py does, on an
App with a real LMDB index (in a temp dir) and no network: what is left is the HTTP layer, the
API and the index read, the part of a request that minikv's code decides. Run it before and after
touching the read path:

    .venv/bin/python bench/protocol.py [-n 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_protocol import FakeTransport  # noqa: E402

from minikv.api.app import App  # noqa: E402
from minikv.config import Config  # noqa: E402
from minikv.health import Health  # noqa: E402
from minikv.http.client import Pool  # noqa: E402
from minikv.http.server import Connection, Limits  # noqa: E402
from minikv.index import store as store_module  # noqa: E402
from minikv.index.record import LIVE, encode_data  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2volume  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="requests per figure")
    n = ap.parse_args(argv).n
    loop = asyncio.new_event_loop()
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
        placed = key2volume(b"/present", volumes, 3, 10)
        with store.env.begin(write=True, db=store.keys) as txn:  # a record as a PUT leaves it
            txn.put(b"/present", encode_data(LIVE, placed, 5, 0, b"x" * 16, app.epoch))
        transport = FakeTransport()
        conn = Connection(app, Limits(), loop)
        conn.connection_made(transport)
        for name, path in (("404 (missing key)", b"/missing"), ("302 (stored key)", b"/present")):
            request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n" % path
            conn.data_received(request)
            status = bytes(transport.out[9:12]).decode()
            transport.out.clear()
            # best of 5 rounds: other load on a small machine only ever adds time
            rounds = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(n // 5):
                    conn.data_received(request)
                    transport.out.clear()
                rounds.append((time.perf_counter() - start) / (n // 5))
            print(f"{name}: {min(rounds) * 1e6:.2f} µs per request, best of 5 rounds "
                  f"(median {sorted(rounds)[2] * 1e6:.2f}; answered {status})")
        store.close()
    finally:
        shutil.rmtree(db, ignore_errors=True)
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
