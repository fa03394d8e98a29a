"""`minikv up`, the local cluster a newcomer runs first: it serves, keeps its data under one
folder, stops everything on Ctrl-C, and refuses to start on ports something else holds."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys

import requests
from cluster import HOST, wait_closed, wait_port

from minikv.cluster import VOLUMES, busy_ports


def free_base() -> int:
    """A port N with N..N+VOLUMES all free."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        if not busy_ports(list(range(base, base + VOLUMES + 1))):
            return base
    raise RuntimeError("no free run of ports found")


def start_up(data, base: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minikv", "up", "-data", str(data), "-port", str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_up_serves_and_ctrl_c_stops_everything(data):
    base = free_base()
    up = start_up(data, base)
    try:
        for port in range(base, base + VOLUMES + 1):
            wait_port(port, up, timeout=20)
        url = f"http://{HOST}:{base}/wehave"
        assert requests.put(url, data=b"bigswag").status_code == 201
        assert requests.get(url).content == b"bigswag"
        r = requests.get(url, allow_redirects=False)
        assert r.status_code == 302 and len(r.headers["Key-Volumes"].split(",")) == 3
        # the volumes take writes from the index only: the secret is kept in the data folder
        assert (data / "secret").exists()
        assert requests.put(r.headers["Location"], data=b"x").status_code == 403
        assert sorted(p.name for p in data.iterdir()) == ["index", "secret", "vol1", "vol2", "vol3"]
    finally:
        up.send_signal(signal.SIGINT)
        out = up.communicate(timeout=20)[0].decode()
    assert up.returncode == 0, out
    assert "minikv is up" in out
    for port in range(base, base + VOLUMES + 1):
        wait_closed(port, timeout=5)


def test_up_refuses_a_port_in_use_and_starts_nothing(data):
    base = free_base()
    with socket.socket() as holder:
        holder.bind((HOST, base + 2))
        holder.listen()
        up = start_up(data, base)
        out = up.communicate(timeout=20)[0].decode()
    assert up.returncode == 1
    assert f"port {base + 2} already in use" in out and "-port" in out
    assert busy_ports(list(range(base, base + VOLUMES + 1))) == []  # nothing was left running
