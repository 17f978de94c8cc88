"""router/rest_codec.py: JSON / binary REST bodies <-> V2 protobuf messages, checked against
tritonclient's own generated classes (the wire format pods and Triton speak)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from mesh.errors import InvalidArgument
from mesh.pb.inference import infer_messages_pb2 as pb
from router import rest_codec

NUMERIC = [dt for dt in rest_codec.DTYPES]


def _request(header: dict, binary: bytes = b"") -> tuple[rest_codec.Request, service_pb2.ModelInferRequest]:
    request = rest_codec.infer_request(header, memoryview(binary), "m", "")
    return request, service_pb2.ModelInferRequest.FromString(request.message)


def test_the_messages_are_wire_compatible_with_tritonclients() -> None:
    for ours, theirs in ((pb.ModelInferRequest, service_pb2.ModelInferRequest),
                         (pb.ModelInferResponse, service_pb2.ModelInferResponse),
                         (pb.InferParameter, service_pb2.InferParameter),
                         (pb.InferTensorContents, service_pb2.InferTensorContents)):
        stack = [(ours.DESCRIPTOR, theirs.DESCRIPTOR)]
        while stack:
            a, b = stack.pop()
            assert {f.name: (f.number, f.type, f.is_repeated) for f in a.fields} == \
                   {f.name: (f.number, f.type, f.is_repeated) for f in b.fields}, a.full_name
            for f in a.fields:
                if f.message_type is not None:
                    stack.append((f.message_type, b.fields_by_name[f.name].message_type))


def _values(datatype: str) -> st.SearchStrategy[list]:
    if datatype == "BOOL":
        return st.lists(st.booleans(), min_size=0, max_size=6)
    if datatype.startswith(("INT", "UINT")):
        info = np.iinfo(rest_codec.DTYPES[datatype])
        return st.lists(st.integers(int(info.min), int(info.max)), max_size=6)
    width = {"FP16": 16, "FP32": 32, "FP64": 64}[datatype]
    return st.lists(st.floats(width=width, allow_nan=False), max_size=6)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(NUMERIC).flatmap(lambda dt: st.tuples(st.just(dt), _values(dt))))
def test_json_data_round_trips_through_raw_contents(case: tuple[str, list]) -> None:
    datatype, values = case
    _, message = _request({"inputs": [{"name": "x", "shape": [len(values)], "datatype": datatype, "data": values}]})
    raw = message.raw_input_contents[0]
    decoded = np.frombuffer(raw, rest_codec.DTYPES[datatype]).tolist()
    assert decoded == np.asarray(values, rest_codec.DTYPES[datatype]).tolist()
    # ... and back out of a response, as JSON data.
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype=datatype, shape=[len(values)])
    response.raw_output_contents.append(raw)
    request = rest_codec.Request(b"", frozenset(), frozenset(), False, None)
    body, length = rest_codec.infer_response(response.SerializeToString(), request)
    assert length is None
    assert json.loads(body)["outputs"][0]["data"] == decoded


@given(st.lists(st.text(max_size=5), max_size=5))
def test_bytes_json_strings_become_length_prefixed_raw(values: list[str]) -> None:
    _, message = _request({"inputs": [{"name": "s", "shape": [len(values)], "datatype": "BYTES", "data": values}]})
    raw = message.raw_input_contents[0]
    assert rest_codec.split_bytes(raw) == [v.encode("utf-8", "surrogatepass") for v in values]


def test_nested_data_parameters_and_requested_outputs() -> None:
    request, message = _request({
        "id": "r", "parameters": {"binary_data_output": True, "priority": 2, "flag": True, "name": "x", "w": 0.5,
                                  "big": 2**63},
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]],
                    "parameters": {"note": "n"}}],
        "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}]})
    assert message.id == "r" and message.model_name == "m"
    assert "binary_data_output" not in message.parameters
    assert message.parameters["priority"].int64_param == 2 and message.parameters["flag"].bool_param
    assert message.parameters["big"].uint64_param == 2**63 and message.parameters["w"].double_param == 0.5
    assert message.inputs[0].parameters["note"].string_param == "n"
    assert [o.name for o in message.outputs] == ["a", "b"]
    assert request.binary_outputs == {"b"} and request.named_outputs == {"a", "b"} and request.binary_default
    assert np.frombuffer(message.raw_input_contents[0], "<i4").tolist() == [1, 2, 3, 4]


def test_binary_inputs_and_outputs() -> None:
    x = np.arange(6, dtype=np.float32)
    s = struct.pack("<I", 2) + b"hi"
    header = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
                         {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(s)}},
                         {"name": "j", "shape": [1], "datatype": "INT8", "data": [7]}],
              "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}
    request, message = _request(header, x.tobytes() + s)
    assert message.raw_input_contents[0] == x.tobytes() and message.raw_input_contents[1] == s
    assert message.raw_input_contents[2] == b"\x07"
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    response.outputs.add(name="y", datatype="FP32", shape=[2, 3])
    response.outputs.add(name="z", datatype="INT64", shape=[2])
    response.raw_output_contents.extend([x.tobytes(), np.array([5, -5], "<i8").tobytes()])
    body, length = rest_codec.infer_response(response.SerializeToString(), request)
    assert length is not None
    meta = json.loads(body[:length])
    assert meta["id"] == "r" and meta["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert "data" not in meta["outputs"][0] and meta["outputs"][1]["data"] == [5, -5]
    assert body[length:] == x.tobytes()


def test_typed_output_contents_still_decode() -> None:
    """Pods answer raw (Triton's behaviour); an answer in typed contents decodes too."""
    response = pb.ModelInferResponse(model_name="m")
    out = response.outputs.add(name="y", datatype="UINT16", shape=[3])
    out.contents.uint_contents.extend([1, 2, 65535])
    out = response.outputs.add(name="s", datatype="BYTES", shape=[2])
    out.contents.bytes_contents.extend([b"a", b"bc"])
    request = rest_codec.Request(b"", frozenset({"s"}), frozenset({"s"}), False, None)
    body, length = rest_codec.infer_response(response.SerializeToString(), request)
    assert length is not None
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["data"] == [1, 2, 65535]
    assert body[length:] == struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"bc"


def test_bf16_is_binary_only_in_and_exact_floats_out() -> None:
    with pytest.raises(InvalidArgument, match="BF16 has no JSON form"):
        _request({"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1.0]}]})
    raw = np.array([0x3FC0, 0xC000], "<u2").tobytes()  # 1.5, -2.0
    _, message = _request({"inputs": [{"name": "x", "shape": [2], "datatype": "BF16",
                                       "parameters": {"binary_data_size": 4}}]}, raw)
    assert message.raw_input_contents[0] == raw
    assert rest_codec.data_json("BF16", raw) == [1.5, -2.0]


@pytest.mark.parametrize("header, binary, words", [
    ({"inputs": "x"}, b"", "'inputs' must be a non-empty list"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, b"", "1 elements"),
    ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}, b"", "non-negative"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [128]}]}, b"", "out of range"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1.5]}]}, b"", "integers"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}, b"", "true or false"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}, b"", "strings"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [True]}]}, b"", "numbers"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", "no 'data'"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"1234", "needs 8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"12345", "1 bytes of binary data no input claims"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"t": [1]}},
     b"", "bool, number or string"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "parameters": {"timeout": -5}},
     b"", "microseconds"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": [{"n": 1}]},
     b"", "string 'name'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[1]]]] + [1] * 0}]}, b"", None),
])
def test_bad_requests_say_what_to_fix(header: dict, binary: bytes, words: str | None) -> None:
    if words is None:  # nesting is flattened, as Triton does
        rest_codec.infer_request(header, memoryview(binary), "m", "")
        return
    with pytest.raises(InvalidArgument, match=words.replace("(", r"\(")):
        rest_codec.infer_request(header, memoryview(binary), "m", "")


def test_split_body() -> None:
    assert rest_codec.split_body(b'{"a": 1}xyz', "8") == ({"a": 1}, memoryview(b"xyz"))
    for bad in ("x", "-1", "99"):
        with pytest.raises(InvalidArgument, match="Inference-Header-Content-Length"):
            rest_codec.split_body(b"{}", bad)
    with pytest.raises(InvalidArgument, match="malformed JSON.*line 1"):
        rest_codec.split_body(b"{oops", None)
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        rest_codec.parse_json(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        rest_codec.parse_json(b'"\xff"')
