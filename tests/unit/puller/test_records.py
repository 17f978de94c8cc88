"""The pod's record publisher (puller/records.py) over the fake etcd: a record changed while a
flush is in flight is written right after it, not after the failure backoff."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

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
        real_txn = pod.etcd.txn

        async def txn(compares: Any, success: Any, *rest: Any) -> Any:
            if any(op.HasField("request_put") and b"/copies/slow/" in op.request_put.key for op in success):
                held.set()
                await hold.wait()
            return await real_txn(compares, success, *rest)

        pod.etcd.txn = txn  # type: ignore[method-assign]
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


def _counting_puts(pod: Pod, model_id: str) -> list[bytes]:
    """The values every put of `model_id`'s copy key wrote, in order (txns included)."""
    seen: list[bytes] = []
    real_put, real_txn = pod.etcd.put, pod.etcd.txn

    async def put(key: str, value: bytes, lease: int = 0) -> int:
        if f"/copies/{model_id}/" in key:
            seen.append(value)
        return await real_put(key, value, lease)

    async def txn(compares: Any, success: Any, *rest: Any) -> Any:
        for op in success:
            if op.HasField("request_put") and f"/copies/{model_id}/".encode() in op.request_put.key:
                seen.append(op.request_put.value)
        return await real_txn(compares, success, *rest)

    pod.etcd.put = put  # type: ignore[method-assign]
    pod.etcd.txn = txn  # type: ignore[method-assign]
    return seen


async def test_a_load_shorter_than_the_hold_writes_loaded_only(tmp_path: pathlib.Path) -> None:
    """MESH_RUNTIME_LOADING_RECORD_HOLD_S: a fresh LOADING record is kept back; the LOADED
    record replacing it within the hold is the only write of the copy key."""
    pod = await Pod(tmp_path).start()
    try:
        writes = _counting_puts(pod, "quick")
        publisher = pod.agent.publisher
        publisher.loading_hold_s = 3600.0
        publisher.set_copy("quick", CopyRecord("quick", POD, "127.0.0.1:1", CopyState.LOADING))
        await asyncio.sleep(0.05)
        assert pod.state("quick") is None and not writes  # held: etcd has no record yet
        publisher.set_copy("quick", CopyRecord("quick", POD, "127.0.0.1:1", CopyState.LOADED))
        await pod.until(lambda: pod.state("quick") is CopyState.LOADED, "the LOADED record written")
        assert len(writes) == 1
    finally:
        await pod.stop()


async def test_a_load_outlasting_the_hold_shows_loading(tmp_path: pathlib.Path) -> None:
    pod = await Pod(tmp_path).start()
    try:
        publisher = pod.agent.publisher
        publisher.loading_hold_s = 0.05
        publisher.set_copy("slow", CopyRecord("slow", POD, "127.0.0.1:1", CopyState.LOADING))
        await pod.until(lambda: pod.state("slow") is CopyState.LOADING, "LOADING written once the hold ran out")
        publisher.set_copy("slow", CopyRecord("slow", POD, "127.0.0.1:1", CopyState.LOADED))
        await pod.until(lambda: pod.state("slow") is CopyState.LOADED, "then LOADED")
    finally:
        await pod.stop()


async def test_a_held_load_that_ends_without_a_copy_writes_nothing(tmp_path: pathlib.Path) -> None:
    """A load cancelled (or unassigned) within the hold: no record ever reaches etcd, and the
    hold's timer writes nothing afterwards."""
    pod = await Pod(tmp_path).start()
    try:
        writes = _counting_puts(pod, "gone")
        publisher = pod.agent.publisher
        publisher.loading_hold_s = 0.05
        publisher.set_copy("gone", CopyRecord("gone", POD, "127.0.0.1:1", CopyState.LOADING))
        publisher.set_copy("gone", None)
        await asyncio.sleep(0.2)
        assert await publisher.wait_synced(5)
        assert pod.state("gone") is None and not writes
    finally:
        await pod.stop()
