"""The index server's processes: one supervisor and N workers sharing one LMDB index.

The supervisor locks the database (one server per index: a second one would take the first's
writes in flight for a crash's), binds one SO_REUSEPORT socket per worker (the kernel spreads
connections over them), resolves the writes a previous crash left PENDING, then forks the
workers. Each worker opens LMDB itself after the fork (LMDB handles
must not cross a fork) and runs an asyncio loop on uvloop. When a worker dies, the supervisor
undoes that worker's in-flight writes and starts a new one on the same socket: connections
waiting in its backlog are served by the replacement. A worker whose event loop stops turning
(a request spinning, a stopped process) would hold its connections and locked keys forever while
looking alive: each loop writes the time into a shared slot every HEARTBEAT_EVERY seconds, and
the supervisor kills a worker silent for -worker-timeout, which then goes the way of a dead one.
There is always a supervisor, even for one worker, so that a single worker is watched too.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import mmap
import os
import resource
import signal
import socket
import struct
import sys
import time

from minikv import ops
from minikv.api.access import start_notes
from minikv.config import Config
from minikv.health import Health
from minikv.http.server import Batch, Connection, start_timeout_sweep
from minikv.index.engine import is_url
from minikv.index.recovery import recover
from minikv.index.store import Store, StoreError

SHUTDOWN_GRACE = 10.0  # seconds a stopping worker gives in-flight requests
HEARTBEAT_EVERY = 0.5  # seconds between two heartbeats of a worker's loop


def log(msg: str) -> None:
    print(f"minikv server [{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


LOCK_FILE = "minikv-server.lock"  # in the index's folder: held by the server that serves it


def _lock_file(path: str, command: str) -> int:
    try:
        os.makedirs(path, exist_ok=True)
        return os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        what = "is a file, not a folder" if os.path.isfile(path) else f"cannot be written: {e.strerror}"
        raise SystemExit(f"minikv {command}: -db {path} {what} (the index database is a folder)") from None


def lock_db(path: str) -> int:
    """Hold an exclusive lock on the database for as long as this server (or a worker of it)
    runs; wait a little for a previous server's workers that are still stopping."""
    fd = _lock_file(path, "server")
    deadline = time.monotonic() + SHUTDOWN_GRACE + 5
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not waiting:
                waiting = True
                log(f"another minikv server holds -db {path} (or a rebuild writing it anew); waiting up "
                    f"to {deadline - time.monotonic():.0f}s for it to stop")
            if time.monotonic() > deadline:
                raise SystemExit(f"minikv server: another minikv server uses -db {path}, or a rebuild is writing "
                                 "it: stop the server, or let the rebuild finish") from None
            time.sleep(0.2)


def try_lock_db(path: str, command: str) -> int | None:
    """lock_db without the wait, for an admin command: the lock's descriptor (the lock goes with
    it), or None when a server holds it."""
    fd = _lock_file(path, command)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` ("": every address) cannot be listened on, or None. Tried without
    SO_REUSEPORT, which would let us share the port with another server."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as e:
            return e
    return None


def check_port_free(host: str, port: int) -> None:
    if (e := bind_error(host, port)) is not None:
        raise SystemExit(f"minikv server: cannot listen on {host or '*'}:{port}: {e.strerror}")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host or "0.0.0.0", port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"minikv server: cannot listen on {host or '*'}:{port}: {e.strerror}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def volume_names_clash(config: Config) -> str | None:
    """Why -volumes cannot be served as given: two names of one server among them, or (LMDB) a
    name of a server the index names otherwise. Volumes are told apart by name: a REBALANCE, an
    S3 overwrite or a recovery would take a copy for another one's and delete it."""
    from minikv.admin.common import aliases, indexed_hosts

    if is_url(config.db):  # a sample would need a connection and a lease of its own: -volumes only
        return aliases(set(), config.volumes)
    if not os.path.exists(os.path.join(config.db, "data.mdb")):
        return aliases(set(), config.volumes)
    store = Store(config.db, readonly=True)
    try:
        return aliases(indexed_hosts(store), config.volumes)
    finally:
        store.close()


def recover_pending(config: Config, owner: int | None = None) -> None:
    if is_url(config.db):  # PostgreSQL: a previous run's records were resolved at start (index/lease.py)
        if owner is not None:
            _recover_pg_worker(config, owner)
        return
    store = Store(config.db, sync=config.fsync)
    try:
        store.reader_check()

        async def run() -> int:
            pool = config.pool()
            try:
                return await recover(store, pool, owner)
            finally:
                pool.close()

        n = asyncio.run(run())
        if n:
            log(f"undid {n} write(s) left in flight" + (f" by worker {owner}" if owner else ""))
    finally:
        store.close()


def _recover_pg_worker(config: Config, pid: int) -> None:
    from minikv.index.lease import resolve_worker
    from minikv.index.pg import PgStore, server_id

    async def run() -> int:
        store, pool = PgStore(config.db, server_id(config.port), pool_size=1), config.pool()
        try:
            return await resolve_worker(store, pool, pid)
        finally:
            pool.close()
            await store.close()

    try:
        n = asyncio.run(run())
    except StoreError as e:  # the lease's takeover resolves them if this server dies first
        log(f"could not undo the writes of worker {pid} now: {e}; they are undone at the next start")
        return
    if n:
        log(f"undid {n} write(s) left in flight by worker {pid}")


async def serve(config: Config, sock: socket.socket) -> None:
    from minikv.api.app import App

    pg = is_url(config.db)
    if pg:  # the same API on an index that awaits (api/app_pg.py)
        from minikv.api.app_pg import PgApp as App
        from minikv.index import lease
        from minikv.index.pg import PgStore, server_id

    loop = asyncio.get_running_loop()
    store = PgStore(config.db, server_id(config.port)) if pg else Store(config.db, sync=config.fsync)
    pool = config.pool()
    # the files kept back from clients (see connection_budget): half for the volume connections
    # of uploads in flight, a quarter for idle ones (two kinds per volume), the rest for the index
    kept = files_kept(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    pool.max_idle = max(2, min(pool.max_idle, kept // (8 * len(config.hosts))))
    health = Health(pool, config.hosts)
    await health.probe_all()
    health.start()
    app = App(config, store, pool, health)
    app.max_held_files = kept // 2
    from minikv.s3 import S3

    if pg:  # the same S3 code, its meta store in the database too (s3/front_pg.py)
        from minikv.s3.front_pg import PgS3 as S3
    app.s3 = S3(app)
    if pg:
        from minikv.index import fence

        fence.renewed(config.extra["lease_claimed"], config.extra["lease_token"])
        fence.use(lambda: lease.renew(store, config.extra["lease_token"]))
    keeper = loop.create_task(lease.keep(store, pool, config.extra["lease_token"])) if pg else None
    ops.start(app)  # logs volumes going down/up; -metrics-port, -v: count, publish, listen (minikv/ops)
    batch = Batch(loop)  # answers made in one pass of the loop are written together
    server = await loop.create_server(
        lambda: Connection(app, config.limits, loop, config.max_connections, batch), sock=sock, backlog=4096)
    start_timeout_sweep(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    # let requests under way finish (their records are PENDING until they do)
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while any(c._current is not None and not c._lingering for c in Connection.connections) \
            and time.monotonic() < deadline:  # (a lingering one's request is answered)
        await asyncio.sleep(0.05)
    batch.flush()  # answers made in the last pass go out before the loop ends
    from minikv.admin import move

    await move.drain()  # old copies of keys REBALANCEd moments ago
    health.stop()
    pool.close()
    if pg:
        keeper.cancel()
        await store.close()
    else:
        app.s3.close()
        store.close()


class Heartbeats:
    """One slot per worker in memory shared across the fork, where the worker's event loop
    writes the (monotonic, system-wide) time; the supervisor reads how long each has been silent."""

    def __init__(self, workers: int):
        self.mem = mmap.mmap(-1, 8 * workers)  # anonymous and MAP_SHARED: forked workers write into it

    def beat(self, i: int) -> None:
        struct.pack_into("d", self.mem, 8 * i, time.monotonic())

    def silence(self, i: int) -> float:
        return time.monotonic() - struct.unpack_from("d", self.mem, 8 * i)[0]


def _heartbeat(loop: asyncio.AbstractEventLoop, beat) -> None:
    beat()  # a timer callback: it runs only while the loop turns
    loop.call_later(HEARTBEAT_EVERY, _heartbeat, loop, beat)


def worker_main(config: Config, sock: socket.socket, beat=lambda: None) -> None:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us

    async def main() -> None:
        _heartbeat(asyncio.get_running_loop(), beat)
        await serve(config, sock)

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass


NOFILE_CAP = 1 << 20


def raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one, as Go's runtime does at start (the soft
    limit is often 1024, and every client and volume connection is a file); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_CAP if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CAP)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def files_kept(nofile: int) -> int:
    """Of `nofile` open files, those kept back from clients for volume connections and the
    index: a quarter, at least 64."""
    return max(64, nofile // 4)


def connection_budget(max_connections: int, nofile: int) -> int:
    """Client connections a worker can take with `nofile` open files, keeping files_kept for
    its volume connections and the index: past that a client gets a 503 instead of a reset, and
    writes do not fail for want of a socket to a volume."""
    budget = max(1, nofile - files_kept(nofile))
    return budget if max_connections <= 0 else min(max_connections, budget)


def run_server(args) -> int:
    config = Config.from_args(args)
    try:
        config.check()
    except ValueError as e:
        print(f"minikv server: {e}", file=sys.stderr)
        return 2
    nofile = raise_open_file_limit()
    budget = connection_budget(config.max_connections, nofile)
    if budget != config.max_connections:
        log(f"open-file limit {nofile}: at most {budget} client connections per worker "
            f"(raise `ulimit -n` for more)")
        config.max_connections = budget
    if why := volume_names_clash(config):  # before any lease or recovery: nothing is touched
        print(f"minikv server: {why}", file=sys.stderr)
        return 2
    if is_url(config.db):  # shared by many servers: a lease instead of a lock (index/lease.py)
        from minikv.index.lease import start_sync

        if config.fsync:
            raise SystemExit("minikv server: -fsync is LMDB's; on a PostgreSQL index commits are as durable "
                             "as the database's synchronous_commit makes them: drop -fsync")
        from minikv.index.pg import server_id

        claimed = time.monotonic()
        config.extra["lease_token"] = start_sync(config.db, server_id(config.port), config.pool)
        config.extra["lease_claimed"] = claimed  # the workers' fence starts from it (index/fence.py)
    else:
        lock_db(config.db)  # held until we exit; forked workers share it
    check_port_free(config.host, config.port)
    ops.prepare(config, args)  # binds -metrics-port before the workers fork
    sockets = [bind(config.host, config.port) for _ in range(config.workers)]
    recover_pending(config)
    log(f"listening on {config.host or '*'}:{config.port} with {config.workers} worker(s), "
        f"volumes {','.join(config.volumes)}, {config.replicas} replica(s), {config.subvolumes} subvolume(s)")
    for line in start_notes(config):
        log(line)
    code = supervise(config, sockets)
    if is_url(config.db):
        from minikv.index.lease import release_sync
        from minikv.index.pg import server_id

        release_sync(config.db, server_id(config.port), config.extra["lease_token"])
    return code


def supervise(config: Config, sockets: list[socket.socket]) -> int:
    workers: dict[int, int] = {}  # pid -> socket index
    hung: set[int] = set()  # workers killed for a silent loop, not reaped yet
    beats = Heartbeats(len(sockets))
    stopping = False

    def spawn(i: int) -> None:
        parent = os.getpid()
        beats.beat(i)  # the new worker has the whole timeout to start its loop
        pid = os.fork()
        if pid == 0:
            # not the supervisor's handler: until the worker's loop takes SIGTERM, it must kill
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _die_with_parent(parent)
            code = 0
            try:
                worker_main(config, sockets[i], lambda: beats.beat(i))
            except BaseException as e:  # noqa: BLE001 - a worker must never return into the supervisor
                log(f"worker failed: {e!r}")
                code = 1
            finally:
                os._exit(code)
        workers[pid] = i

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(len(sockets)):
        spawn(i)
    restarts: list[float] = []
    while workers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if config.worker_timeout > 0:  # stopping too: a stuck worker would never stop
                _kill_silent(workers, hung, beats, config.worker_timeout)
            time.sleep(0.2)
            continue
        hung.discard(pid)
        i = workers.pop(pid, None)
        if i is None or stopping:
            continue
        log(f"worker {pid} died ({_describe(status)}); undoing its writes and starting another")
        try:
            recover_pending(config, owner=pid)
        except Exception as e:  # noqa: BLE001 - the index away or full: serve on, the keys stay locked
            log(f"could not undo worker {pid}'s writes now ({e}); its keys stay locked until a worker dies "
                "again, the next start or `minikv gc` resolves them")
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 10] + [now]
        if len(restarts) > 20:
            log("workers keep dying; giving up")
            on_signal(signal.SIGTERM, None)
            continue
        spawn(i)
    return 0


def _kill_silent(workers: dict[int, int], hung: set[int], beats: Heartbeats, timeout: float) -> None:
    """SIGKILL every worker whose loop has not beaten for `timeout` seconds: its in-flight
    writes are then undone and it is replaced, as for a worker that died."""
    for pid, i in workers.items():
        if pid not in hung and (silent := beats.silence(i)) > timeout:
            log(f"worker {pid}'s event loop has not turned for {silent:.0f}s (-worker-timeout {timeout:g}s): "
                "a request stuck in a loop, or the process stopped; killing it")
            hung.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies (even by kill -9): no orphan keeps serving
    and holding the database lock."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before we asked
        os._exit(0)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
