"""The open-file budget of uploads in flight (App.put: a PUT holds a volume connection per
replica while it streams) binds on PostgreSQL as on LMDB. PgApp answers each request on a view
of itself (api/app_pg.py), so the count of files held must live on the app, not on the view."""

from __future__ import annotations

import select
import socket
import time
import uuid

from cluster import HOST, wait_closed
from test_hardening_http import _nofile

ENGINES = ["lmdb", "postgresql"]

BUDGET_UPLOADS = 10  # 256 open files: 64 kept from clients, half of them for uploads, 3 a PUT


def start_uploads(port: int, n: int, into: list[socket.socket]) -> None:
    """`n` PUTs whose last body byte is not sent: each holds its files until `finish`."""
    for _ in range(n):
        s = socket.create_connection((HOST, port))
        s.sendall(f"PUT /b/{uuid.uuid4().hex} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nx".encode())
        into.append(s)


def finish(s: socket.socket) -> None:
    s.settimeout(30)
    s.sendall(b"y")
    assert s.recv(4096).startswith(b"HTTP/1.1 201 ")


def test_uploads_past_the_budget_get_503_and_the_budget_comes_back(make_cluster):
    c = make_cluster(volumes=3, replicas=3, workers=1)
    c.index.stop()
    wait_closed(c.port)
    c.index.start(preexec=_nofile(256, 256))
    socks: list[socket.socket] = []
    try:
        # uploads that hold their files: their bodies are not all sent, so none ends meanwhile
        start_uploads(c.port, BUDGET_UPLOADS + 4, socks)
        answered: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 30
        while len(answered) < 4 and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 0.5)
            for s in ready:
                answered[s] = s.recv(4096)
        assert len(answered) == 4, f"{len(answered)} of {len(socks)} uploads refused, not the 4 past the budget"
        for a in answered.values():
            assert a.startswith(b"HTTP/1.1 503 ") and b"held by uploads in flight" in a, a
        for s in socks:
            if s not in answered:
                finish(s)
        # the uploads that ended gave their files back: a whole budget's worth is taken again
        again: list[socket.socket] = []
        start_uploads(c.port, BUDGET_UPLOADS, again)
        socks += again
        for s in again:
            finish(s)
    finally:
        for s in socks:
            s.close()
