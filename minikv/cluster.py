"""`minikv up`: a whole local cluster in one command, the first thing a newcomer runs.

Three volume servers (ports 3001-3003) and the index (port 3000), all data under one folder
(`-data`, default ./data: data/vol1..3 and data/index); with -postgres the index is a PostgreSQL
of up's own (pg_local.py, in data/postgres, kept from one start to the next) served by two index
servers, on ports 3000 and 3004, as several hosts would share one database. The volumes take
writes only from the index: a secret made at the first start is kept in data/secret and handed
to every part through the environment. Every flag `up` takes reaches each part it applies to (UP_FLAGS says which),
secrets through the environment, never the command line; the others are refused. Each part
runs as its own child process in its own process group; Ctrl-C or SIGTERM stops them all, and
if one of them dies the rest are stopped too, so nothing is left running.
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
SERVERS_PG = 2  # index servers of `up -postgres`: on -port, then after the volumes' ports
SERVER, VOLUME = "server", "volume"

# Where every flag `up` accepts goes: the parts it is handed to, () for the ones `up` uses itself,
# or why `up` refuses it. A flag missing here is refused (a test checks every flag of cli.FLAGS
# has its line): a flag must never silently not reach the process it protects.
UP_FLAGS: dict[str, tuple[str, ...] | str] = {
    "port": (),  # the index's; the volumes take the next ones
    "data": (),
    "postgres": (),  # up runs PostgreSQL and a second index server itself
    "host": (SERVER, VOLUME),
    "signed": (SERVER, VOLUME),
    "secret": (SERVER, VOLUME),
    "s3-access-key": (SERVER,),
    "s3-secret-key": (SERVER,),
    "s3-secret-key-file": (),  # read into -s3-secret-key by the flag parser, passed on as that
    "open-api": (SERVER,),
    "metrics-port": (),  # up passes its own: -port + 100 unless given
    "log-json": (SERVER,),
    "replicas": (SERVER,),
    "subvolumes": (SERVER,),
    "protect": (SERVER,),
    "fallback": (SERVER,),
    "md5sum": (SERVER,),
    "voltimeout": (SERVER,),
    "v": (SERVER,),
    "workers": (SERVER,),
    "verify-get": (SERVER,),
    "fsync": (SERVER,),
    "max-value-size": (SERVER,),
    "max-connections": (SERVER,),
    "worker-timeout": (SERVER,),
    "max-header-bytes": (SERVER,),
    "max-url": (SERVER,),
    "header-timeout": (SERVER,),
    "body-timeout": (SERVER,),
    "body-min-rate": (SERVER,),
    "idle-timeout": (SERVER,),
    "db": "up keeps the index in DATA/index; give -data DATA instead",
    "volumes": "up runs its own volumes; to use others, run `minikv server -volumes ...`",
    **{name: "only the admin commands (rebuild, rebalance, verify, repair, gc) take it"
       for name in ("concurrency", "dry-run", "force", "md5", "delete-orphans", "age", "server",
                     "uploads-older-than")},
}
# secrets reach the parts through the environment: argv is readable by every user (`ps`)
SECRET_ENV = {"secret": "MINIKV_SECRET", "s3-access-key": "MINIKV_S3_ACCESS_KEY",
              "s3-secret-key": "MINIKV_S3_SECRET_KEY"}


def refused_flags(args) -> list[str]:
    """A line for each flag given to `up` that it does not pass on."""
    return [f"-{name}: {why}" for name in sorted(args.given)
            if isinstance(why := UP_FLAGS.get(name, "up does not pass it on (a bug: add it to UP_FLAGS)"), str)]


def part_flags(args, part: str) -> list[str]:
    """The flags given to `up` that `part` takes, as its command line (secrets left out)."""
    return [f"-{name}={args.flags[name]}" for name, parts in UP_FLAGS.items()
            if name in args.given and part in parts and name not in SECRET_ENV]


def part_env(args, part: str, secret: str) -> dict[str, str]:
    """`part`'s environment: ours with the secrets it takes, and without those it does not."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV.values()}
    for name, var in SECRET_ENV.items():
        if part in UP_FLAGS[name]:
            value = secret if name == "secret" else str(args.flags[name] or os.environ.get(var, ""))
            if value:
                env[var] = value
    return env


def _wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host or "127.0.0.1", port), timeout=0.2):
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


def local_postgres(args, data: str):
    """The PostgreSQL `up -postgres` runs (None without -postgres), sized for its two servers."""
    if not args.postgres:
        return None
    from minikv.index.pg import POOL_SIZE
    from minikv.pg_local import LocalPostgres

    workers = args.workers or os.cpu_count() or 1
    # each worker's pool, plus the supervisors' and admin commands' connections
    return LocalPostgres(os.path.join(data, "postgres"), max(100, SERVERS_PG * workers * (POOL_SIZE + 1) + 20))


def run_cluster(args) -> int:
    if refused := refused_flags(args):
        print("minikv up: " + "; ".join(refused), file=sys.stderr)
        return 2
    if args.postgres and args.fsync:
        print("minikv up: -fsync is LMDB's; PostgreSQL's commits are durable by its own settings: drop -fsync",
              file=sys.stderr)
        return 2
    for name in sorted(args.given & {"secret", "s3-secret-key"}):
        print(f"minikv up: -{name} on the command line is visible to every user of this machine (ps); "
              f"set {SECRET_ENV[name]} instead (the parts get it through the environment either way)",
              file=sys.stderr)
    data = os.path.abspath(args.data)
    os.makedirs(data, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(data, 0o755)  # nginx workers (www-data) must be able to enter it
    secret = cluster_secret(data, args.secret)
    pg = local_postgres(args, data)
    if pg is not None and (why := pg.problem()):
        print(f"minikv up: -postgres: {why}", file=sys.stderr)
        return 1
    base = args.port if "port" in args.given else 3000
    vports = [base + 1 + i for i in range(VOLUMES)]
    sports = [base] + ([base + VOLUMES + 1 + i for i in range(SERVERS_PG - 1)] if pg else [])
    metrics = args.flags["metrics-port"] if "metrics-port" in args.given else base + 100
    mports = [metrics + (port - base) if metrics else 0 for port in sports]  # each its port + 100 by default
    host = args.host or "localhost"
    host = f"[{host}]" if ":" in host else host
    volumes = ",".join(f"{host}:{p}" for p in vports)
    me = [sys.executable, "-m", "minikv"]
    busy = busy_ports([*sports, *vports, *mports])
    if busy:
        print(f"minikv up: port {', '.join(map(str, busy))} already in use (another minikv up, or another "
              f"program): stop it, or give -port N to use ports N to N+{max(sports + vports) - base} and "
              f"N+100{' and up' if pg else ''}", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen] = []
    names = [f"volume on port {p}" for p in vports] + [f"index on port {p}" for p in sports]
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        db = os.path.join(data, "index")
        if pg is not None:
            try:
                if pg.init():
                    print(f"minikv up: made a PostgreSQL database in {pg.root}", file=sys.stderr)
                pg.start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                print(f"minikv up: -postgres: {e} (its log: {pg.root / 'log'})", file=sys.stderr)
                return 1
            db = pg.url()
        for i, port in enumerate(vports, 1):
            procs.append(subprocess.Popen([*me, "volume", "-port", str(port), *part_flags(args, VOLUME),
                                           os.path.join(data, f"vol{i}")],
                                          start_new_session=True, env=part_env(args, VOLUME, secret)))
        for port, p in zip(vports, procs):
            if not _wait_port(args.host, port, p):
                print(f"minikv up: volume on port {port} did not start (see above)", file=sys.stderr)
                return 1
        for port, mport in zip(sports, mports):
            server = [*me, "server", "-port", str(port), "-volumes", volumes, "-db", db,
                      *(["-metrics-port", str(mport)] if mport else []), *part_flags(args, SERVER)]
            procs.append(subprocess.Popen(server, start_new_session=True, env=part_env(args, SERVER, secret)))
            if not _wait_port(args.host, port, procs[-1], timeout=30 if pg else 15):
                print(f"minikv up: index on port {port} did not start (see above)", file=sys.stderr)
                return 1
        indexes = " and ".join(f"http://{host}:{p}" for p in sports)
        where = f"the index in PostgreSQL ({pg.root}, {db})" if pg else f"data in {data}"
        print(f"\nminikv is up: index {indexes}, volumes {volumes}, {where}\n"
              f"  curl -L -X PUT -d bigswag {host}:{base}/wehave\n"
              f"  curl -L {host}:{sports[-1]}/wehave\n"
              + "".join(f"status page http://{host}:{m}/ (metrics at /metrics; `minikv status -server {host}:{p}`)\n"
                        for p, m in zip(sports, mports) if m) +
              "Ctrl-C stops everything.", file=sys.stderr, flush=True)
        watched = list(zip(names, procs)) + ([("PostgreSQL", pg.proc)] if pg else [])
        while not stopping:
            gone = [f"{name} (exit code {p.returncode})" for name, p in watched if p.poll() is not None]
            if gone:
                print(f"minikv up: {', '.join(gone)} exited; stopping the rest", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop(procs)
        if pg is not None:
            pg.stop()  # after the servers: their sessions end first
