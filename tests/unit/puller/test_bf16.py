"""BF16 tensors on the pod (issue 11 item 1): the datatype table, the codec (raw only, as
Triton; typed contents and size mismatches INVALID_ARGUMENT), runs through OrtValues
(puller/ortvalues.py) with bytes in == bytes out, mixed BF16 / FP32 outputs, dynamic
batching, and the model refused at load. Requests are tritonclient's own messages (as in
test_codec.py: our generated `inference` package cannot share a process with them, so the
servicer itself is covered by tests/integration/test_bf16.py)."""

from __future__ import annotations

import asyncio
import pathlib
import struct
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import serialize_bf16_tensor

from mesh import demo
from mesh.errors import InvalidArgument, LoadFailed
from mesh.metrics import Metrics
from puller import batching, codec
from puller.datatypes import ORT_TO_V2, V2, TensorSpec, v2_of_numpy
from puller.executor import Executor


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (values exact in bf16 keep all bits)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_floats(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def add_model() -> onnx.ModelProto:
    """y = a + b in BF16 (through float: onnxruntime's CPU Add has no bfloat16 kernel), and the
    float sum as a second, FP32 output f."""
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["af", "bf"], ["f"]),
        helper.make_node("Cast", ["f"], ["y"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes, "bf16_add",
        [vi("a", TensorProto.BFLOAT16, ["batch", 4]), vi("b", TensorProto.BFLOAT16, ["batch", 4])],
        [vi("y", TensorProto.BFLOAT16, ["batch", 4]), vi("f", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", demo.OPSET)])
    model.ir_version = demo.IR_VERSION
    onnx.checker.check_model(model)
    return model


# Multiples of 1/4 in [-8, 8]: every one, and every sum of two, is exact in bfloat16.
A = np.array([[1.5, -2.0, 0.25, 7.75], [0.0, -0.5, 3.0, -8.0]], np.float32)
B = np.array([[0.5, 0.25, -1.0, 8.0], [-0.0, 2.5, -3.0, 1.75]], np.float32)


@pytest.fixture
def executor() -> Iterator[Executor]:
    ex = Executor(threads=2, intra_op_threads=1, cuda=False)
    yield ex
    ex.close()


def raw_request(model: str, tensors: dict[str, np.ndarray], datatype: str = "BF16") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="r1")
    for name, bits in tensors.items():
        req.inputs.add(name=name, datatype=datatype, shape=bits.shape)
        req.raw_input_contents.append(bits.astype("<u2").tobytes())
    return req


SPECS = {"x": TensorSpec("x", "BF16", (-1, 2))}


# -- the table and the codec ----------------------------------------------------------------------


def test_datatype_table_knows_bf16_without_confusing_uint16() -> None:
    assert ORT_TO_V2["tensor(bfloat16)"] == "BF16"
    assert V2["BF16"] == (np.dtype(np.uint16), None)  # bit patterns, raw only
    assert v2_of_numpy(np.dtype(np.uint16)) == "UINT16"


def test_raw_bf16_decodes_to_its_bit_patterns_and_encodes_back_as_bf16() -> None:
    bits = bf16_bits(np.array([[1.5, -2.0], [0.0, 3.0]], np.float32))
    decoded = codec.decode_inputs(raw_request("m", {"x": bits}), SPECS)
    assert decoded.raw and decoded.feeds["x"].dtype == np.uint16
    np.testing.assert_array_equal(decoded.feeds["x"], bits)
    outputs = {"y": TensorSpec("y", "BF16", (-1, 2))}
    (out,) = codec.encode_outputs(["y"], [decoded.feeds["x"]], outputs)
    assert (out.datatype, out.shape, out.raw) == ("BF16", (2, 2), bits.astype("<u2").tobytes())
    # A UINT16 output of the same bits stays UINT16.
    (plain,) = codec.encode_outputs(["z"], [decoded.feeds["x"]], {"z": TensorSpec("z", "UINT16", (-1, 2))})
    assert plain.datatype == "UINT16"


@pytest.mark.parametrize("field", ["fp32_contents", "uint_contents", "int_contents", "bytes_contents"])
def test_typed_bf16_contents_are_invalid_argument(field: str) -> None:
    req = pb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name="x", datatype="BF16", shape=[1, 2])
    getattr(tensor.contents, field).extend([b"a", b"b"] if field == "bytes_contents" else [1, 2])
    with pytest.raises(InvalidArgument, match="BF16 must be sent in raw_input_contents"):
        codec.decode_inputs(req, SPECS)


def test_bf16_is_the_top_half_of_float32_little_endian() -> None:
    """What clients send (tritonclient's serialize_bf16_tensor: bytes 2..3 of each packed
    float32) is what the pod reads: no byte swap, no reinterpretation."""
    values = [1.5, -2.0, 0.25, 3.0]
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="BF16", shape=[2, 2])
    req.raw_input_contents.append(b"".join(struct.pack("<f", v)[2:4] for v in values))
    decoded = codec.decode_inputs(req, SPECS)
    assert bf16_floats(decoded.feeds["x"]).ravel().tolist() == values


@pytest.mark.parametrize(("shape", "nbytes", "message"), [
    ([2, 2], 6, "raw contents are 6 bytes but shape \\[2, 2\\] of BF16 needs exactly 8"),
    ([2, 2], 16, "raw contents are 16 bytes but shape \\[2, 2\\] of BF16 needs exactly 8"),
    ([1, 3], 6, "has shape \\[1, 3\\] but the model expects \\[-1, 2\\]"),
    ([4], 8, "has rank 1"),
])
def test_bf16_size_and_shape_mismatches_are_invalid_argument(shape: list[int], nbytes: int, message: str) -> None:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="BF16", shape=shape)
    req.raw_input_contents.append(b"\x80\x3f" * (nbytes // 2))
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_inputs(req, SPECS)


def test_bf16_and_uint16_are_not_interchangeable() -> None:
    req = raw_request("m", {"x": np.zeros((1, 2), np.uint16)}, datatype="UINT16")
    with pytest.raises(InvalidArgument, match="has datatype UINT16 but the model expects BF16"):
        codec.decode_inputs(req, SPECS)


# -- runs through OrtValues -----------------------------------------------------------------------


async def test_identity_returns_the_exact_bytes_it_was_given(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("id", str(demo.save(demo.identity_model(TensorProto.BFLOAT16), tmp_path / "i.onnx")))
    assert model.inputs["input"].datatype == model.outputs["output"].datatype == "BF16"
    assert model.measured_elements > 0  # the warm-up ran (through OrtValues)
    every = np.arange(65536, dtype=np.uint16).reshape(-1, 2)  # every pattern: NaNs, infinities, -0
    (out,) = await executor.run(model, {"input": every}, ["output"])
    assert out.dtype == np.uint16 and out.shape == every.shape
    assert out.tobytes() == every.tobytes()
    # Not contiguous, and zero rows.
    (out,) = await executor.run(model, {"input": every[::-2][:5]}, ["output"])
    np.testing.assert_array_equal(out, every[::-2][:5])
    (out,) = await executor.run(model, {"input": np.zeros((0, 2), np.uint16)}, ["output"])
    assert out.shape == (0, 2) and out.dtype == np.uint16


async def test_add_matches_float32_math_rounded_to_bf16(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("add", str(demo.save(add_model(), tmp_path / "add.onnx")))
    assert model.bf16 is not None and model.bf16.inputs == {"a", "b"} and model.bf16.outputs == {"y"}
    y, f = await executor.run(model, {"a": bf16_bits(A), "b": bf16_bits(B)}, ["y", "f"])
    np.testing.assert_array_equal(y, bf16_bits(A + B))
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, A + B)
    (f_only,) = await executor.run(model, {"a": bf16_bits(A), "b": bf16_bits(B)}, ["f"])
    np.testing.assert_array_equal(f_only, A + B)
    encoded = codec.encode_outputs(["y", "f"], [y, f], model.outputs)
    assert [(o.name, o.datatype) for o in encoded] == [("y", "BF16"), ("f", "FP32")]


async def test_run_errors_are_mapped_like_session_run(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("add", str(demo.save(add_model(), tmp_path / "add.onnx")))
    with pytest.raises(InvalidArgument, match="model 'add' rejected the input"):  # rows 2 + 3 do not broadcast
        await executor.run(model, {"a": bf16_bits(A), "b": np.zeros((3, 4), np.uint16)}, ["y"])


async def test_io_binding_pod_runs_bf16_models_on_their_own_path(tmp_path: pathlib.Path) -> None:
    """As on a CUDA pod (IOBinding on): a BF16 model is never `bound` (that path would feed uint16)."""
    ex = Executor(threads=1, intra_op_threads=1, cuda=False, io_binding=True)
    try:
        model = await ex.load("add", str(demo.save(add_model(), tmp_path / "add.onnx")))
        assert not model.bound
        (y,) = await ex.run(model, {"a": bf16_bits(A), "b": bf16_bits(B)}, ["y"])
        np.testing.assert_array_equal(y, bf16_bits(A + B))
    finally:
        ex.close()


async def test_bf16_with_bytes_input_is_refused_at_load(executor: Executor, tmp_path: pathlib.Path) -> None:
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"]), helper.make_node("Identity", ["b"], ["c"])], "mixed",
        [vi("s", TensorProto.STRING, ["n"]), vi("b", TensorProto.BFLOAT16, ["n"])],
        [vi("t", TensorProto.STRING, ["n"]), vi("c", TensorProto.BFLOAT16, ["n"])],
    )
    path = demo.save(demo._finish(graph), tmp_path / "mixed.onnx")
    with pytest.raises(LoadFailed, match="model 'mixed'.*BF16 tensors with BYTES input 's'"):
        await executor.load("mixed", str(path))


async def test_batched_bf16_requests_split_back_exactly(executor: Executor, tmp_path: pathlib.Path) -> None:
    model = await executor.load("id", str(demo.save(demo.identity_model(TensorProto.BFLOAT16), tmp_path / "i.onnx")))
    metrics = Metrics()
    batcher = batching.for_model(model, executor, 8, 0, metrics)
    assert batcher is not None
    xs = [np.arange(n * 2, dtype=np.uint16).reshape(n, 2) + 1000 * n for n in (1, 2, 3)]
    results = await asyncio.gather(*(batcher.run({"input": x}, ["output"]) for x in xs))
    for x, (out,) in zip(xs, results, strict=True):
        assert out.tobytes() == x.tobytes()
    batches = {s.name: s.value for fam in metrics.registry.collect() if fam.name == "mesh_batch_size"
               for s in fam.samples if s.name.endswith(("_count", "_sum"))}
    assert batches == {"mesh_batch_size_count": 1.0, "mesh_batch_size_sum": 3.0}  # one run of all three
    await batcher.close()


# -- the pod's pieces in the servicer's order -----------------------------------------------------


async def test_tritonclient_request_decoded_run_and_encoded_as_bf16(executor: Executor, tmp_path: pathlib.Path) -> None:
    """decode -> run -> encode with the model's output specs, as puller/server.py chains them."""
    model = await executor.load("add", str(demo.save(add_model(), tmp_path / "add.onnx")))
    request = pb.ModelInferRequest(model_name="add")
    for name, values in (("a", A), ("b", B)):
        request.inputs.add(name=name, datatype="BF16", shape=values.shape)
        # What tritonclient's InferInput sends for BF16: each float32's top half.
        request.raw_input_contents.append(serialize_bf16_tensor(values).item())
    decoded = codec.decode_inputs(request, model.inputs)
    names = codec.requested_outputs(request, model.outputs)
    arrays = await executor.run(model, decoded.feeds, names)
    y, f = codec.encode_outputs(names, arrays, model.outputs)
    assert (y.name, y.datatype, y.shape, f.name, f.datatype) == ("y", "BF16", (2, 4), "f", "FP32")
    assert y.raw == bf16_bits(A + B).astype("<u2").tobytes()
    assert np.frombuffer(f.raw, "<f4").tolist() == (A + B).ravel().tolist()
