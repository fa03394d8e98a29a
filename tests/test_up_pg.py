"""`minikv up -postgres`: a PostgreSQL of its own under the data folder, two index servers on it
and the volumes; a key written through one server is read through the other; Ctrl-C leaves no
process of it running; a second start keeps the data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from cluster import HOST, wait_closed, wait_port
from test_processes import tree
from test_up import free_base

from minikv.cluster import SERVERS_PG, VOLUMES, busy_ports
from minikv.pg_local import bin_dir

pytestmark = pytest.mark.skipif(bin_dir() is None, reason="PostgreSQL is not installed (`./dev test` installs it)")


def pg_base() -> int:
    """A port N with the index servers', the volumes' and the status pages' ports all free."""
    for _ in range(50):
        base = free_base()
        ports = [base + i for i in range(VOLUMES + SERVERS_PG)]
        if not busy_ports(ports + [p + 100 for p in ports]):
            return base
    raise RuntimeError("no free run of ports found")


def start(data, base: int, log) -> subprocess.Popen:
    with open(log, "ab") as out:
        up = subprocess.Popen([sys.executable, "-m", "minikv", "up", "-postgres", "-workers", "1", "-data",
                               str(data), "-port", str(base)], stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    servers = [base, base + VOLUMES + 1]
    for port in [*servers, *range(base + 1, base + 1 + VOLUMES)]:
        wait_port(port, up, timeout=60)
    return up


def stop(up: subprocess.Popen, log) -> list[int]:
    """SIGINT (Ctrl-C) to up alone; the pids of everything it ran, all gone."""
    below = tree(up.pid)
    up.send_signal(signal.SIGINT)
    up.wait(timeout=60)
    assert up.returncode == 0, log.read_text()
    return below


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie runs no more
    except FileNotFoundError:
        return True


def test_up_postgres_two_servers_one_index_ctrl_c_stops_all_and_data_is_kept(data):
    base = pg_base()
    a, b = f"http://{HOST}:{base}", f"http://{HOST}:{base + VOLUMES + 1}"
    log = data.parent / "up.log"
    up = start(data, base, log)
    try:
        below = tree(up.pid)
        postmasters = [p for p in below if os.path.basename(os.readlink(f"/proc/{p}/exe")) == "postgres"]
        assert postmasters, "no PostgreSQL process under up"
        assert requests.put(f"{a}/wehave", data=b"bigswag", timeout=10).status_code == 201
        r = requests.get(f"{b}/wehave", allow_redirects=False, timeout=10)
        assert r.status_code == 302 and len(r.headers["Key-Volumes"].split(",")) == 3
        assert requests.get(f"{b}/wehave", timeout=10).content == b"bigswag"
        # one lock across both servers: the key is there for both
        assert requests.put(f"{b}/wehave", data=b"other", timeout=10).status_code == 403
        assert requests.get(f"{a}/?list", timeout=10).json()["keys"] == ["/wehave"]
    finally:
        below = stop(up, log)
    out = log.read_text()
    assert "minikv is up" in out and f":{base + VOLUMES + 1}" in out
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in below if not gone(p)] == []
    assert len(below) > VOLUMES + SERVERS_PG + 1  # nginx's, the servers' workers, PostgreSQL's own
    wait_closed(base)
    assert (data / "postgres" / "db" / "PG_VERSION").exists()

    up = start(data, base, log)  # the same folder: the same database
    try:
        assert requests.get(f"{b}/wehave", timeout=10).content == b"bigswag"
        assert requests.get(f"{a}/wehave", timeout=10).content == b"bigswag"
    finally:
        stop(up, log)
    assert "made a PostgreSQL database" in (out := log.read_text()) and out.count("made a PostgreSQL") == 1


def test_up_postgres_without_postgresql_says_what_to_install(data, tmp_path):
    """No PostgreSQL programs (PATH without them, no /usr/lib/postgresql): one line, no traceback."""
    env = {**os.environ, "PATH": str(tmp_path)}
    code = ("import sys, minikv.pg_local as p; p.bin_dir = lambda: None; from minikv.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "up", "-postgres", "-data", str(data), "-port",
                          str(pg_base())], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 1, out
    assert "apt-get install postgresql" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
