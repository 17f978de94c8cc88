"""Placement's direct Runtime/Load on the pod (puller/direct.py) over the fakes: the load
starts before the watch shows the assignment and answers with the serving copy; the watch's
copy of the same write is a no-op (one load); a direct assignment the watch never confirms is
dropped after the bound and its copy unloaded; victims named in the call unload at once and
the new load waits for their memory; failures, cancellations and another pod's record."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest

from mesh import types
from mesh.errors import InvalidArgument, LoadFailed, Unavailable
from mesh.types import Assignment, CopyState

from .pod import POD, Pod


@pytest.fixture
async def pod(tmp_path: pathlib.Path) -> AsyncIterator[Pod]:
    p = await Pod(tmp_path).start()
    yield p
    await p.stop()


def record(model: str, instance: str = POD, at_ms: int = 5) -> tuple[Assignment, bytes]:
    a = Assignment(model_id=model, instance_id=instance, storage_uri=f"file:///m/{model}.onnx",
                   predicted_bytes=10_000, assigned_unix_ms=at_ms)
    return a, types.encode(a)


def write(pod: Pod, raw: bytes, model: str) -> None:
    """Plays etcd delivering placement's write to the pod's watch."""
    pod.etcd._put(pod.keys.assignment(POD, model), raw)


async def test_direct_load_serves_before_the_watch_and_the_watch_is_a_no_op(pod: Pod) -> None:
    _, raw = record("a")
    copy = await pod.agent.direct.load(raw, [], 10)
    assert copy.state is CopyState.LOADED and copy.address == "127.0.0.1:1" and copy.size_bytes == 10_000
    assert "a" in pod.table  # serving when the call answered
    assert pod.etcd.value(pod.keys.assignment(POD, "a")) is None  # etcd never told the pod
    await pod.until_state("a", CopyState.LOADED)  # LOADED is written to etcd as usual
    write(pod, raw, "a")
    await pod.until(lambda: pod.agent.direct.pending() == 0, "the watch confirmed the direct load")
    await pod.settle()
    assert pod.executor.loads == ["a"]  # one load, not a second one for the watch's copy
    assert pod.state("a") is CopyState.LOADED and "a" in pod.table


async def test_watch_first_then_direct_load_loads_once(pod: Pod) -> None:
    _, raw = record("a")
    write(pod, raw, "a")
    await pod.until(lambda: pod.agent.view.get(pod.keys.assignment(POD, "a")) is not None, "watched")
    copy = await pod.agent.direct.load(raw, [], 10)
    assert copy.state is CopyState.LOADED and pod.agent.direct.pending() == 0
    assert pod.executor.loads == ["a"]


async def test_direct_load_never_confirmed_is_dropped_and_unloaded(pod: Pod) -> None:
    """A zombie's or an undone write: the pod follows etcd once the bound passes."""
    pod.agent.direct.confirm_s = 0.2
    _, raw = record("a")
    copy = await pod.agent.direct.load(raw, [], 10)
    assert copy.state is CopyState.LOADED
    await pod.until(lambda: pod.agent.direct.pending() == 0, "the unconfirmed override dropped")
    await pod.until(lambda: "a" not in pod.table and pod.state("a") is None, "a unloaded")
    assert pod.agent.direct.dropped == 1 and not pod.cache.pins


async def test_unconfirmed_direct_load_still_loading_is_cancelled(pod: Pod) -> None:
    pod.agent.direct.confirm_s = 0.2
    pod.executor.gate.clear()
    _, raw = record("a")
    call = asyncio.ensure_future(pod.agent.direct.load(raw, [], 10))
    await pod.until(lambda: pod.executor.loads == ["a"], "the load started")
    await pod.until(lambda: pod.agent.direct.pending() == 0, "the override dropped")
    pod.executor.gate.set()
    with pytest.raises(Unavailable, match="cancelled"):
        await call
    await pod.until(lambda: pod.state("a") is None and "a" not in pod.table, "nothing left of a")


async def test_victims_unload_at_once_and_the_load_waits_for_their_memory(tmp_path: pathlib.Path) -> None:
    pod = await Pod(tmp_path, capacity=15_000).start()
    try:
        old, old_raw = record("old")
        write(pod, old_raw, "old")
        await pod.until_state("old", CopyState.LOADED)
        served = pod.table.get("old")
        assert served is not None
        served.begin()  # a request still running on the victim holds its memory
        _, raw = record("new")
        call = asyncio.ensure_future(pod.agent.direct.load(raw, ["old"], 10))
        await pod.until(lambda: "old" not in pod.table, "the victim left the table before its etcd delete")
        await pod.settle()
        assert pod.executor.loads == ["old"]  # new waits: 10,000 + 10,000 > 15,000
        served.end(1)
        copy = await call
        assert copy.state is CopyState.LOADED and pod.executor.loads == ["old", "new"]
        # etcd then shows the transaction: the victim's delete and the new assignment.
        pod.etcd._delete(pod.keys.assignment(POD, "old"))
        write(pod, raw, "new")
        await pod.until(lambda: pod.agent.direct.pending() == 0, "both overrides confirmed")
        await pod.settle()
        assert pod.executor.loads == ["old", "new"] and "old" not in pod.table and "new" in pod.table
    finally:
        await pod.stop()


async def test_a_victim_the_watch_already_deleted_gets_no_override(pod: Pod) -> None:
    """Otherwise no delete event would ever confirm it, and a later re-assignment of the
    victim (seen through the watch only) would be hidden until the bound."""
    _, raw = record("a")
    await pod.agent.direct.load(raw, ["gone"], 10)
    assert pod.agent.direct.lookup("gone") == (False, None)
    _, gone_raw = record("gone")
    write(pod, gone_raw, "gone")
    await pod.until_state("gone", CopyState.LOADED)


async def test_failed_direct_load_answers_failed_with_the_reason(pod: Pod) -> None:
    pod.executor.fail = LoadFailed("onnxruntime cannot load model 'a': bad graph")
    _, raw = record("a")
    copy = await pod.agent.direct.load(raw, [], 10)
    assert copy.state is CopyState.FAILED and "bad graph" in copy.error


async def test_another_pods_assignment_is_refused(pod: Pod) -> None:
    _, raw = record("a", instance="pod-b")
    with pytest.raises(InvalidArgument, match="pod-b"):
        await pod.agent.direct.load(raw, [], 10)
    with pytest.raises(InvalidArgument, match="malformed"):
        await pod.agent.direct.load(b"{not json", [], 10)
    assert pod.agent.direct.pending() == 0 and pod.executor.loads == []


async def test_deadline_passes_while_loading(pod: Pod) -> None:
    pod.executor.gate.clear()
    _, raw = record("a")
    with pytest.raises(TimeoutError):
        await pod.agent.direct.load(raw, [], 0.05)
    pod.executor.gate.set()  # the load goes on: the call's deadline is not the load's
    await pod.until_state("a", CopyState.LOADED)
