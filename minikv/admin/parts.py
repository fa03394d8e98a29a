"""A walk of the volumes shared out among processes, each taking a share of the 256 `<aa>`
folders: what rebuild and verify do to use more than one core (and rebalance, whose parts share
the index's keys instead: admin/rebalance.py).

The walk is CPU-bound (Python around each listing or folder, and the kernel for local folders),
so one process tops out at one core. Each part runs `run(part, progress, stop, pool)` in its own
process, spawned: nothing of this one's event loop or LMDB handle crosses a fork. A part sends
back its counts and its problem-line count every REPORT_EVERY seconds and at the end (with its
errors), and counts what it finished (`<aa>` folders; a rebalance's keys) in a shared counter
as it goes, for the one bar the parent shows. A part that dies without a word (killed, out of
memory) makes an error, so the command never reports a walk it did not finish as complete, and
its counts up to its last report are in the summary (a rebalance's moves it made are then
counted, but for its last second). A part ends with the command: one
killed with SIGKILL takes its parts along (PR_SET_PDEATHSIG), and a second Ctrl-C kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator

from minikv.admin.progress import Progress
from minikv.http.client import Pool

PR_SET_PDEATHSIG = 1  # prctl's: the signal this process gets when its parent ends
DEFAULT_PROCS = 2  # processes walking the volumes (-workers): one per core of a small machine
SMALL = 20_000  # index records up to which verify and rebalance take one process unless -workers says
GC_THRESHOLDS = (10_000, 10, 10)  # a part's; Python's default is (700, 10, 10)
REPORT_EVERY = 1.0  # seconds between a part's reports of its counts so far
SHOW_EVERY = 0.1  # seconds between two updates of the parent's bar
LOCK_WAIT = 10.0  # seconds a part waits for a lock it shares with the others (held for microseconds)

# run(part, progress, stop, pool) -> the walk's errors; a module-level function (it is pickled by name)
PartRun = Callable[[object, Progress, asyncio.Event, Pool], Awaitable[list[str]]]


def processes(args, config, records: int, most: int = 256) -> int:
    """How many processes a command over `records` index records runs: -workers when given,
    else DEFAULT_PROCS, or 1 for an index of up to SMALL records (starting others would cost
    more than they save); from 1 to `most`."""
    if "workers" in args.given:
        wanted = config.workers
        if wanted > most:
            print(f"minikv {args.command}: -workers {wanted}: runs {most} processes, the most it splits its "
                  "work into (more than the cores only adds switching)", file=sys.stderr)
    else:
        wanted = DEFAULT_PROCS if records > SMALL else 1
    return max(1, min(wanted, most))


@contextlib.contextmanager
def held(lock) -> Iterator[None]:
    """`with lock:` for a lock shared with the other parts, which one of them may have taken with
    it when it was killed: then an error (this part ends, the walk is said to be incomplete)
    instead of a wait without end."""
    if not lock.acquire(timeout=LOCK_WAIT):
        raise RuntimeError(f"a lock shared with the other processes stayed taken for {LOCK_WAIT:g}s: "
                           "one of them was killed holding it?")
    try:
        yield
    finally:
        lock.release()


class Claims:
    """The 256 `<aa>` folders, handed out one at a time to whichever part asks first, so that the
    parts end together (a fixed share of every other folder each left one of a local rebuild's
    two parts idle for the last 0.1-0.2 s). Iterated by several processes at once: each folder
    goes to one of them."""

    def __init__(self, counter):
        self.counter = counter  # a multiprocessing Value: the next folder to hand out

    def __iter__(self) -> Iterator[int]:
        while True:
            with held(self.counter.get_lock()):
                count = self.counter.get_obj()  # the number itself: its lock is held already
                aa = count.value
                if aa >= 256:
                    return
                count.value = aa + 1
            yield aa


def shares(procs: int) -> list[Iterable[int]]:
    """The `<aa>` folders of each of `procs` parts: all of them for one, else the same Claims for
    each (to be handed to the parts' processes as they start, as run_parts does)."""
    if procs == 1:
        return [range(256)]
    return [Claims(multiprocessing.get_context("spawn").Value("i", 0))] * procs


def _die_with(parent: int) -> None:
    """End this process when `parent` ends. A part outlived a parent killed by SIGKILL (which
    gets no chance to stop it): a rebalance's part went on moving keys while the operator ran
    the command again. Linux only; elsewhere a part goes on to its end, as before."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _child(run: PartRun, command: str, part, done, conn, parent: int) -> None:
    """One part's process: sends ("so far", counts, problem lines) on `conn` every REPORT_EVERY
    seconds, ("end", counts, problem lines, stopped, errors) at the end, and counts what it
    finished in `done` as it goes."""
    _die_with(parent)
    # the parent alone answers Ctrl-C (run_parts); a SIGINT pending since the start is dropped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    import uvloop

    from minikv.admin.trim import keep_trimmed

    keep_trimmed()  # a part reads or writes the index itself: its mapped pages would all count in its RSS
    # A walk makes millions of short-lived objects and almost no cycles: the collector's passes
    # over the young ones (and over the imported modules) were 7% of a part's CPU
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    progress = Progress(command, bar=False)

    def tick(n: int = 1) -> None:  # the parent shows one bar for all parts
        with held(done.get_lock()):
            done.value += n

    progress.tick = tick

    async def main() -> None:
        stop = asyncio.Event()
        # the parent tells each part with one SIGTERM to finish the folder in flight; one that
        # came while the part started (blocked since: run_parts) is delivered now, to stop.set
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        pool = part.config.pool()
        reports = asyncio.get_running_loop().create_task(report())
        try:
            errors = await run(part, progress, stop, pool)
        finally:
            reports.cancel()
            pool.close()
        conn.send(("end", dict(progress.counts), progress.lines, stop.is_set(), errors))

    async def report() -> None:
        # so that a part killed mid-way leaves its counts: the moves it made happened
        while True:
            await asyncio.sleep(REPORT_EVERY)
            try:
                conn.send(("so far", dict(progress.counts), progress.lines))
            except OSError:  # the parent is gone, and this part with it (PR_SET_PDEATHSIG)
                return

    uvloop.run(main())


async def run_parts(run: PartRun, command: str, parts: list, progress: Progress, stop: asyncio.Event,
                    shown: str | None = "keys") -> list[str]:
    """Run each part in its own process, showing their progress on `progress` (and the count
    `shown` beside the bar); their errors, one for each part that died before it finished."""
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Value("q", 0)
    running: dict[int, tuple] = {}
    # A Ctrl-C, or a SIGTERM to the process group (`kill -TERM -PGID`, `timeout`, systemd),
    # reaches every part: one still starting was killed by it, or raised a traceback, before it
    # could set what it does with them. Parts start with both blocked (the mask outlives exec),
    # ignore SIGINT and handle SIGTERM before they unblock them. Here the signal is handled as
    # ever (the other threads of this process do not block it; the handler only notes it).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for i, part in enumerate(parts):
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(run, command, part, done, theirs, os.getpid()), daemon=True)
            proc.start()
            theirs.close()
            running[i] = (proc, ours)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    errors: list[str] = []
    so_far: dict[int, tuple[dict, int]] = {}  # each part's counts and problem lines, last reported
    shown_done, told = 0, False
    # a part's word (or its end: EOF) wakes the loop at once, so that the summary does not wait
    # out a poll's sleep; the bar is drawn at least every SHOW_EVERY seconds anyway
    loop = asyncio.get_running_loop()
    heard = asyncio.Event()
    for _, pipe in running.values():
        loop.add_reader(pipe.fileno(), heard.set)
    try:
        while running:
            for i, (proc, pipe) in list(running.items()):
                counts = None
                try:
                    while counts is None and pipe.poll():
                        kind, *message = pipe.recv()
                        if kind == "so far":
                            so_far[i] = message[0], message[1]
                        else:
                            counts, lines, stopped, errs = message
                except EOFError:  # it died without a word
                    proc.join()
                    counts, lines = so_far.get(i, ({}, 0))
                    stopped = False
                    errs = [f"a {command} process exited with {proc.exitcode} before it finished "
                            f"(the summary has its counts as of its last report; it reports every "
                            f"{REPORT_EVERY:g}s)"]
                    if stop.is_set() and proc.exitcode == -signal.SIGTERM:
                        stopped, errs = True, []  # a SIGTERM after its loop ended: stopped, as asked
                if counts is None:
                    continue
                progress.counts.update(counts)
                progress.lines += lines
                errors += errs
                if stopped:
                    stop.set()
                proc.join()
                del running[i]
                loop.remove_reader(pipe.fileno())
                pipe.close()
            if stop.is_set() and not told:
                told = True
                for proc, _ in running.values():
                    if proc.pid is not None and proc.is_alive():
                        os.kill(proc.pid, signal.SIGTERM)  # it finishes its folder in flight
            # read without its lock, which a part killed while holding it would keep forever
            finished = done.get_obj().value
            progress.tick(finished - shown_done)
            shown_done = finished
            if shown:
                progress.show(**{shown: progress.counts[shown]})
            if not running:
                break  # the last part has ended: no wait for a word that cannot come
            try:
                await asyncio.wait_for(heard.wait(), SHOW_EVERY)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                pass
            heard.clear()
    except BaseException:
        # a second Ctrl-C (KeyboardInterrupt): quit at once, the parts too. A SIGTERM, as
        # multiprocessing gives its children on the way out, would have them finish their work
        # in flight first (what a rebalance left locked, its next run resolves)
        for proc, _ in running.values():
            if proc.is_alive():
                proc.kill()
        raise
    finally:
        for _, pipe in running.values():
            loop.remove_reader(pipe.fileno())
            pipe.close()
    return errors
