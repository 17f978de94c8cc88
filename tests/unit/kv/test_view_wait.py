"""View.wait_for honours cancellation.

Regression: it used asyncio.wait_for, which on Python 3.11 returns the result instead of
raising when the cancellation arrives just as the predicate comes true. The placement
decider's room-wait loop, cancelled by the controller's close, then never stopped (the
decider capacity property stalled on one example, `tests/properties/test_decider_capacity.py`).
"""

from __future__ import annotations

import asyncio

import pytest

from mesh.kv.memory import MemoryStore
from mesh.kv.view import View


async def test_cancelled_wait_raises_even_as_the_predicate_comes_true() -> None:
    view = View(MemoryStore(), "/t/")  # type: ignore[arg-type] - the store is never called here
    ready = False
    waiter = asyncio.create_task(view.wait_for(lambda: ready, 5))
    await asyncio.sleep(0.01)  # waiting on the condition
    ready = True
    async with view._changed:
        view._changed.notify_all()
    waiter.cancel()  # in the same turn: the wake-up and the cancellation race
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_wait_returns_the_value_and_times_out() -> None:
    view = View(MemoryStore(), "/t/")  # type: ignore[arg-type]
    value: list[int] = []
    waiter = asyncio.create_task(view.wait_for(lambda: value and value[0], 5))
    await asyncio.sleep(0.01)
    value.append(7)
    async with view._changed:
        view._changed.notify_all()
    assert await waiter == 7
    with pytest.raises(TimeoutError):
        await view.wait_for(lambda: False, 0.01)
