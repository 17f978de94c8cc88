"""The pod's per-model state machine (puller/modelstate.py driven by puller/agent.py) over fakes:
loads, failures at each stage (nothing leaked, the copy FAILED), cancellation mid-load, unloads
that wait for in-flight requests on the idle event, loads waiting for that memory, the batcher
closed on unload, and the executor's re-measure hook."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from mesh.errors import LoadFailed
from mesh.types import CopyState

from .pod import Pod


@pytest.fixture
async def pod(tmp_path: pathlib.Path) -> AsyncIterator[Pod]:
    p = await Pod(tmp_path).start()
    yield p
    await p.stop()


async def test_load_writes_loaded_with_stats_and_instance(pod: Pod) -> None:
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    copy, stats = pod.copy("a"), pod.stats("a")
    assert copy is not None and copy.size_bytes == 10_000 and copy.measure_method == "fake"
    assert stats is not None and stats.size_bytes == 10_000 and stats.measure_method == "fake"
    assert stats.artifact_bytes == 1000 + len("a.onnx")
    assert stats.inputs == ({"name": "input", "datatype": "FP32", "shape": [-1, 4]},)
    await pod.until(lambda: pod.instance().models == ("a",), "instance lists a")  # type: ignore[union-attr]
    assert pod.instance().used_bytes == 10_000  # type: ignore[union-attr]
    assert pod.cache.pins == {"a.onnx": 1} and "a" in pod.table


async def test_pull_failure_is_failed_and_holds_nothing(pod: Pod) -> None:
    pod.cache.fail = LoadFailed("download of file:///m/a.onnx failed: 404")
    await pod.assign("a")
    await pod.until_state("a", CopyState.FAILED)
    assert "404" in pod.copy("a").error  # type: ignore[union-attr]
    stats = pod.stats("a")
    assert stats is not None and "404" in stats.last_error and stats.artifact_bytes == 0
    assert not pod.cache.pins and "a" not in pod.table and pod.executor.loads == []


async def test_create_failure_after_pull_releases_the_pin_and_records_the_artifact_size(pod: Pod) -> None:
    """Regression: a failure part-way through a load (pull ok, create fails) leaked the
    artifact pin; the artifact's size is kept as placement's prior for the model."""
    pod.executor.fail = LoadFailed("onnxruntime cannot load model 'a': bad graph")
    await pod.assign("a")
    await pod.until_state("a", CopyState.FAILED)
    assert not pod.cache.pins and "a" not in pod.table
    stats = pod.stats("a")
    assert stats is not None and "bad graph" in stats.last_error
    assert stats.artifact_bytes == 1000 + len("a.onnx")


async def test_failed_is_retried_only_when_the_assignment_changes_and_removed_when_it_goes(pod: Pod) -> None:
    pod.executor.fail = LoadFailed("bad graph")
    await pod.assign("a")
    await pod.until_state("a", CopyState.FAILED)
    pod.executor.fail = None
    pod.agent.converge()  # an unrelated wake-up must not retry the same assignment
    await pod.settle()
    assert pod.state("a") is CopyState.FAILED and pod.executor.loads == ["a"]
    await pod.assign("a", uri="file:///m/a2.onnx")
    await pod.until_state("a", CopyState.LOADED)
    assert pod.cache.pins == {"a2.onnx": 1}
    pod.executor.fail = LoadFailed("bad graph")
    await pod.assign("b")
    await pod.until_state("b", CopyState.FAILED)
    await pod.unassign("b")
    await pod.until_state("b", None)
    assert "b" not in pod.agent.slots


async def test_etcd_write_of_loaded_failing_is_rewritten_when_etcd_recovers(pod: Pod) -> None:
    """Regression: a failed LOADED write was logged and dropped, leaving a loaded copy no router
    could reach (and placement marking it FAILED after its load timeout)."""
    pod.etcd.fail_keys.add("/copies/a/")
    await pod.assign("a")
    await pod.until(lambda: "a" in pod.table, "a served")
    await pod.until(lambda: pod.etcd.failed_writes >= 2, "the write retried")
    assert pod.copy("a") is None and pod.stats("a") is None  # stats go with the copy, in one txn
    assert "a" in pod.agent.publisher.dirty
    pod.etcd.fail_keys.clear()
    await pod.until_state("a", CopyState.LOADED)
    assert pod.stats("a").size_bytes == 10_000  # type: ignore[union-attr]
    await pod.until(lambda: not pod.agent.publisher.dirty, "nothing left to write")


async def test_unassigned_mid_pull_cancels_and_releases(pod: Pod) -> None:
    pod.cache.gate.clear()
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADING)
    await pod.unassign("a")
    await pod.until_state("a", None)
    await pod.until(lambda: "a" not in pod.agent.slots, "slot gone")
    assert not pod.cache.pins and pod.executor.loads == [] and "a" not in pod.table


async def test_unassigned_mid_create_waits_for_the_session_then_drops_it(pod: Pod) -> None:
    """Cancel mid-load: onnxruntime cannot be interrupted, so the copy stays LOADING (its memory
    is in use) until the session exists, which is then dropped with the pin."""
    pod.executor.gate.clear()
    await pod.assign("a")
    await pod.until(lambda: pod.executor.loads == ["a"], "create started")
    await pod.unassign("a")
    await pod.settle()
    assert pod.state("a") is CopyState.LOADING and pod.cache.pins == {"a.onnx": 1}
    pod.executor.gate.set()
    await pod.until_state("a", None)
    await pod.until(lambda: not pod.cache.pins, "pin released")
    assert "a" not in pod.table


async def test_reassigned_while_cancelling_loads_again(pod: Pod) -> None:
    pod.executor.gate.clear()
    await pod.assign("a")
    await pod.until(lambda: pod.executor.loads == ["a"], "create started")
    await pod.unassign("a")
    await pod.settle()
    await pod.assign("a")
    pod.executor.gate.set()
    await pod.until_state("a", CopyState.LOADED)
    assert pod.executor.loads == ["a", "a"] and pod.cache.pins == {"a.onnx": 1}


async def test_unload_waits_for_in_flight_requests_on_the_idle_event(pod: Pod) -> None:
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    served = pod.table.get("a")
    assert served is not None
    served.begin()
    served.begin()
    await pod.unassign("a")
    await pod.until_state("a", CopyState.UNLOADING)
    assert "a" not in pod.table and pod.cache.pins == {"a.onnx": 1}
    inst = pod.instance()
    await pod.until(lambda: pod.instance().models == (), "instance without a")  # type: ignore[union-attr]
    inst = pod.instance()
    assert inst is not None and inst.used_bytes == 10_000  # still held while it drains
    served.end(1)
    await pod.settle()
    assert pod.state("a") is CopyState.UNLOADING
    served.end(2)
    await pod.until_state("a", None)
    assert not pod.cache.pins
    await pod.until(lambda: pod.instance().used_bytes == 0, "memory freed")  # type: ignore[union-attr]


async def test_load_waiting_for_memory_waits_for_the_drain(tmp_path: pathlib.Path) -> None:
    pod = await Pod(tmp_path, capacity=15_000).start()
    try:
        await pod.assign("a")
        await pod.until_state("a", CopyState.LOADED)
        served = pod.table.get("a")
        served.begin()  # type: ignore[union-attr]
        await pod.unassign("a")
        await pod.assign("b", predicted_bytes=10_000)
        await pod.until_state("a", CopyState.UNLOADING)
        await pod.until(lambda: pod.cache.pins.get("b.onnx") == 1, "b pulled")
        await pod.settle()
        assert pod.executor.loads == ["a"]  # b waits for a's memory
        served.end(1)  # type: ignore[union-attr]
        await pod.until_state("b", CopyState.LOADED)
        assert pod.state("a") is None and pod.executor.loads == ["a", "b"]
        assert pod.metrics.load_waits._value.get() == 1
    finally:
        await pod.stop()


async def test_load_that_fits_beside_a_draining_copy_does_not_wait(pod: Pod) -> None:
    """The unload buffer (moved here from test_footprint): room is counted with the draining
    copy's memory still held, and a load that fits anyway starts at once."""
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    served = pod.table.get("a")
    served.begin()  # type: ignore[union-attr]
    await pod.unassign("a")
    await pod.assign("b", predicted_bytes=10_000)
    await pod.until_state("b", CopyState.LOADED)
    assert pod.state("a") is CopyState.UNLOADING and pod.metrics.load_waits._value.get() == 0
    served.end(1)  # type: ignore[union-attr]
    await pod.until_state("a", None)


async def test_load_that_does_not_fit_with_nothing_draining_starts_anyway(tmp_path: pathlib.Path) -> None:
    """Placement's plan is the authority: with nothing leaving, waiting could only deadlock."""
    pod = await Pod(tmp_path, capacity=15_000).start()
    try:
        await pod.assign("a")
        await pod.until_state("a", CopyState.LOADED)
        await pod.assign("b", predicted_bytes=10_000)
        await pod.until_state("b", CopyState.LOADED)
        assert pod.metrics.load_waits._value.get() == 0
    finally:
        await pod.stop()


async def test_unload_closes_the_batcher(pod: Pod) -> None:
    await pod.assign("a", max_batch_size=4)
    await pod.until_state("a", CopyState.LOADED)
    batcher = pod.table.get("a").batcher  # type: ignore[union-attr]
    assert batcher is not None and not batcher._closing
    assert pod.executor.batches == [4]  # warmed up and measured at the batch it will run at
    await pod.unassign("a")
    await pod.until_state("a", None)
    assert batcher._closing


async def test_resize_rewrites_copy_stats_and_instance(pod: Pod) -> None:
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    assert pod.executor.on_resize is not None
    pod.executor.on_resize("a", 25_000, "nvml-pid")  # type: ignore[operator]
    await pod.until(lambda: pod.copy("a").size_bytes == 25_000, "copy resized")  # type: ignore[union-attr]
    assert pod.copy("a").measure_method == "nvml-pid"  # type: ignore[union-attr]
    stats = pod.stats("a")
    assert stats is not None and (stats.size_bytes, stats.measure_method) == (25_000, "nvml-pid")
    await pod.until(lambda: pod.instance().used_bytes == 25_000, "instance used_bytes")  # type: ignore[union-attr]
    pod.executor.on_resize("ghost", 1, "x")  # type: ignore[operator]  # not held: ignored


async def test_stop_revokes_the_lease_and_release_lets_go_of_pins(tmp_path: pathlib.Path) -> None:
    pod = await Pod(tmp_path).start()
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    pod.cache.gate.clear()
    await pod.assign("b")
    await pod.until_state("b", CopyState.LOADING)
    await pod.agent.stop()
    assert pod.etcd.revoked and pod.copy("a") is None and pod.instance() is None
    pod.agent.release()
    assert not pod.cache.pins and len(pod.table) == 0
