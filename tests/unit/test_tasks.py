"""Supervisor logging: a loop failing the same way over and over logs one traceback, then a
line at most every REPEAT_LOG_S, and a recovery line once it runs healthily again."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mesh import tasks
from mesh.errors import Unavailable


async def test_repeated_failure_logs_one_traceback_then_rate_limited_lines_then_recovery(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a pod logged a full traceback every ~5 s while etcd was down."""
    monkeypatch.setattr(tasks, "REPEAT_LOG_S", 0.3)
    monkeypatch.setattr(tasks, "HEALTHY_S", 0.2)
    failures = {"left": 12}
    healthy = asyncio.Event()

    async def loop_fn() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise Unavailable("etcd member 127.0.0.1:2379 unavailable: UNAVAILABLE: connection refused")
        healthy.set()
        await asyncio.Event().wait()

    sup = tasks.Supervisor(max_backoff=0.05)
    with caplog.at_level(logging.INFO, logger="mesh.tasks"):
        sup.start("lease", loop_fn)
        await asyncio.wait_for(healthy.wait(), 10)
        await asyncio.sleep(0.4)
        await sup.stop()
    records = [r for r in caplog.records if r.name == "mesh.tasks"]
    tracebacks = [r for r in records if r.exc_info]
    assert len(tracebacks) == 1
    repeats = [r for r in records if "still failing" in r.getMessage()]
    assert len(repeats) < 11, "repeats are rate limited, not one per failure"
    recovered = [r for r in records if "recovered after 12 failures" in r.getMessage()]
    assert len(recovered) == 1


async def test_a_different_error_gets_its_own_traceback(caplog: pytest.LogCaptureFixture) -> None:
    errors = [Unavailable("etcd down"), ValueError("bad record"), Unavailable("etcd down")]
    done = asyncio.Event()

    async def loop_fn() -> None:
        if errors:
            raise errors.pop(0)
        done.set()
        await asyncio.Event().wait()

    sup = tasks.Supervisor(max_backoff=0.01)
    with caplog.at_level(logging.INFO, logger="mesh.tasks"):
        sup.start("reconcile", loop_fn)
        await asyncio.wait_for(done.wait(), 10)
        await sup.stop()
    tracebacks = [r.exc_info[0] for r in caplog.records if r.name == "mesh.tasks" and r.exc_info]
    assert tracebacks == [Unavailable, ValueError]
