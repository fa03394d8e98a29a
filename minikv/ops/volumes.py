"""What the index knows of each volume beyond up/down: its disk, and how fast it answers.

One worker at a time leads (it holds a lock on a file in the shared folder; when it dies the
lock goes and the next worker to try takes it): it reads every volume's disk file once a second
(the answer's time is the volume's latency), writes what it learnt to volumes.json for the other
workers, and logs each volume that goes down or comes back, once for the whole server, with the
reason its health checker gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sys
import time

from minikv.http.client import VolumeError
from minikv.ops.disk import DISK_FILE
from minikv.ops.publish import read_json, write_json

POLL_EVERY = 1.0
VOLUMES_FILE = "volumes.json"


def log(msg: str) -> None:
    print(f"minikv server [{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class Leader:
    def __init__(self, folder: str):
        self.folder = folder
        self.fd: int | None = None

    def holds(self) -> bool:
        """True while this worker leads (taking the lead when it is free)."""
        if self.fd is not None:
            return True
        fd = os.open(os.path.join(self.folder, "leader.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True


async def check_volume(pool, host: str) -> dict:
    """The volume's disk figures and its answer time (None figures: it has no disk file, or
    did not answer)."""
    start = time.perf_counter()
    try:
        resp = await pool.request(host, "GET", "/" + DISK_FILE)
    except VolumeError as e:
        return {"latency": None, "disk": None, "error": e.what}
    latency = time.perf_counter() - start
    disk = None
    if resp.status == 200:
        with contextlib.suppress(ValueError):
            disk = json.loads(resp.body)
    return {"latency": latency, "disk": disk if isinstance(disk, dict) else None,
            "error": None if disk else f"answered {resp.status} for its disk file (an older minikv volume?)"}


async def watch(app, folder: str) -> None:
    """Lead when we can: poll the volumes, publish, log changes of health."""
    leader = Leader(folder)
    health = app.health
    while True:
        await asyncio.sleep(POLL_EVERY)
        try:
            if not leader.holds():
                continue
            previous = read_json(folder, VOLUMES_FILE) or {}
            found = await asyncio.gather(*(check_volume(app.pool, h) for h in health.hosts))
            logged = previous.get("down", {})  # what the last leader logged as down
            now = time.time()
            down = {}
            for host in health.hosts:
                if host in health.down:
                    down[host] = logged.get(host) or [health.reasons.get(host, f"volume {host} is down"), now]
                    if host not in logged:
                        log(down[host][0])
                elif host in logged:
                    log(f"volume {host} is up again (down for {now - logged[host][1]:.1f}s)")
            write_json(folder, VOLUMES_FILE, {"time": now, "down": down,
                                              "volumes": dict(zip(health.hosts, found))})
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the figures are worth less than the worker
            log(f"ops: could not check the volumes: {e!r}")
