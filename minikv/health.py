"""Which volume servers are up, as one worker sees them.

A background task probes every volume twice a second (a GET of a file that is never there:
any HTTP answer means nginx is serving), and failures seen while serving requests mark a volume
down at once. Redirects then go only to replicas on volumes that are up, with no network call
on the read path.

A volume that stops closes the kept-alive connections the pool holds to it (the probes keep
one warm in every worker): the close of a connection nothing was asked on has that volume
probed at once, so a stopped volume is down a fraction of a millisecond later, not at the next
round; one that only closed connections (nginx reloading, its keepalive_timeout) answers the
probe and nothing changes. Such a probe must leave a kept connection behind to be told of the
next close: one answered by a worker that exits right after it (nginx's workers stop one by one)
leaves none, and is asked again a moment later until one is kept or the volume fails. A failure that is the index's own (out of open files: `LocalError`)
says nothing of the volume and marks nothing. Nor does a probe that timed out once: its timer
runs on our own loop, which one long request may have held past it; it is asked again first.
"""

from __future__ import annotations

import asyncio
import contextlib

from minikv.http.client import LOCAL_PREFIX, LocalError, Pool, VolumeError

PROBE_PATH = "/.minikv-health-probe"
QUICK_PROBES = 12  # after a close: probes until one leaves a kept connection, 5 ms apart at first


class Health:
    def __init__(self, pool: Pool, hosts: list[str], interval: float = 0.5):
        self.pool = pool
        self.hosts = hosts
        self.interval = interval
        self.down: set[str] = set()  # empty in the common case: the read path checks only that
        self.reasons: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self._probing: dict[str, asyncio.Task] = {}  # probes asked for by a closed idle connection
        pool.on_idle_lost = self.suspect

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def is_up(self, host: str) -> bool:
        return host not in self.down

    def mark_down(self, host: str, reason: str) -> None:
        if reason.startswith(LOCAL_PREFIX):  # our shortage (a LocalError): the volume may be fine
            return
        if host not in self.down:
            self.down.add(host)
            self.pool.forget(host)
        self.reasons[host] = reason

    def mark_up(self, host: str) -> None:
        if host in self.down:
            self.down.discard(host)
            self.pool.forget(host)  # connections from before the outage are dead
        self.reasons.pop(host, None)

    async def probe(self, host: str) -> None:
        for attempt in range(2):
            try:
                await self.pool.request(host, "GET", PROBE_PATH)
            except LocalError:
                return  # we could not even ask: the volume's state is unknown, so it stays as it was
            except VolumeError as e:
                if attempt == 0 and e.timed_out:
                    # the timer runs on our own loop: a request that held it for a second made
                    # every probe of that second late, whatever the volumes did. Asked again
                    continue
                # shown to clients whose writes need this volume: say it was the probe, not their request
                self.mark_down(host, f"volume {host} is down (health check: {e.what})")
                return
            self.mark_up(host)
            return

    def suspect(self, host: str) -> None:
        """`host` closed a connection that was idle in the pool: probe it now (once at a time).
        Not marked down before the probe says so: that would refuse writes for nothing when
        nginx only reloaded, and measured no fewer failed reads after a stop."""
        if host in self._probing or host in self.down or host not in self.hosts:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._probe_until_kept(host))
        except RuntimeError:  # no loop runs (the pool is being closed at exit)
            return
        self._probing[host] = task
        task.add_done_callback(lambda _: self._probing.pop(host, None))

    async def _probe_until_kept(self, host: str) -> None:
        for attempt in range(QUICK_PROBES):
            await self.probe(host)
            if host in self.down or self.pool.holds_idle(host):
                return
            await asyncio.sleep(min(0.005 * 2 ** attempt, 0.1))

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(h) for h in self.hosts))

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.probe_all()
            await asyncio.sleep(self.interval)
