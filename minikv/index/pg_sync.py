"""The PostgreSQL index behind the synchronous Store interface, for the admin commands (so far
`verify`, which only reads): their code calls the index between awaits as it calls LMDB, and
here each call waits for its statement on an event loop of its own, in a helper thread. A call
blocks the command's loop for one round trip; the volumes' requests stay concurrent.
"""

from __future__ import annotations

import asyncio
import threading

from minikv.index.pg import PgStore


class SyncPgStore:
    def __init__(self, db: str, owner: str):
        self.store = PgStore(db, owner, pool_size=2)
        self.path = self.store.path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="minikv-pg", daemon=True)
        self._thread.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(self, key: bytes) -> bytes | None:
        return self._call(self.store.get(key))

    def scan(self, prefix: bytes, start: bytes = b"", limit: int = 0, keep=None, budget: int = 0):
        return self._call(self.store.scan(prefix, start, limit, keep, budget))

    def count(self) -> int:
        return self._call(self.store.count())

    def reader_check(self) -> int:
        return 0

    def close(self) -> None:
        try:
            self._call(self.store.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
