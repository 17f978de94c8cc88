"""puller.batching: grouping, split-back, bad requests failing alone, unbatchable requests."""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest
from onnx import TensorProto

from mesh import demo
from mesh.errors import InvalidArgument
from mesh.metrics import Metrics
from puller import batching
from puller.executor import Executor


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
