"""Seeing a running cluster: metrics, health endpoints, a status page, access logs.

How it fits the server without slowing it:
- each worker counts its requests in plain Python (counters.py) and, a few times a second,
  copies the figures into a file of its own in a folder the server's processes share
  (publish.py);
- the operations listener (`-metrics-port`, listener.py) is one socket bound before the workers
  fork; every worker accepts on it and answers from the sum of all the files, so a scrape sees
  the whole server whichever worker answers;
- one worker at a time (the leader) reads the volumes' disk figures and logs volumes going down
  and coming back (volumes.py); volumes report their disks in a file nginx serves (disk.py).

The server calls `prepare(config, args)` before it forks and `start(app)` in each worker; with
neither -metrics-port nor -v only the leader's volume watch runs (it logs volumes going down and
coming back), and the request path is untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import tempfile
import time

_prepared: dict = {}  # this server's ops setup, made before the fork and inherited by workers
FOLDER_PREFIX = "minikv-ops-"
SECRET_FLAGS = ("secret", "s3-secret-key", "s3-access-key", "s3-secret-key-file")
ADMIN_FLAGS = ("data", "concurrency", "dry-run", "force", "md5", "delete-orphans", "age", "server",
               "uploads-older-than")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("minikv")
    except PackageNotFoundError:
        return "unknown"


def shown_flags(args, config=None) -> dict:
    """The server's flags for the page: secrets only as set or not, as the server uses them
    (`config`: credentials from the environment count, as `up` passes them that way)."""
    from minikv.cli import FLAGS

    used = {} if config is None else {"secret": config.secret, "s3-access-key": config.s3_access_key,
                                      "s3-secret-key": config.s3_secret_key}
    shown = {}
    for name in FLAGS:
        if name in ADMIN_FLAGS:
            continue
        value = used.get(name) or args.flags.get(name)
        if name in SECRET_FLAGS:
            value = "(set)" if value else ""
        elif name == "db" and value:
            from minikv.index.pg import describe

            value = describe(str(value))  # a PostgreSQL URL's password: the page needs no login
        shown[name] = value
    return shown


def sweep(base: str) -> None:
    """Remove the folders of servers that died without cleaning up (kill -9): ours (same user),
    whose server is gone. A folder is a few KB, but in /dev/shm it is memory, and each start
    makes one."""
    from minikv.ops.publish import alive, read_json

    try:
        names = [n for n in os.listdir(base) if n.startswith(FOLDER_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        info = read_json(path, "server.json")
        pid = info.get("pid") if isinstance(info, dict) else None
        gone = not alive(pid) if isinstance(pid, int) else time.time() - st.st_mtime > 60
        if gone:
            shutil.rmtree(path, ignore_errors=True)


def prepare(config, args) -> None:
    """Before the workers fork: make the shared folder, bind -metrics-port if given."""
    from minikv.server import bind, check_port_free, log

    port = int(args.flags.get("metrics-port") or 0)
    if port and port == config.port:
        raise SystemExit("minikv server: -metrics-port must differ from -port (the main port's URLs are all keys)")
    sock = None
    if port:
        check_port_free(config.host, port)
        sock = bind(config.host, port)
    # in memory where there is /dev/shm: the workers rewrite their files four times a second
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    sweep(base)
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=base)
    owner = os.getpid()

    def cleanup() -> None:
        if os.getpid() == owner:
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(cleanup)
    from minikv.ops.publish import write_json

    write_json(folder, "server.json", {
        "pid": owner, "started": time.time(), "version": version(), "port": config.port,
        "metrics_port": port, "workers": config.workers, "flags": shown_flags(args, config),
    })
    _prepared.update(sock=sock, folder=folder, verbose=bool(config.verbose),
                     json_logs=bool(args.flags.get("log-json")))
    if port:
        log(f"operations listener on {config.host or '*'}:{port}: /metrics /healthz /readyz and a status page at /")


def start(app) -> None:
    """In a worker, once its app exists. Always: take part in leading (volumes going down or
    up are logged once). With -v or -metrics-port: count requests (and log them with -v). With
    -metrics-port: publish the counts and serve the listener."""
    if not _prepared:
        return
    import asyncio

    from minikv.ops.volumes import watch

    loop = asyncio.get_running_loop()
    folder = _prepared["folder"]
    tasks = app.__dict__.setdefault("_ops_tasks", [])  # held so they are not collected
    tasks.append(loop.create_task(watch(app, folder)))
    sock = _prepared["sock"]
    if sock is None and not _prepared["verbose"]:
        return  # the request path stays as it is
    from minikv.ops.counters import Counters, access_logger, instrument

    counters = Counters()
    errors: dict[str, int] = {}
    instrument(app, counters, access_logger(_prepared["json_logs"]) if _prepared["verbose"] else None)
    mark_down = app.health.mark_down

    def counted_mark_down(host: str, reason: str) -> None:
        errors[host] = errors.get(host, 0) + 1
        mark_down(host, reason)

    app.health.mark_down = counted_mark_down
    if sock is not None:
        tasks.append(loop.create_task(_publish(counters, errors, folder)))
        tasks.append(loop.create_task(_listen(app, folder, sock)))


async def _publish(counters, errors, folder: str) -> None:
    import asyncio

    from minikv.ops.publish import PUBLISH_EVERY, worker_snapshot, write_json

    name = f"{os.getpid()}.json"
    while True:
        with contextlib.suppress(OSError):
            counters.sample(time.time())
            write_json(folder, name, worker_snapshot(counters, errors))
        await asyncio.sleep(PUBLISH_EVERY)


async def _listen(app, folder: str, sock) -> None:
    from minikv.index.pg import PgStore
    from minikv.ops.listener import Listener
    from minikv.ops.report import Reporter

    if isinstance(app.store, PgStore):
        from minikv.ops.pg_facts import PgReporter as Reporter
    await Listener(Reporter(app, folder)).serve(sock)
