"""puller.batching: grouping, split-back, bad requests failing alone, unbatchable requests, and
the scheduler (idle slot runs at once, accumulation while busy, delay on a free second slot,
cancellation) driven by a gated fake executor instead of the clock."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest
from onnx import TensorProto

from mesh import demo
from mesh.errors import DeadlineExceeded, InvalidArgument
from mesh.metrics import Metrics
from puller import batching
from puller.datatypes import TensorSpec
from puller.executor import Executor, LoadedModel


@pytest.fixture
def executor() -> Executor:
    ex = Executor(threads=2, intra_op_threads=1, cuda=False)
    yield ex
    ex.close()


def _batches(metrics: Metrics) -> dict[str, float]:
    return {
        s.name: s.value
        for fam in metrics.registry.collect()
        if fam.name == "mesh_batch_size"
        for s in fam.samples
        if s.name.endswith(("_count", "_sum"))
    }


async def test_concurrent_requests_run_as_one_batch_and_split_back(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("m", str(demo.save(demo.linear_model(1), tmp_path / "m.onnx")))
    metrics = Metrics()
    batcher = batching.for_model(model, executor, 8, 0, metrics)
    assert batcher is not None
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 2, 1, 3)]
    results = await asyncio.gather(*(batcher.run({"input": x}, ["output"]) for x in xs))
    for x, (out,) in zip(xs, results, strict=True):
        want = model.session.run(["output"], {"input": x})[0]
        np.testing.assert_allclose(out, want, rtol=1e-6)
    assert _batches(metrics) == {"mesh_batch_size_count": 1.0, "mesh_batch_size_sum": 4.0}
    await batcher.close()


async def test_full_group_runs_at_once_and_overflow_starts_a_new_one(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("m", str(demo.save(demo.linear_model(1), tmp_path / "m.onnx")))
    metrics = Metrics()
    batcher = batching.for_model(model, executor, 2, 10_000_000, metrics)  # 10 s: only fullness flushes
    assert batcher is not None
    xs = [np.full((1, 4), i, np.float32) for i in range(4)]
    async with asyncio.timeout(30):
        results = await asyncio.gather(*(batcher.run({"input": x}, ["output"]) for x in xs))
    assert len(results) == 4
    assert _batches(metrics) == {"mesh_batch_size_count": 2.0, "mesh_batch_size_sum": 4.0}


async def test_incompatible_shapes_are_grouped_apart(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("i", str(demo.save(demo.identity_model(TensorProto.FLOAT), tmp_path / "i.onnx")))
    metrics = Metrics()
    batcher = batching.for_model(model, executor, 8, 0, metrics)
    assert batcher is not None
    a = np.ones((1, 2), np.float32)
    b = np.ones((1, 3), np.float32)  # other non-batch dims: its own group (and wrong for the model)
    ra, rb, rc = await asyncio.gather(
        batcher.run({"input": a}, ["output"]), batcher.run({"input": b}, ["output"]),
        batcher.run({"input": a}, ["output"]), return_exceptions=True,
    )
    assert ra[0].shape == (1, 2) and rc[0].shape == (1, 2)
    assert isinstance(rb, InvalidArgument)
    assert _batches(metrics) == {"mesh_batch_size_count": 2.0, "mesh_batch_size_sum": 3.0}


async def test_a_bad_request_fails_alone(executor: Executor, tmp_path: pathlib.Path) -> None:
    """A request onnxruntime rejects (here: BYTES not UTF-8) must not fail its batch mates."""
    model = await executor.load("s", str(demo.save(demo.identity_model(TensorProto.STRING), tmp_path / "s.onnx")))
    batcher = batching.for_model(model, executor, 8, 0, Metrics())
    assert batcher is not None
    good = np.array([[b"a", b"b"]], dtype=object)
    bad = np.array([[b"\xff", b""]], dtype=object)
    results = await asyncio.gather(
        batcher.run({"input": good}, ["output"]),
        batcher.run({"input": bad}, ["output"]),
        batcher.run({"input": good}, ["output"]),
        return_exceptions=True,
    )
    assert results[0][0].tolist() == [["a", "b"]] and results[2][0].tolist() == [["a", "b"]]
    assert isinstance(results[1], InvalidArgument)


async def test_off_when_not_asked_or_no_batch_axis(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("m", str(demo.save(demo.linear_model(1), tmp_path / "m.onnx")))
    assert batching.for_model(model, executor, 0, 0, Metrics()) is None
    assert batching.for_model(model, executor, 1, 0, Metrics()) is None


def test_group_key_rejects_scalars_and_ragged_batches() -> None:
    assert batching.group_key({"x": np.float32(1.0) * np.ones(())}, ["y"]) is None
    assert batching.group_key({"a": np.ones((2, 3)), "b": np.ones((3, 3))}, ["y"]) is None
    key, rows = batching.group_key({"a": np.ones((2, 3)), "b": np.ones((2, 5))}, ["y"])  # type: ignore[misc]
    assert rows == 2
    assert key == batching.group_key({"b": np.ones((4, 5)), "a": np.ones((4, 3))}, ["y"])[0]  # type: ignore[index]


class GatedRunner:
    """A fake Executor: records each run's row count and holds it until `release()`; a feed
    holding -1 makes the whole run fail (as onnxruntime rejecting one request's values)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gates: list[asyncio.Event] = []
        self._called = asyncio.Event()

    async def run(self, model: object, feeds: dict[str, np.ndarray], outputs: list[str], execution: object = None) -> list[np.ndarray]:
        x = feeds["input"]
        self.calls.append(x.shape[0])
        self._called.set()
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if (x == -1).any():
            raise InvalidArgument("rejected")
        return [x * 2]

    def release(self) -> None:
        for gate in self.gates:
            gate.set()

    async def wait_calls(self, count: int) -> None:
        while len(self.calls) < count:
            self._called.clear()
            await self._called.wait()


def _fake_model() -> LoadedModel:
    spec = TensorSpec("input", "FP32", (-1, 4))
    return LoadedModel("fake", None, {"input": spec}, {"output": spec}, 0, 0)  # type: ignore[arg-type]


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _x(value: float, rows: int = 1) -> np.ndarray:
    return np.full((rows, 4), value, np.float32)


def _submit(batcher: batching.Batcher, *values: float) -> list[asyncio.Task[list[np.ndarray]]]:
    return [asyncio.ensure_future(batcher.run({"input": _x(v)}, ["output"])) for v in values]


async def test_an_idle_slot_runs_a_request_at_once_without_waiting_out_the_delay() -> None:
    """Regression (issue #4): at concurrency 1 every request waited max_queue_delay_us."""
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 8, 10_000_000, Metrics())  # 10 s delay
    (task,) = _submit(batcher, 1)
    await _turns()
    assert runner.calls == [1]
    runner.release()
    async with asyncio.timeout(10):
        (out,) = await task
    np.testing.assert_array_equal(out, _x(2))


async def test_requests_accumulate_while_the_slot_is_busy_and_run_when_it_frees() -> None:
    runner = GatedRunner()
    metrics = Metrics()
    batcher = batching.Batcher(_fake_model(), runner, 8, 10_000_000, metrics, max_in_flight=1)
    first = _submit(batcher, 1)
    await _turns()
    rest = _submit(batcher, 2, 3, 4)
    await _turns()
    assert runner.calls == [1] and batcher.queued == 3  # busy: they wait, the delay is moot
    runner.release()
    await _turns()
    assert runner.calls == [1, 3]  # the next batch started as soon as the slot freed
    runner.release()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*first, *rest)
    for v, (out,) in zip((1, 2, 3, 4), results, strict=True):
        np.testing.assert_array_equal(out, _x(2 * v))
    assert _batches(metrics) == {"mesh_batch_size_count": 2.0, "mesh_batch_size_sum": 4.0}


async def test_a_batch_takes_at_most_max_batch_size_rows() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 4, 0, Metrics(), max_in_flight=1)
    first = _submit(batcher, 0)
    await _turns()
    rest = [asyncio.ensure_future(batcher.run({"input": _x(v, rows)}, ["output"])) for v, rows in ((1, 2), (2, 2), (3, 1))]
    await _turns()
    runner.release()
    await _turns()
    assert runner.calls == [1, 4]
    runner.release()
    await _turns()
    assert runner.calls == [1, 4, 1]
    runner.release()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*first, *rest)
    assert [r[0].shape[0] for r in results] == [1, 2, 2, 1]
    np.testing.assert_array_equal(results[2][0], _x(4, 2))


async def test_a_free_second_slot_waits_for_the_delay_or_a_full_batch() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 3, 10_000_000, Metrics(), max_in_flight=2)
    first = _submit(batcher, 1)
    await _turns()
    waiting = _submit(batcher, 2, 3)
    await _turns()
    assert runner.calls == [1]  # one run in progress: a second small run would not help
    full = _submit(batcher, 4)
    await _turns()
    assert runner.calls == [1, 3]  # max_batch_size rows: run at once on the free slot
    runner.release()
    async with asyncio.timeout(10):
        await asyncio.gather(*first, *waiting, *full)


async def test_the_delay_ends_the_wait_for_a_free_second_slot() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 8, 1_000, Metrics(), max_in_flight=2)  # 1 ms
    first = _submit(batcher, 1)
    await _turns()
    second = _submit(batcher, 2)
    async with asyncio.timeout(10):
        await runner.wait_calls(2)
    assert runner.calls == [1, 1] and not first[0].done()  # ran beside the first, not after it
    runner.release()
    async with asyncio.timeout(10):
        await asyncio.gather(*first, *second)


async def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 8, 0, Metrics(), max_in_flight=1)
    first = _submit(batcher, 0)
    await _turns()
    rest = _submit(batcher, 1, -1, 2)
    await _turns()
    async with asyncio.timeout(10):
        while not all(t.done() for t in first + rest):
            runner.release()
            await asyncio.sleep(0)
    assert runner.calls == [1, 3, 1, 1, 1]  # the batch failed, then each ran alone
    assert isinstance(rest[1].exception(), InvalidArgument)
    np.testing.assert_array_equal(rest[0].result()[0], _x(2))
    np.testing.assert_array_equal(rest[2].result()[0], _x(4))


async def test_a_cancelled_waiting_request_leaves_the_queue() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 2, 0, Metrics(), max_in_flight=1)
    first = _submit(batcher, 0)
    await _turns()
    a, b = _submit(batcher, 1, 2)
    await _turns()
    a.cancel()
    await _turns()
    assert batcher.queued == 1
    (c,) = _submit(batcher, 3)
    await _turns()
    runner.release()
    await _turns()
    assert runner.calls == [1, 2]  # b and c: the cancelled request took no row
    runner.release()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*first, b, c)
    np.testing.assert_array_equal(results[2][0], _x(6))
    assert a.cancelled() and batcher.queued == 0 and batcher.in_flight == 0


async def test_groups_run_oldest_first_and_close_drains_the_queue() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 8, 10_000_000, Metrics(), max_in_flight=1)
    first = _submit(batcher, 0)
    await _turns()
    wide = asyncio.ensure_future(batcher.run({"input": _x(5, 9)}, ["output"]))  # > max_batch_size: alone
    rest = _submit(batcher, 1, 2)
    await _turns()
    runner.release()
    closing = asyncio.ensure_future(batcher.close())
    async with asyncio.timeout(10):
        while not closing.done():
            runner.release()
            await asyncio.sleep(0)
    assert runner.calls == [1, 9, 2]
    assert all(t.done() and not t.exception() for t in [*first, wide, *rest])


async def test_a_queued_request_whose_deadline_passed_is_not_run() -> None:
    runner = GatedRunner()
    batcher = batching.Batcher(_fake_model(), runner, 8, 0, Metrics(), max_in_flight=1)
    first = _submit(batcher, 1)
    await _turns()
    loop = asyncio.get_running_loop()
    late = asyncio.ensure_future(batcher.run({"input": _x(2)}, ["output"], deadline=loop.time() + 0.01))
    (kept,) = _submit(batcher, 3)  # no deadline
    await asyncio.sleep(0.05)  # the late request's deadline passes while the slot is busy
    runner.release()
    await _turns()
    assert runner.calls == [1, 1]  # the next run took only the request still wanted
    runner.release()
    async with asyncio.timeout(10):
        await asyncio.gather(*first, kept)
    with pytest.raises(DeadlineExceeded):
        await late
    np.testing.assert_array_equal(kept.result()[0], _x(6))
    assert batcher.queued == 0 and batcher.in_flight == 0
