"""mesh.process.shutdown_step, what router and placement shutdowns are made of: a step that
fails or overruns its bound is logged with what it was, and the next step still runs.

Regression test for issue 9 ("placement's shutdown suppresses a failure of set_serving together
with server.stop"): one `contextlib.suppress(Exception)` around both meant a failed health
update skipped the server stop, and neither failure was logged.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mesh.process import shutdown_step


async def test_a_failing_step_is_logged_and_the_next_one_runs(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    async def health() -> None:
        raise RuntimeError("health servicer closed")

    async def server_stop() -> None:
        ran.append("server stop")

    with caplog.at_level(logging.ERROR, logger="mesh.process"):
        assert await shutdown_step("health NOT_SERVING", health()) is False
        assert await shutdown_step("gRPC server stop", server_stop()) is True
    assert ran == ["server stop"]
    (record,) = caplog.records
    assert record.getMessage() == "shutdown: health NOT_SERVING failed; going on"
    assert record.exc_info and "health servicer closed" in str(record.exc_info[1])


async def test_a_step_over_its_bound_is_cut_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    cancelled = asyncio.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with caplog.at_level(logging.ERROR, logger="mesh.process"):
        assert await shutdown_step("lease revoke", stuck(), timeout_s=0.05) is False
    assert cancelled.is_set()
    assert [r.getMessage() for r in caplog.records] == ["shutdown: lease revoke took longer than 0.1s; going on"]


async def test_cancellation_of_the_shutdown_itself_is_not_swallowed() -> None:
    async def step() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(shutdown_step("anything", step()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
