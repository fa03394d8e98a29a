"""admin/parts.py: the counts of a part process that dies reach the summary as of its last
report. A rebalance part that moved keys and was then killed had made those moves: a summary
without them said fewer keys moved than had been."""

import asyncio
import os
import signal
import time
from typing import NamedTuple

from minikv.admin import parts
from minikv.admin.parts import run_parts
from minikv.admin.progress import Progress
from minikv.config import Config


class Part(NamedTuple):
    config: Config
    moved: int
    dies: bool


async def move_then_maybe_die(part: Part, progress, stop, pool) -> list[str]:
    """Counts `moved` keys; the part that `dies` then waits for two reports and kills itself."""
    progress.add("moved", part.moved)
    progress.problem("one problem line")
    if part.dies:
        await asyncio.sleep(2.5 * parts.REPORT_EVERY)
        os.kill(os.getpid(), signal.SIGKILL)
    return []


def test_a_part_killed_after_reporting_keeps_its_counts_and_is_an_error():
    config = Config(volumes=[], db="")
    progress = Progress("test", bar=False)
    start = time.monotonic()
    errors = asyncio.run(run_parts(move_then_maybe_die, "test", [Part(config, 7, False), Part(config, 5, True)],
                                   progress, asyncio.Event()))
    assert progress.counts["moved"] == 12, progress.counts
    assert progress.lines == 2, progress.lines
    assert len(errors) == 1 and "a test process exited with -9 before it finished" in errors[0], errors
    assert time.monotonic() - start < 30


def test_parts_that_end_are_counted_once_whatever_they_reported_before():
    """The reports so far are replaced by the end's counts, never added to them."""
    config = Config(volumes=[], db="")
    progress = Progress("test", bar=False)

    errors = asyncio.run(run_parts(slow_count, "test", [Part(config, 3, False), Part(config, 4, False)],
                                   progress, asyncio.Event()))
    assert errors == []
    assert progress.counts["moved"] == 7 + 2, progress.counts


async def slow_count(part: Part, progress, stop, pool) -> list[str]:
    """Counts `moved`, lets two reports go out, then one more key."""
    progress.add("moved", part.moved)
    await asyncio.sleep(2.5 * parts.REPORT_EVERY)
    progress.add("moved")
    return []


class ClaimPart(NamedTuple):
    config: Config
    aas: object  # what parts.shares gave this part
    name: str
    delay: float  # seconds spent on each folder


async def take_folders(part: ClaimPart, progress, stop, pool) -> list[str]:
    """Counts each folder it is handed, and how many went to it."""
    for aa in part.aas:
        progress.add(f"aa{aa}")
        progress.add(part.name)
        await asyncio.sleep(part.delay)
    return []


def test_parts_share_the_folders_out_one_at_a_time_each_to_one_part():
    # the part that is ahead takes more folders, so that both end together; no folder is
    # walked twice or left out
    config = Config(volumes=[], db="")
    progress = Progress("test", bar=False)
    fast, slow = parts.shares(2)
    errors = asyncio.run(run_parts(take_folders, "test", [ClaimPart(config, fast, "fast", 0.0),
                                                          ClaimPart(config, slow, "slow", 0.02)],
                                   progress, asyncio.Event()))
    assert errors == []
    assert all(progress.counts[f"aa{aa}"] == 1 for aa in range(256)), progress.counts
    assert progress.counts["fast"] + progress.counts["slow"] == 256
    assert progress.counts["fast"] > 2 * progress.counts["slow"], progress.counts
    assert parts.shares(1) == [range(256)]  # one part: all of them, no counter to share


def test_a_lock_left_taken_by_a_killed_part_is_an_error_not_a_wait_without_end(monkeypatch):
    import multiprocessing

    import pytest

    monkeypatch.setattr(parts, "LOCK_WAIT", 0.2)
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    lock = counter.get_lock()
    taker = multiprocessing.get_context("spawn").Process(target=_take_and_die, args=(counter,))
    taker.start()
    taker.join(30)
    assert taker.exitcode == -9  # killed with the lock taken
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="stayed taken"):
        next(iter(parts.Claims(counter)))
    assert time.monotonic() - start < 5
    assert not lock.acquire(timeout=0)  # still taken: nothing else could have given it back


def _take_and_die(counter) -> None:
    counter.get_lock().acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_progress_without_a_bar_says_the_same_and_loads_no_tqdm():
    # a walk's processes (and any command whose stderr is not a terminal) show no bar: they no
    # longer import tqdm for one (25 ms of each process's start, three processes a rebuild)
    import subprocess
    import sys

    script = ("import sys\nfrom minikv.admin.progress import Progress\n"
              "p = Progress('verify', total=3, bar=False)\np.tick(); p.show(keys=1); p.problem('a problem')\n"
              "p.add('keys', 2); p.summary([('keys', 'keys seen')])\nprint('tqdm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "False\n"
    assert out.stderr.startswith("verify: a problem\nverify: 2 keys seen in ")
    bar = subprocess.run([sys.executable, "-c", script.replace("bar=False", "bar=True")], capture_output=True,
                         text=True, timeout=60)
    assert bar.returncode == 0 and bar.stdout == "True\n" and "verify: a problem\n" in bar.stderr
