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
