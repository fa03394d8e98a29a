"""Group commit for `-fsync`: the compare-and-sets of one worker that arrive while a commit is
being made wait, and then go together in the next transaction, so one fsync serves them all.

With fsync on, a commit takes a disk flush (milliseconds). Made on the event loop it would stop
every other request meanwhile, and made one by one it would cap writes at one per flush. Here a
helper thread makes the commits: while it flushes one batch the loop keeps serving and queues
the next, so throughput grows with the number of writes in flight instead of falling with the
flush time. An acknowledgment (201, 204) is only sent after the batch holding its record change
was flushed.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from minikv.index.store import Store


class GroupCommit:
    def __init__(self, store: Store):
        self.store = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="minikv-commit")
        self._queue: list[tuple[bytes, bytes | None, bytes | None, asyncio.Future]] = []
        self._busy = False

    async def cas(self, key: bytes, expect: bytes | None, new: bytes | None) -> tuple[bool, bytes | None]:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((key, expect, new, fut))
        if not self._busy:
            self._commit()
        return await fut

    def _commit(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._thread, self.store.cas_many, [op[:3] for op in batch])
        done.add_done_callback(lambda f: self._answer(batch, f))

    def _answer(self, batch, f: asyncio.Future) -> None:
        self._busy = False
        if f.exception() is not None:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(f.exception())
        else:
            for (*_, fut), result in zip(batch, f.result()):
                if not fut.done():
                    fut.set_result(result)
        if self._queue:
            self._commit()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
