"""What the admin commands share: their set-up from the flags, resolving the locks that dead
processes left, going through every record with N at once, and stopping cleanly on Ctrl-C.

Every command is safe with an index server running on the same LMDB: each one that changes a
key first takes its record to PENDING (owner: our pid), exactly as the server does, and a record
another process holds is left alone (and retried or reported). A PENDING record whose owner is
no longer alive was left by a crash or a kill; rebalance, repair and gc start by resolving those
with index/recovery.py, which is why running them again after an interruption completes the work.
Pids are compared as this machine sees them: run the admin commands where the server runs (LMDB
needs that anyway).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from minikv.admin import move
from minikv.admin.progress import Progress
from minikv.config import Config
from minikv.health import PROBE_PATH
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import is_url
from minikv.index.record import PENDING, decode_data, is_composite
from minikv.index.recovery import recover
from minikv.index.store import Store
from minikv.placement import host_of

PAGE = 1000  # records read per LMDB transaction (none is held across an await)
# How long a volume may stay silent on an admin command's request unless -voltimeout says: the
# server's 1 s is made to fail a client's read over fast; an admin command sends its requests in
# batches (64 keys' DELETEs pipelined on one connection) to volumes that serve the cluster too,
# and a 1,000,000-key rebalance, its disk busy with its own writes, lost 10,923 deletes and 8 moves to that 1 s.
ADMIN_VOLTIMEOUT = 5.0


# C0 controls, DEL and C1 controls (U+009B starts a terminal escape as ESC [ does)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {c: f"\\u{c:04x}" for c in range(0x80, 0xA0)}


def show(key: bytes) -> str:
    """A key as text for a line of output: bytes that are not UTF-8 as \\xNN, and control
    characters escaped, so that a key holding a newline or a terminal escape (a client can PUT
    one as %0A or %1B) cannot forge or garble an admin command's lines."""
    return key.decode("utf-8", "backslashreplace").translate(_CONTROLS)


def config_from(args, command: str) -> Config | None:
    """The config of an admin command, or None after telling the operator what is wrong."""
    config = Config.from_args(args)
    if "voltimeout" not in args.given:
        config = dataclasses.replace(config, voltimeout=ADMIN_VOLTIMEOUT)
    try:
        config.check()
    except ValueError as e:
        print(f"minikv {command}: {e}", file=sys.stderr)
        return None
    if args.concurrency < 1:
        print(f"minikv {command}: -concurrency must be at least 1", file=sys.stderr)
        return None
    return config


def open_index(config: Config, command: str) -> Store | None:
    """The existing index at -db (None after a message when there is none: a typo in -db must
    not silently create an empty index and report a clean cluster)."""
    if is_url(config.db):  # through a synchronous bridge (index/pg_sync.py)
        from minikv.index.pg import start_error
        from minikv.index.pg_sync import SyncPgStore

        try:
            return SyncPgStore(config.db, command)
        except Exception as e:  # noqa: BLE001 - a database that cannot be used: one line
            print(f"minikv {command}: {start_error(config.db, e)}", file=sys.stderr)
            return None
    if not os.path.exists(os.path.join(config.db, "data.mdb")):
        print(f"minikv {command}: no index at {config.db} (check -db; `minikv rebuild` makes one "
              "from the volumes)", file=sys.stderr)
        return None
    store = Store(config.db, sync=config.fsync)
    store.reader_check()
    return store


async def resolve_stale(store: Store, pool: Pool) -> int:
    """Undo or finish the PENDING records of processes that are gone (see index/recovery.py).
    Returns how many records were resolved."""
    if hasattr(store, "take_over"):  # PostgreSQL: the records of owners whose lease expired
        return await store.take_over(pool)
    return await recover(store, pool)  # the records of processes that are gone


async def probe(pool: Pool, hosts: list[str]) -> dict[str, str]:
    """The volume servers among `hosts` that do not answer, with the reason."""

    async def one(host: str) -> str | None:
        try:
            await pool.request(host, "GET", PROBE_PATH)
        except VolumeError as e:
            return str(e)
        return None

    results = await asyncio.gather(*(one(h) for h in hosts))
    return {h: r for h, r in zip(hosts, results) if r}


async def all_up(pool: Pool, config: Config, command: str, why: str) -> bool:
    """True when every volume of -volumes answers; else say which do not, and `why` they must."""
    down = await probe(pool, config.volumes)
    for reason in down.values():
        print(f"minikv {command}: {reason}", file=sys.stderr)
    if down:
        print(f"minikv {command}: {why}", file=sys.stderr)
    return not down


def stop_on_signal(stop: asyncio.Event, progress: Progress) -> None:
    """First Ctrl-C (or SIGTERM): finish the keys in flight, then summarise. Second: quit now
    (what was in flight stays PENDING until the next run resolves it)."""
    loop = asyncio.get_running_loop()

    def first(signum: int) -> None:
        stop.set()
        progress.say("stopping: finishing the keys in flight (Ctrl-C again to quit at once)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first, sig)


Pairs = list[tuple[bytes, bytes]]


async def each_record(store: Store, fn: Callable[[bytes, bytes], Awaitable[None]], concurrency: int,
                      progress: Progress, stop: asyncio.Event,
                      quick: Callable[[Pairs], Pairs] | None = None) -> None:
    """Call fn(key, record) for every record, `concurrency` at once, in key order. An unexpected
    error on one key is counted as failed and reported; the others go on. `quick`, if given,
    settles what it can of each page of records without an await (and ticks the progress for
    those) and returns the others, for fn."""
    queue: asyncio.Queue = asyncio.Queue(concurrency * 4)

    async def produce() -> None:
        start = b""
        try:
            while not stop.is_set():
                pairs, start = store.scan(b"", start, PAGE)
                if quick is not None:
                    pairs = quick(pairs)
                for pair in pairs:
                    if stop.is_set():
                        break
                    await queue.put(pair)
                if not start:
                    break
        finally:
            for _ in range(concurrency):
                await queue.put(None)

    async def consume() -> None:
        while (pair := await queue.get()) is not None:
            key, raw = pair
            try:
                await fn(key, raw)
            except Exception as e:  # one bad key must not stop a long run; it is reported
                progress.add("failed")
                progress.problem(f"{show(key)}: {e if isinstance(e, VolumeError) else repr(e)}")
            progress.tick()

    await asyncio.gather(produce(), *(consume() for _ in range(concurrency)))


def run(main: Callable[[], Awaitable[int]]) -> int:
    """Run an admin command's coroutine on uvloop; its exit code."""
    import uvloop

    return uvloop.run(main())


async def counted_move(p: Progress, pool: Pool, store: Store, key: bytes, raw: bytes, want: list[str],
                       epoch: int, done_as: str, not_done: str, good: list[str] | None = None
                       ) -> tuple[bool, bytes | None]:
    """move.try_move, counted in the command's progress. (True, None) when the key is settled:
    moved (counted as `done_as`) or failed (counted, and said why after `not_done`); (False, the
    record now) when it changed meanwhile and must be looked at again."""
    try:
        moved, current = await move.try_move(pool, store, key, raw, want, epoch, good=good)
    except VolumeError as e:
        p.add("failed")
        p.problem(f"{show(key)}: {not_done}: {e}")
        return True, None
    if not moved:
        return False, current
    p.add(done_as)
    p.show(**{done_as: p.counts[done_as], "failed": p.counts["failed"]})
    return True, None


def command_main(name: str, command: Callable[..., Awaitable[int]]) -> Callable[..., int]:
    """The `main(args)` of an admin command: its config from the flags (exit 2 when they are
    wrong, after saying why), then `command(args, config)` on uvloop."""

    def main(args) -> int:
        config = config_from(args, name)
        if config is None:
            return 2
        return run(lambda: command(args, config))

    return main


def foreign_names(store: Store, config: Config, sample: int = 1000) -> str | None:
    """Why the volume names in the index seem not to be -volumes' (None when they match). A
    record says `localhost:3001` where -volumes says `127.0.0.1:3001`, and every file would look
    like an orphan: refuse before deleting any."""
    hosts = indexed_hosts(store, sample)
    if hosts and not hosts & set(config.volumes):
        return (f"the index names volumes {', '.join(sorted(hosts)[:5])} and -volumes names "
                f"{', '.join(config.volumes)}: give -volumes exactly as the server was given it")
    return aliases(hosts, config.volumes)


def layout_change(store: Store, config: Config, sample: int = 1000) -> str | None:
    """What -replicas and -subvolumes would change for the first `sample` records, when most of
    them were written otherwise (None when they agree): the way to change a cluster's layout,
    as in minikeyvalue, and also what a flag forgotten does (the defaults are 3 and 10)."""
    pairs, _ = store.scan(b"", b"", sample, lambda v: v[0] != PENDING and not is_composite(v))
    if not pairs:
        return None
    records = [decode_data(raw).volumes for _, raw in pairs]
    copies = collections.Counter(len(v) for v in records).most_common(1)[0][0]
    subs = sum("/" in v[0] for v in records if v) * 2 > len(records)
    beyond = max((_sub_index(name) for v in records for name in v), default=-1)
    said = []
    if copies != config.replicas:
        said.append(f"most records hold {copies} cop{'y' if copies == 1 else 'ies'} and -replicas is "
                    f"{config.replicas}")
    if subs != (config.subvolumes > 1):
        said.append(f"most records {'name' if subs else 'name no'} subvolumes and -subvolumes is {config.subvolumes}")
    elif beyond >= config.subvolumes > 1:
        said.append(f"records name subvolume sv{beyond:02X} and -subvolumes is {config.subvolumes}")
    if not said:
        return None
    return "; ".join(said) + ": every key is moved to that layout (give the flags the server was given, if not)"


def _sub_index(volume: str) -> int:
    """The number of a `host:port/svXX` subvolume (-1 for a volume named without one)."""
    sub = volume.partition("/")[2]
    try:
        return int(sub[2:], 16) if sub[:2] == "sv" else -1
    except ValueError:
        return -1


def indexed_hosts(store: Store, sample: int = 1000) -> set[str]:
    """The volume servers the first `sample` records name."""
    pairs, _ = store.scan(b"", b"", sample, lambda v: v[0] != PENDING and not is_composite(v))
    return {host_of(v) for _, raw in pairs for v in decode_data(raw).volumes}


def aliases(indexed: set[str], volumes: list[str]) -> str | None:
    """Why two of these volume names are one server (None when none are). A record's copy on
    `127.0.0.1:3002` and -volumes' `localhost:3002` are one file under two names: compared as
    text, a rebalance would delete the copy it just wrote, and gc the copies records name."""
    seen: dict[tuple, str] = {}
    for name in sorted(set(volumes)) + sorted(indexed - set(volumes)):
        for address in _addresses(name):
            other = seen.setdefault(address, name)
            if other != name:
                where = "the index names" if name in indexed and name not in volumes else "-volumes names"
                return (f"{other} and {name} are one server under two names ({where} {name}): give "
                        "-volumes exactly as the index names its volumes")
    return None


def _addresses(name: str) -> set[tuple]:
    """The socket addresses `host:port` resolves to (none if it does not)."""
    host, _, port = name.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError):
        return set()
    return {info[4][:2] for info in infos}
