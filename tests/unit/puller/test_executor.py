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
