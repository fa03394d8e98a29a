"""Two index servers on one PostgreSQL: one stopped past its lease while a PUT of it streams.

The other takes its writes over (index/lease.py) and lets a client write the key anew; the
stopped one, continued, must not commit its old upload over that acknowledged value: nginx would
rename its file over the newer one (a file's path is its key's), and every replica would then
hold bytes the record's md5 does not match. Its last bytes go only on a fresh lease
(index/fence.py)."""

from __future__ import annotations

import hashlib
import signal
import socket
import time

from cluster import Proc, free_port
from test_admin import holders

from minikv.placement import key2path

ENGINES = ["postgresql"]


def test_a_server_stopped_past_its_lease_does_not_commit_over_a_newer_write(make_cluster):
    c = make_cluster(volumes=3)
    port = free_port()
    other = Proc(["server", "-port", str(port), "-volumes", ",".join(c.names), "-db", c.db,
                  "-replicas", str(c.replicas), "-subvolumes", str(c.subvolumes), "-workers", "2"],
                 port, c.root / "other.log").start()
    try:
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"PUT /fenced HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"X" * 100_000)
        time.sleep(1)  # the other server takes the key's lock at the headers
        assert c.put("/fenced", b"C").status_code == 409  # it holds the key
        other.send(signal.SIGSTOP)
        try:
            newer = b"C" * 1000
            deadline = time.monotonic() + 40
            while (status := c.put("/fenced", newer).status_code) != 201:  # its lease runs out
                assert status == 409 and time.monotonic() < deadline, status
                time.sleep(0.25)
        finally:
            other.send(signal.SIGCONT)
        stalled.sendall(b"X" * 100_000)
        stalled.settimeout(20)
        answer = stalled.recv(4096)
        assert not answer.startswith(b"HTTP/1.1 201"), answer
        stalled.close()
        r = c.session.get(c.url("/fenced"), allow_redirects=False)
        assert r.status_code == 302 and r.headers["Content-Md5"] == hashlib.md5(newer).hexdigest()
        path = key2path(b"/fenced")[1:]
        copies = {where: (c.volume_dir(where.split("/")[0]) / where.split("/")[1] / path).read_bytes()
                  for where in holders(c, "/fenced")}
        assert len(copies) == c.replicas and all(v == newer for v in copies.values()), \
            {k: v[:10] + b"..." + str(len(v)).encode() for k, v in copies.items()}
    finally:
        other.stop()
