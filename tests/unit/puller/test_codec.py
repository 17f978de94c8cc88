"""puller.codec against tritonclient's own V2 messages (same wire format as ours)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as tpb

from mesh.errors import InvalidArgument
from puller import codec
from puller.datatypes import V2, TensorSpec

SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.0, 65504]], dtype=np.float16),
    "FP32": np.array([[0.25, -1.5, 3.0e38]], dtype=np.float32),
    "FP64": np.array([[0.1, -1e300, 2.5]], dtype=np.float64),
    "BYTES": np.array([[b"", b"ab\x00\xff", b"xyz"]], dtype=object),
}


def spec(datatype: str, shape: tuple[int, ...] = (-1, 3), name: str = "x") -> dict[str, TensorSpec]:
    return {name: TensorSpec(name, datatype, shape)}


def raw_request(datatype: str, arr: np.ndarray, name: str = "x") -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name="m")
    req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
    data = codec.join_bytes(arr) if datatype == "BYTES" else arr.tobytes()
    req.raw_input_contents.append(data)
    return req


def typed_request(datatype: str, arr: np.ndarray, name: str = "x") -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
    getattr(tensor.contents, V2[datatype][1]).extend(arr.ravel().tolist())
    return req


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.ravel().tolist() == want.ravel().tolist()


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_raw_round_trip(datatype: str) -> None:
    arr = SAMPLES[datatype]
    decoded = codec.decode_inputs(raw_request(datatype, arr), spec(datatype))
    assert decoded.raw
    assert_same(decoded.feeds["x"], arr)
    (out,) = codec.encode_outputs(["y"], [decoded.feeds["x"]])
    assert (out.name, out.datatype, out.shape) == ("y", datatype, arr.shape)
    again = codec.decode_inputs(raw_request(datatype, arr), spec(datatype))
    assert out.raw == raw_request(datatype, arr).raw_input_contents[0]
    assert_same(again.feeds["x"], arr)


@pytest.mark.parametrize("datatype", sorted(set(SAMPLES) - {"FP16"}))
def test_typed_round_trip(datatype: str) -> None:
    arr = SAMPLES[datatype]
    decoded = codec.decode_inputs(typed_request(datatype, arr), spec(datatype))
    assert not decoded.raw
    assert_same(decoded.feeds["x"], arr)
    (out,) = codec.encode_outputs(["y"], [decoded.feeds["x"]])
    # Triton answers a typed request in raw_output_contents too.
    assert out.raw == raw_request(datatype, arr).raw_input_contents[0]


def test_raw_decode_is_a_view_of_the_request_bytes() -> None:
    arr = SAMPLES["FP32"]
    feeds = codec.decode_inputs(raw_request("FP32", arr), spec("FP32")).feeds
    assert not feeds["x"].flags.owndata


def test_outputs_are_always_raw() -> None:
    outs = codec.encode_outputs(["a", "b"], [SAMPLES["FP16"], SAMPLES["FP32"]])
    assert [o.raw for o in outs] == [SAMPLES["FP16"].tobytes(), SAMPLES["FP32"].tobytes()]


def test_onnxruntime_str_outputs_are_bytes() -> None:
    arr = np.array([["a", "é"]], dtype=object)
    (out,) = codec.encode_outputs(["y"], [arr])
    assert out.datatype == "BYTES" and codec.split_bytes("y", out.raw, 2) == [b"a", "é".encode()]


def test_requested_outputs() -> None:
    outs = spec("FP32", name="y") | spec("FP32", name="z")
    req = tpb.ModelInferRequest()
    assert codec.requested_outputs(req, outs) == ["y", "z"]
    req.outputs.add(name="z")
    assert codec.requested_outputs(req, outs) == ["z"]
    req.outputs.add(name="nope")
    with pytest.raises(InvalidArgument, match=r"unknown output 'nope'.*\['y', 'z'\]"):
        codec.requested_outputs(req, outs)


def fp32_raw(shape: tuple[int, ...] = (1, 3), name: str = "x") -> tpb.ModelInferRequest:
    return raw_request("FP32", np.zeros(shape, dtype=np.float32), name)


def _err(req: tpb.ModelInferRequest, specs: dict[str, TensorSpec], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        codec.decode_inputs(req, specs)


def test_unknown_input_lists_expected() -> None:
    _err(fp32_raw(name="nope"), spec("FP32"), r"unknown input 'nope'.*\['x'\]")


def test_missing_input() -> None:
    _err(fp32_raw(), spec("FP32") | spec("FP32", name="w"), r"missing inputs \['w'\]")


def test_duplicate_input() -> None:
    req = fp32_raw()
    req.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    req.raw_input_contents.append(bytes(12))
    _err(req, spec("FP32"), "more than once")


def test_datatype_mismatch_says_expected_and_got() -> None:
    _err(raw_request("INT32", SAMPLES["INT32"]), spec("FP32"), "datatype INT32 but the model expects FP32")


def test_rank_mismatch() -> None:
    _err(fp32_raw((3,)), spec("FP32"), "rank 1")


def test_fixed_dim_mismatch_and_dynamic_dim_accepts_any() -> None:
    _err(fp32_raw((1, 4)), spec("FP32"), r"shape \[1, 4\] but the model expects \[-1, 3\]")
    assert codec.decode_inputs(fp32_raw((0, 3)), spec("FP32")).feeds["x"].shape == (0, 3)
    assert codec.decode_inputs(fp32_raw((5, 3)), spec("FP32")).feeds["x"].shape == (5, 3)


def test_negative_dim() -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=[-1, 3])
    req.raw_input_contents.append(b"")
    _err(req, spec("FP32"), "negative dimension")


def test_element_count_overflow() -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP32", shape=[2**40, 2**40])
    req.raw_input_contents.append(b"")
    _err(req, spec("FP32"), "too many elements")


def test_raw_size_must_match_exactly() -> None:
    req = fp32_raw()
    req.raw_input_contents[0] = bytes(13)
    _err(req, spec("FP32"), "13 bytes .* exactly 12")


def test_raw_count_must_match_inputs() -> None:
    req = fp32_raw()
    req.raw_input_contents.append(b"")
    _err(req, spec("FP32"), "2 entries but the request has 1 inputs")


def test_raw_and_typed_mixed() -> None:
    req = fp32_raw()
    req.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    _err(req, spec("FP32"), "contents field must not be specified when using raw_input_contents for .x. for model")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x01\x00", "inside a 4-byte length prefix"),
        (struct.pack("<I", 10) + b"abc", "claims 10 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", "holds 1 elements, shape says 3"),
        (struct.pack("<I", 0) * 4, "more than the 3 elements"),
    ],
)
def test_bytes_raw_prefix_walk(raw: bytes, match: str) -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="BYTES", shape=[1, 3])
    req.raw_input_contents.append(raw)
    _err(req, spec("BYTES"), match)


def test_typed_wrong_field() -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="INT64", shape=[1, 3]).contents.int_contents.extend([1, 2, 3])
    _err(req, spec("INT64"), "goes in int64_contents, not int_contents")


def test_typed_count_mismatch() -> None:
    req = typed_request("FP32", SAMPLES["FP32"])
    req.inputs[0].contents.fp32_contents.append(1.0)
    _err(req, spec("FP32"), "fp32_contents has 4 elements .* needs 3")


def test_typed_fp16_needs_raw() -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    _err(req, spec("FP16"), "must be sent in raw_input_contents")


def test_typed_value_out_of_range() -> None:
    req = tpb.ModelInferRequest()
    req.inputs.add(name="x", datatype="UINT8", shape=[1, 3]).contents.uint_contents.extend([1, 2, 300])
    _err(req, spec("UINT8"), "do not fit UINT8")


# -- regressions found by fuzzing (tests/fuzz, bench/fuzz) -----------------------------------------


def test_zero_sized_tensor_with_a_huge_dimension_is_invalid_argument() -> None:
    """Bug: shape [0, 2**62] has 0 elements, so the element-count check passed, and numpy's
    reshape raised ValueError ("array is too big") -> INTERNAL instead of INVALID_ARGUMENT."""
    req = raw_request("FP32", np.zeros((0, 3), dtype=np.float32))
    req.inputs[0].shape[:] = [0, 2**62]
    _err(req, spec("FP32", shape=()), "too many elements")


def test_rank_beyond_numpy_on_an_unknown_rank_input_is_invalid_argument() -> None:
    """Bug: an input of unknown rank (an ONNX input without a shape: spec shape ()) took any
    rank, and numpy's reshape raised ValueError for more than 64 dimensions -> INTERNAL."""
    req = raw_request("FP32", np.zeros((1,), dtype=np.float32))
    req.inputs[0].shape[:] = [1] * 80
    _err(req, spec("FP32", shape=()), "80 dimensions; at most 32")


def test_error_messages_are_bounded_whatever_the_request_sends() -> None:
    """Bug: errors echoed the whole shape and the whole input name, so a 30-dimension shape
    or a 200,000-character name came back in full in the status message."""
    req = raw_request("FP32", np.zeros((1, 3), dtype=np.float32), name="n" * 200_000)
    with pytest.raises(InvalidArgument) as info:
        codec.decode_inputs(req, spec("FP32"))
    assert len(info.value.message) < 300 and "…" in info.value.message
    req = raw_request("FP32", np.zeros((1, 3), dtype=np.float32))
    req.inputs[0].shape[:] = [2**40] * 30
    with pytest.raises(InvalidArgument) as info:
        codec.decode_inputs(req, spec("FP32", shape=()))
    assert len(info.value.message) < 300


def test_unknown_datatype_is_quoted_and_cut() -> None:
    req = raw_request("FP32", np.zeros((1, 3), dtype=np.float32))
    req.inputs[0].datatype = "X" * 5000 + "\n"
    _err(req, spec("FP32"), r"datatype 'XXXXXXXXXXXXXXXX…' but the model expects FP32")
