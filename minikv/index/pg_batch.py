"""One query for the lookups a worker's requests make at about the same time (PostgreSQL index).

Under load a worker parses many requests in one pass of its event loop; each would send its own
SELECT, and each SELECT costs PostgreSQL a round trip, a parse of the protocol message and an
executor start much larger than the index lookup itself. Here the keys asked for in one pass are
gathered and sent as one `WHERE k = ANY($1)` query when the loop comes round again; each asker
gets its own records. At most MAX_BATCH keys go in one query; with no load a lookup waits for
nothing but one turn of the loop.
"""

from __future__ import annotations

import asyncio

MAX_BATCH = 256


class Lookups:
    def __init__(self, store):
        self.store = store
        self.waiting: list[tuple[list[bytes], asyncio.Future]] = []
        self.keys = 0

    def get_many(self, keys: list[bytes]) -> asyncio.Future:
        """A future of {key: record} for those of `keys` that have one."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.waiting:
            loop.call_soon(self._flush)
        self.waiting.append((keys, fut))
        self.keys += len(keys)
        if self.keys >= MAX_BATCH:
            self._flush()
        return fut

    def _flush(self) -> None:
        if not self.waiting:
            return
        batch, self.waiting, self.keys = self.waiting, [], 0
        asyncio.ensure_future(self._ask(batch))

    async def _ask(self, batch: list[tuple[list[bytes], asyncio.Future]]) -> None:
        keys = list({k for ks, _ in batch for k in ks})
        try:
            found = await self.store.get_many(keys)
        except BaseException as e:  # noqa: BLE001 - every asker gets the failure (503 with its reason)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else asyncio.CancelledError())
            if not isinstance(e, Exception):
                raise
            return
        for ks, fut in batch:
            if not fut.done():
                fut.set_result({k: found[k] for k in ks if k in found})
