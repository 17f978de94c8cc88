"""Long-lived loops with an owner: restarted after a crash with capped, jittered backoff
(never after a cancel), cancelled and awaited on shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, max_backoff: float = 5.0) -> None:
        self.max_backoff = max_backoff
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, loop_fn: Callable[[], Awaitable[None]]) -> None:
        if name in self._tasks:
            raise ValueError(f"task {name} already running")
        self._tasks[name] = asyncio.create_task(self._supervise(name, loop_fn), name=name)

    async def _supervise(self, name: str, loop_fn: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.1
        while True:
            try:
                await loop_fn()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s crashed; restarting in %.1fs", name, backoff)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)

    def running(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
