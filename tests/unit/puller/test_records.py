"""The pod's record publisher (puller/records.py) over the fake etcd: a record changed while a
flush is in flight is written right after it, not after the failure backoff."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from mesh.types import CopyRecord, CopyState
from puller import records

from .pod import POD, Pod


async def test_a_change_during_a_flush_is_written_at_once_not_after_the_backoff(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: Publisher.flush returned False when a record was marked again while the
    flush ran although no write had failed, so `run` slept the failure backoff (50-150 ms)
    before writing it. A LOADED record marked while the victim's unload records were being
    written reached etcd ~100 ms late on most misses with an eviction (bench/miss.py:
    LOADING -> LOADED 90-116 ms for a 15-30 ms load). With the backoff made an hour long, the
    second record must still arrive."""
    monkeypatch.setattr(records, "MIN_BACKOFF_S", 3600.0)
    pod = await Pod(tmp_path).start()
    try:
        hold, held = asyncio.Event(), asyncio.Event()
        real_put = pod.etcd.put

        async def put(key: str, value: bytes, lease: int = 0) -> int:
            if "/copies/slow/" in key:
                held.set()
                await hold.wait()
            return await real_put(key, value, lease)

        pod.etcd.put = put  # type: ignore[method-assign]
        publisher = pod.agent.publisher
        publisher.set_copy("slow", CopyRecord("slow", POD, "127.0.0.1:1", CopyState.LOADING))
        await asyncio.wait_for(held.wait(), 10)
        publisher.set_copy("fast", CopyRecord("fast", POD, "127.0.0.1:1", CopyState.LOADED))  # during the flush
        hold.set()
        await pod.until(lambda: pod.state("fast") is CopyState.LOADED, "the record marked mid-flush written")
        assert pod.state("slow") is CopyState.LOADING
        assert publisher.rewrites == 0 and pod.etcd.failed_writes == 0
    finally:
        await pod.stop()
