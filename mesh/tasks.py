"""Long-lived loops with an owner: restarted after a crash with capped, jittered backoff
(never after a cancel), cancelled and awaited on shutdown.

A loop that keeps failing the same way (etcd down) must not fill the log: the first failure
of a kind is logged with its traceback, repeats as one line at most every REPEAT_LOG_S, and
a loop that then runs for HEALTHY_S without failing is logged as recovered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

REPEAT_LOG_S = 30.0
HEALTHY_S = 5.0


def _signature(exc: BaseException) -> tuple[str, str, int]:
    """Exception type and where it was raised: "the same error" even when details vary."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)
    return (type(exc).__qualname__, *where)


@dataclasses.dataclass
class _Streak:
    """Failures of one loop since it last ran healthily."""

    failures: int = 0
    since: float = 0.0
    seen: set[tuple[str, str, int]] = dataclasses.field(default_factory=set)
    last_logged: float = 0.0
    unlogged: int = 0


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
        streak = _Streak()
        loop = asyncio.get_running_loop()
        while True:
            healthy = None
            if streak.failures:
                healthy = loop.call_later(HEALTHY_S, self._recovered, name, streak)
            try:
                await loop_fn()
                if streak.failures:
                    self._recovered(name, streak)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if streak.failures == 0:
                    backoff = 0.1  # a fresh failure after a healthy run starts the backoff over
                self._failed(name, streak, exc, backoff)
            finally:
                if healthy is not None:
                    healthy.cancel()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)

    @staticmethod
    def _failed(name: str, streak: _Streak, exc: Exception, backoff: float) -> None:
        now = time.monotonic()
        if streak.failures == 0:
            streak.since = now
        streak.failures += 1
        signature = _signature(exc)
        if signature not in streak.seen:
            streak.seen.add(signature)
            streak.last_logged, streak.unlogged = now, 0
            log.error("%s crashed; restarting in %.1fs", name, backoff, exc_info=exc)
        elif now - streak.last_logged >= REPEAT_LOG_S:
            log.warning("%s still failing (%d failures in %.0fs, %d not logged): %s: %s", name,
                        streak.failures, now - streak.since, streak.unlogged, type(exc).__name__, exc)
            streak.last_logged, streak.unlogged = now, 0
        else:
            streak.unlogged += 1

    @staticmethod
    def _recovered(name: str, streak: _Streak) -> None:
        if streak.failures:
            log.info("%s recovered after %d failures in %.0fs", name, streak.failures,
                     time.monotonic() - streak.since)
        streak.failures, streak.unlogged = 0, 0
        streak.seen.clear()

    def running(self) -> list[str]:
        return [name for name, task in self._tasks.items() if not task.done()]

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
