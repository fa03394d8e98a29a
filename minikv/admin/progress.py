"""What a long admin command shows while it runs and when it ends.

A tqdm bar on stderr (count, rate, ETA; only on a terminal, so logs stay clean), one line per
problem (the first MAX_LINES of them, then a count), and a summary line that always prints:

    rebalance: 100000 keys seen, 23011 moved, 0 failed in 41.2s (2427 keys/s)
"""

from __future__ import annotations

import sys
import time
from collections import Counter

MAX_LINES = 100
SHOW_EVERY = 0.2  # seconds


class _NoBar:
    """The bar where none is shown (stderr not a terminal: logs, a walk's processes): tqdm's
    calls made here for nothing, without importing tqdm (25 ms of each process's start)."""

    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, fields, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(line: str, file=None) -> None:
        print(line, file=file or sys.stderr, flush=True)


class Progress:
    def __init__(self, command: str, total: int | None = None, unit: str = "keys", bar_unit: str = "",
                 bar: bool | None = None):
        self.command = command
        self.counts: Counter[str] = Counter()
        self.start = time.monotonic()
        self.lines = 0
        self.shown = 0.0
        self.unit = unit
        if not (sys.stderr.isatty() if bar is None else bar):
            self.bar = _NoBar()
        else:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=bar_unit or unit, desc=command, file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.05, mininterval=0.25)

    def tick(self, n: int = 1) -> None:
        """`n` more units of work done (moves the bar)."""
        self.bar.update(n)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def show(self, **fields) -> None:
        """Counters beside the bar (`moved=12`), at most every SHOW_EVERY seconds: tqdm formats
        them on each call, which cost a long run as much as a key's index work."""
        now = time.monotonic()
        if self.bar.disable or now - self.shown < SHOW_EVERY:
            return
        self.shown = now
        self.bar.set_postfix(fields, refresh=False)

    def say(self, message: str) -> None:
        """An operator-facing line that does not break the bar."""
        self.bar.write(f"{self.command}: {message}", file=sys.stderr)  # tqdm: above the bar, drawn again

    def problem(self, message: str) -> None:
        self.lines += 1
        if self.lines <= MAX_LINES:
            self.say(message)
        elif self.lines == MAX_LINES + 1:
            self.say("more problems follow; only their count is shown from here on")

    def close(self) -> None:
        self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def summary(self, parts: list[tuple[str, str]], always: int = 3, tail: str = "") -> str:
        """Print and return `<command>: <n> <label>, ... in 1.2s (<rate> keys/s)`: `parts` are
        (counter, label) pairs, the first `always` shown even when zero, the others only when
        not; the rate is of the first one."""
        self.close()
        elapsed = self.elapsed
        first = self.counts[parts[0][0]] if parts else 0
        text = ", ".join(f"{self.counts[name]} {label}" for i, (name, label) in enumerate(parts)
                         if i < always or self.counts[name])
        line = (f"{self.command}: {text} in {elapsed:.1f}s "
                f"({first / elapsed if elapsed > 0 else 0:.0f} {self.unit}/s){tail}")
        print(line, file=sys.stderr, flush=True)
        return line
