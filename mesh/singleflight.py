"""Per-key single flight: concurrent callers for one key share one running task.

Keyed, never one global lock: different keys run in parallel. The entry disappears when the
task finishes, so a later call starts afresh (e.g. a reload after an eviction).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}
        self.started = 0

    def __len__(self) -> int:
        return len(self._running)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """Runs fn() once for all concurrent callers with this key; each may be cancelled alone
        (shield) without cancelling the shared work."""
        task = self._running.get(key)
        if task is None:
            self.started += 1
            task = asyncio.ensure_future(fn())
            self._running[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters got it, or nobody was left to

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
