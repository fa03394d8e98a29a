"""Compare-and-sets of many keys in flight, written in one index transaction per batch.

An admin command moving keys `-concurrency` at once does three compare-and-sets per moved key
(lock, switch, unlock). One LMDB write transaction each is a commit each: at thousands of keys
a second the commits cost more than the moves. `Batched` wraps the store and gathers the
compare-and-sets that the keys in flight ask for during one turn of the event loop into one
`cas_many`: still one compare-and-set per key, each against the record as it is inside that
transaction, so a PUT or DELETE that got the key first is never overwritten (that key's answer
is "not done", as alone). Nothing else changes: the records written are the same, so a crash
leaves the same PENDING records for index/recovery.py to undo, however many keys a batch held.

An engine without `cas_many` (PostgreSQL through its bridge) gets its compare-and-sets one by
one, in order: the same answers, one transaction each.
"""

from __future__ import annotations

import asyncio

Op = tuple[bytes, "bytes | None", "bytes | None"]

LIMIT = 4096  # compare-and-sets per transaction at most: a commit stays short for the server's writers


class Batched:
    """The store `store` (get, cas, cas_many), with each cas gathered into a batch."""

    def __init__(self, store, limit: int = LIMIT):
        self.store = store
        self.limit = limit
        self.ops: list[Op] = []
        self.waiting: list[tuple[asyncio.Future, int, int]] = []  # future, first op, op count
        self.scheduled = False
        self.commits = 0  # transactions written (for tests and the curious)

    def __getattr__(self, name: str):  # everything else is the store's (get, scan, count, ...)
        return getattr(self.store, name)

    def cas(self, key: bytes, expect: bytes | None, new: bytes | None) -> asyncio.Future:
        """A future of (done, the record after), as store.cas answers, written with the batch."""
        fut = self.cas_many([(key, expect, new)])
        out = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() is not None
                              else out.set_result(f.result()[0]))
        return out

    def cas_many(self, ops: list[Op]) -> asyncio.Future:
        """A future of the answers of `ops`, written together in one transaction (each op sees
        the ones before it, as store.cas_many)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting.append((fut, len(self.ops), len(ops)))
        self.ops += ops
        if len(self.ops) >= self.limit:
            self.flush()
        elif not self.scheduled:
            # after the callbacks ready now: every key in flight that is about to ask does so first
            self.scheduled = True
            loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        self.scheduled = False
        ops, waiting = self.ops, self.waiting
        self.ops, self.waiting = [], []
        if not ops:
            return
        if not hasattr(self.store, "cas_many"):
            for fut, first, n in waiting:  # one by one: each caller learns what became of its own
                try:
                    answer = [self.store.cas(*op) for op in ops[first:first + n]]
                except Exception as e:  # noqa: BLE001 - told to that caller, as a lone cas would be
                    answer = e
                self.commits += 1
                answer_to(fut, answer)
            return
        try:
            answers = self.store.cas_many(ops)
            self.commits += 1
        except Exception as e:  # noqa: BLE001 - the whole batch failed (disk full): every key is told
            answers = e
        for fut, first, n in waiting:
            answer_to(fut, answers if isinstance(answers, Exception) else answers[first:first + n])


def answer_to(fut: asyncio.Future, answer) -> None:
    if fut.done():  # its caller was cancelled meanwhile: its ops were written all the same
        return
    if isinstance(answer, Exception):
        fut.set_exception(answer)
    else:
        fut.set_result(answer)
