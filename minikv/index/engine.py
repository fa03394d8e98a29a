"""Which index engine `-db` names, and what code shared by both engines needs to call either.

A path is LMDB (index/store.py): calls answer at once. A `postgresql://` (or `postgres://`) URL
is PostgreSQL (index/pg.py): calls are coroutines. Code on the request path of LMDB does not come
here (the app has one class per engine); slower paths shared by both (moving a key, recovery)
take either answer through `settle`.
"""

from __future__ import annotations

import inspect

from minikv.index.pg import is_url

__all__ = ["is_url", "settle"]


async def settle(answer):
    """The value of an engine call: awaited when the engine answered with a coroutine."""
    return await answer if inspect.isawaitable(answer) else answer

