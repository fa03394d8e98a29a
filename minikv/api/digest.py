"""The md5 of a value as it streams past, computed beside the event loop.

hashlib releases the GIL on large buffers, so big chunks are hashed on a helper thread while
the loop keeps forwarding bytes to the replicas: on a 256 MB PUT this takes the hashing (about
half a second of CPU) off the path the bytes travel. Small chunks are hashed inline, where a
thread hop would cost more than the hash.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

INLINE_MAX = 64 << 10  # hash smaller chunks on the loop itself
BACKLOG_MAX = 8 << 20  # bytes queued for the thread before the writer waits for it

_thread: ThreadPoolExecutor | None = None  # one thread keeps chunks in order
_thread_pid = 0


def _executor() -> ThreadPoolExecutor:
    """This process's hashing thread. Made in the process that uses it: the server's supervisor
    hashes during recovery, then forks its workers, and an executor inherited across a fork
    lists a thread the child does not have: every chunk given to it would wait for ever."""
    global _thread, _thread_pid
    if _thread is None or _thread_pid != os.getpid():
        _thread, _thread_pid = ThreadPoolExecutor(1, thread_name_prefix="minikv-md5"), os.getpid()
    return _thread


class StreamingMd5:
    def __init__(self):
        self._hash = hashlib.md5()
        self._queued: collections.deque[tuple[asyncio.Future, int]] = collections.deque()
        self._backlog = 0

    async def update(self, chunk: bytes) -> None:
        if not self._queued and len(chunk) < INLINE_MAX:
            self._hash.update(chunk)
            return
        fut = asyncio.get_running_loop().run_in_executor(_executor(), self._hash.update, chunk)
        self._queued.append((fut, len(chunk)))
        self._backlog += len(chunk)
        while self._backlog > BACKLOG_MAX or (self._queued and self._queued[0][0].done()):
            fut, size = self._queued.popleft()
            await fut
            self._backlog -= size

    async def digest(self) -> bytes:
        while self._queued:
            await self._queued.popleft()[0]
        self._backlog = 0
        return self._hash.digest()

    async def close(self) -> None:
        """Wait for queued work, so no thread still reads a chunk of an abandoned upload."""
        while self._queued:
            fut, _ = self._queued.popleft()
            await asyncio.gather(fut, return_exceptions=True)
