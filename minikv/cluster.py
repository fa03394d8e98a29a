"""`minikv up`: a whole local cluster in one command, the first thing a newcomer runs.

Three volume servers (ports 3001-3003) and the index (port 3000), all data under one folder
(`-data`, default ./data: data/vol1..3 and data/index). The volumes take writes only from the
index: a secret made at the first start is kept in data/secret and handed to every part through
the environment. Each part runs as its own child process
in its own process group; Ctrl-C or SIGTERM stops them all, and if one of them dies the rest
are stopped too, so nothing is left running.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

VOLUMES = 3


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def busy_ports(ports: list[int]) -> list[int]:
    """The ones among `ports` that something already listens on (on any address): checked
    before starting, since a port that answers would otherwise pass for a part that started."""
    from minikv.server import bind_error

    return [port for port in ports if bind_error("", port) is not None]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def cluster_secret(data: str, given: str) -> str:
    """The secret given, or the one kept in data/secret (made at the first start)."""
    if given:
        return given
    path = os.path.join(data, "secret")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        secret = secrets.token_hex(16)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return secret


def run_cluster(args) -> int:
    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(data, 0o755)  # nginx workers (www-data) must be able to enter it
    env = dict(os.environ, MINIKV_SECRET=cluster_secret(data, args.secret))
    base = args.port if "port" in args.given else 3000
    vports = [base + 1 + i for i in range(VOLUMES)]
    volumes = ",".join(f"localhost:{p}" for p in vports)
    me = [sys.executable, "-m", "minikv"]
    busy = busy_ports([base, *vports])
    if busy:
        print(f"minikv up: port {', '.join(map(str, busy))} already in use (another minikv up, or another "
              f"program): stop it, or give -port N to use ports N to N+{VOLUMES}", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen] = []
    names = [f"volume on port {p}" for p in vports] + [f"index on port {base}"]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i, port in enumerate(vports, 1):
            procs.append(subprocess.Popen([*me, "volume", "-port", str(port), os.path.join(data, f"vol{i}")],
                                          start_new_session=True, env=env))
        for port, p in zip(vports, procs):
            if not _wait_port(port, p):
                print(f"minikv up: volume on port {port} did not start (see above)", file=sys.stderr)
                return 1
        metrics = args.flags["metrics-port"] if "metrics-port" in args.given else base + 100
        server = [*me, "server", "-port", str(base), "-volumes", volumes, "-db", os.path.join(data, "index"),
                  "-metrics-port", str(metrics)]
        for name in ("replicas", "subvolumes", "protect", "fallback", "md5sum", "voltimeout", "v",
                     "workers", "verify-get", "fsync", "host", "signed", "max-value-size", "max-connections"):
            if name in args.given:
                server += [f"-{name}={args.flags[name]}"]
        procs.append(subprocess.Popen(server, start_new_session=True, env=env))
        if not _wait_port(base, procs[-1]):
            print(f"minikv up: index on port {base} did not start (see above)", file=sys.stderr)
            return 1
        print(f"\nminikv is up: index http://localhost:{base}, volumes {volumes}, data in {data}\n"
              f"  curl -L -X PUT -d bigswag localhost:{base}/wehave\n"
              f"  curl -L localhost:{base}/wehave\n"
              f"status page http://localhost:{metrics}/ (metrics at /metrics; `minikv status -server localhost:{base}`)\n"
              f"Ctrl-C stops everything.", file=sys.stderr, flush=True)
        while not stopping:
            gone = [f"{name} (exit code {p.returncode})" for name, p in zip(names, procs) if p.poll() is not None]
            if gone:
                print(f"minikv up: {', '.join(gone)} exited; stopping the rest", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(procs)
