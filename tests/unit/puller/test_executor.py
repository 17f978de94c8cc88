"""puller.executor: metadata, warm-up, BYTES through onnxruntime, error mapping."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from onnx import TensorProto

from mesh import demo
from mesh.errors import InvalidArgument, LoadFailed
from puller.executor import Executor


@pytest.fixture
def executor() -> Executor:
    ex = Executor(threads=1, intra_op_threads=1, cuda=False)
    yield ex
    ex.close()


async def test_load_reports_metadata_and_size(executor: Executor, tmp_path: pathlib.Path) -> None:
    path = demo.save(demo.linear_model(1), tmp_path / "m.onnx")
    model = await executor.load("m", str(path))
    assert [s.as_dict() for s in model.inputs.values()] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [s.as_dict() for s in model.outputs.values()] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert model.size_bytes >= path.stat().st_size and model.load_ms >= 0
    (out,) = await executor.run(model, {"input": np.ones((2, 4), np.float32)}, ["output"])
    assert out.shape == (2, 3)
    with pytest.raises(InvalidArgument, match="model 'm' rejected the input"):
        await executor.run(model, {"input": np.ones((2, 4), np.float64)}, ["output"])


async def test_bytes_round_trip(executor: Executor, tmp_path: pathlib.Path) -> None:
    path = demo.save(demo.identity_model(TensorProto.STRING), tmp_path / "s.onnx")
    model = await executor.load("s", str(path))
    assert model.inputs["input"].datatype == "BYTES"
    x = np.array([[b"a", "é".encode()]], dtype=object)
    (out,) = await executor.run(model, {"input": x}, ["output"])
    assert out.tolist() == [["a", "é"]]
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        await executor.run(model, {"input": np.array([[b"\xff", b""]], dtype=object)}, ["output"])


async def test_corrupt_model_fails_without_leaking_the_path(executor: Executor, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(LoadFailed, match="cannot load model 'bad'") as err:
        await executor.load("bad", str(path))
    assert str(tmp_path) not in err.value.message


# IOBinding (used on CUDA pods) runs here on CPU, forced with io_binding=True: same results as
# session.run for every datatype, the same error mapping, BYTES models left on session.run.
_NUMERIC = {
    TensorProto.BOOL: np.bool_, TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16,
    TensorProto.UINT32: np.uint32, TensorProto.UINT64: np.uint64, TensorProto.INT8: np.int8,
    TensorProto.INT16: np.int16, TensorProto.INT32: np.int32, TensorProto.INT64: np.int64,
    TensorProto.FLOAT16: np.float16, TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
}


@pytest.fixture
def bound() -> Executor:
    ex = Executor(threads=1, intra_op_threads=1, cuda=False, io_binding=True)
    yield ex
    ex.close()


@pytest.mark.parametrize("elem_type", list(_NUMERIC), ids=lambda t: TensorProto.DataType.Name(t))
async def test_bound_runs_match_session_run_for_every_numeric_type(
    bound: Executor, executor: Executor, tmp_path: pathlib.Path, elem_type: int
) -> None:
    path = str(demo.save(demo.identity_model(elem_type), tmp_path / "i.onnx"))
    with_binding, without = await bound.load("i", path), await executor.load("i", path)
    assert with_binding.bound and not without.bound
    x = (np.arange(6).reshape(3, 2) % 2).astype(_NUMERIC[elem_type])
    x = x[::-1]  # not C-contiguous: the binding must get a contiguous buffer
    (a,) = await bound.run(with_binding, {"input": x}, ["output"])
    (b,) = await executor.run(without, {"input": x}, ["output"])
    assert a.dtype == b.dtype == x.dtype
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, x)


async def test_bound_run_errors_are_mapped_like_session_run(bound: Executor, tmp_path: pathlib.Path) -> None:
    model = await bound.load("m", str(demo.save(demo.linear_model(1), tmp_path / "m.onnx")))
    assert model.bound
    (out,) = await bound.run(model, {"input": np.ones((2, 4), np.float32)}, ["output"])
    np.testing.assert_allclose(out, model.session.run(None, {"input": np.ones((2, 4), np.float32)})[0])
    with pytest.raises(InvalidArgument, match="model 'm' rejected the input"):
        await bound.run(model, {"input": np.ones((2, 4), np.float64)}, ["output"])
    with pytest.raises(InvalidArgument, match="model 'm' rejected the input"):
        await bound.run(model, {"input": np.ones((2, 5), np.float32)}, ["output"])


async def test_bytes_models_are_not_bound(bound: Executor, tmp_path: pathlib.Path) -> None:
    model = await bound.load("s", str(demo.save(demo.identity_model(TensorProto.STRING), tmp_path / "s.onnx")))
    assert not model.bound
    (out,) = await bound.run(model, {"input": np.array([[b"a", b"b"]], dtype=object)}, ["output"])
    assert out.tolist() == [["a", "b"]]


def test_io_binding_setting() -> None:
    from mesh.errors import MeshError
    from puller.gpu import use_io_binding

    assert use_io_binding("auto", cuda=True) and not use_io_binding("auto", cuda=False)
    assert use_io_binding("Always", cuda=False) and not use_io_binding("never", cuda=True)
    with pytest.raises(MeshError, match="MESH_RUNTIME_IO_BINDING must be auto, never or always"):
        use_io_binding("sometimes", cuda=False)


# -- footprints: declared batch, re-measure on larger requests, never a silent file size -------

MiB = 1 << 20


def _per_row_model(tmp_path: pathlib.Path) -> str:
    """~200 bytes building a [batch, 256K] FP32 tensor per run: 1 MiB per row."""
    from tests.unit.puller.ladder import big_tensor_model

    return str(demo.save(big_tensor_model(256 << 10), tmp_path / "rows.onnx"))


async def test_warm_up_runs_at_the_declared_batch(executor: Executor, tmp_path: pathlib.Path) -> None:
    path = _per_row_model(tmp_path)
    declared = await executor.load("declared", path, batch=32)
    plain = await executor.load("plain", path)
    assert declared.size_bytes >= 32 * MiB > plain.size_bytes
    assert declared.measured_elements == 32 and plain.measured_elements == 1


async def test_a_larger_request_is_remeasured_once_and_reported(executor: Executor, tmp_path: pathlib.Path) -> None:
    """Regression: a model's figure came from a batch-1 warm-up only; a batch-32 request then
    held 32x the arena nobody booked."""
    import asyncio
    import threading

    calls: list[tuple[str, int, str, int]] = []
    executor.on_resize = lambda model_id, size, method: calls.append(
        (model_id, size, method, threading.get_ident()))
    model = await executor.load("m", _per_row_model(tmp_path))
    small = model.size_bytes
    await executor.run(model, {"input": np.ones((1, 1), np.float32)}, ["output"])  # not larger
    (out,) = await executor.run(model, {"input": np.ones((32, 1), np.float32)}, ["output"])
    assert out.shape == (32, 1)
    await asyncio.sleep(0.05)  # call_soon_threadsafe
    assert model.size_bytes >= small + 31 * MiB and model.measured_elements == 32
    assert calls == [("m", model.size_bytes, model.measure_method, threading.get_ident())]  # on the loop thread
    await executor.run(model, {"input": np.ones((32, 1), np.float32)}, ["output"])  # measured already
    await asyncio.sleep(0.05)
    assert len(calls) == 1


async def test_a_remeasure_waits_for_a_load_measurement(tmp_path: pathlib.Path) -> None:
    """A larger request while a load is being measured waits for that measurement, then is
    measured itself: run unmeasured, its arena growth would be kept and never seen again."""
    import asyncio
    import threading

    ex = Executor(threads=2, intra_op_threads=1, cuda=False)
    try:
        model = await ex.load("m", _per_row_model(tmp_path))
        before = model.size_bytes
        ex.footprint._lock.acquire()  # a load being measured
        threading.Timer(0.3, ex.footprint._lock.release).start()
        await asyncio.wait_for(ex.run(model, {"input": np.ones((16, 1), np.float32)}, ["output"]), 10)
        assert model.size_bytes >= before + 15 * MiB and model.measured_elements == 16
    finally:
        ex.close()


async def test_a_measurement_that_gives_nothing_books_the_file_size_and_says_so(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: on a GPU pod whose PIDs NVML did not match, the file size was booked
    silently. Now the figure's method is "file-size" and a warning names the method that
    measured nothing."""
    from puller.footprint import Footprint, Measured

    class Nothing:
        def sample(self) -> int:
            return 0

        def mark_peak(self) -> None:
            pass

        def measured(self, before: int, after: int, *, new_session: bool) -> Measured:
            return Measured(0, "nvml-device-delta")

    ex = Executor(1, 1, cuda=False, footprint=Footprint(Nothing()))
    try:
        path = demo.save(demo.linear_model(1), tmp_path / "m.onnx")
        with caplog.at_level("WARNING"):
            model = await ex.load("m", str(path))
        assert (model.size_bytes, model.measure_method) == (path.stat().st_size, "file-size")
        assert "nvml-device-delta measured nothing" in caplog.text
    finally:
        ex.close()
