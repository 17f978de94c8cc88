"""Model id extraction from raw ModelInferRequest bytes (built with tritonclient's classes)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from mesh.errors import InvalidArgument
from router import modelid, wire


def _request(name: str = "m1", raw: bytes = b"\x00" * 64) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name, model_version="1", id="req-7")
    req.parameters["p"].int64_param = -5
    tensor = req.inputs.add(name="input", datatype="FP32", shape=[1, -1, 4])
    tensor.parameters["q"].double_param = 1.5
    req.outputs.add(name="output")
    req.raw_input_contents.append(raw)
    return req


def test_model_name_read_from_bytes() -> None:
    assert modelid.model_name(_request("resnet-50").SerializeToString()) == "resnet-50"


def test_field_order_does_not_matter() -> None:
    # model_name written last, after tensors: hand-append field 1 to a message without it.
    data = _request("").SerializeToString() + wire.string(1, "late")
    assert modelid.model_name(data) == "late"


def test_last_model_name_wins_like_protobuf() -> None:
    data = wire.string(1, "first") + _request("").SerializeToString() + wire.string(1, "second")
    parsed = pb.ModelInferRequest.FromString(data)
    assert modelid.model_name(data) == parsed.model_name == "second"


def test_unicode_name() -> None:
    assert modelid.model_name(_request("modèle-日本").SerializeToString()) == "modèle-日本"


def test_empty_name_and_empty_message() -> None:
    assert modelid.model_name(_request("").SerializeToString()) == ""
    assert modelid.model_name(b"") == ""
    with pytest.raises(InvalidArgument, match="no model id"):
        modelid.resolve((), _request("").SerializeToString())


def test_fixed_width_fields_are_skipped() -> None:
    # fixed64 (wire type 1) and fixed32 (wire type 5) unknown fields before model_name
    data = wire.tag(9, 1) + b"\x01" * 8 + wire.tag(10, 5) + b"\x02" * 4 + wire.string(1, "m")
    assert modelid.model_name(data) == "m"


@pytest.mark.parametrize("cut", [1, 2, 5, 20])
def test_truncated_bytes_are_invalid(cut: int) -> None:
    data = _request("a-model-name", raw=b"\x01" * 300).SerializeToString()
    with pytest.raises(InvalidArgument):
        modelid.model_name(data[:-cut])


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a",  # tag without length
        b"\x0a\x05ab",  # length past the end
        b"\x80",  # truncated varint tag
        b"\x0b",  # group start (wire type 3)
        b"\x0e\x00",  # wire type 6
        b"\x00\x00",  # field number 0
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x08\x01",  # field 1 as a varint
        b"\x0a" + b"\xff" * 11,  # varint longer than 10 bytes
    ],
)
def test_malformed_bytes_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        modelid.model_name(data)


def test_metadata_precedence() -> None:
    body = _request("in-body").SerializeToString()
    assert modelid.resolve([], body) == ("in-body", body)
    model_id, data = modelid.resolve([("mm-model-id", "hdr")], body)
    assert model_id == "hdr"
    assert pb.ModelInferRequest.FromString(data).model_name == "hdr"  # the pod sees the same id
    model_id, _ = modelid.resolve([("mm-model-id", "hdr"), ("mm-vmodel-id", "v")], body)
    assert model_id == "v"


def test_header_equal_to_body_leaves_bytes_alone() -> None:
    body = _request("same").SerializeToString()
    assert modelid.resolve([("mm-model-id", "same")], body) == ("same", body)


@given(name=st.text(max_size=40), raw=st.binary(max_size=200), version=st.text(max_size=5))
def test_any_valid_request(name: str, raw: bytes, version: str) -> None:
    req = _request(name, raw)
    req.model_version = version
    assert modelid.model_name(req.SerializeToString()) == name


@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        modelid.model_name(data)
    except InvalidArgument:
        pass


# -- regressions (bad input, fuzzing) ----------------------------------------------------------


def test_corrupt_inputs_field_after_a_valid_model_name_is_invalid_argument() -> None:
    """Bug: the router read only the top level, forwarded a request whose `inputs` field was
    corrupt inside, and the pod's parser answered UNKNOWN with a protobuf DecodeError text.
    The router now checks the nested structure itself (tensor payloads skipped by length)."""
    data = wire.string(1, "m") + wire.length_delimited(5, b"\x0a\x05ab")  # name runs past the tensor
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data)
    with pytest.raises(InvalidArgument, match="ModelInferRequest"):
        modelid.model_name(data)


@pytest.mark.parametrize(
    "data",
    [
        wire.string(1, "m") + wire.length_delimited(5, wire.length_delimited(1, b"\xff")),  # input name not UTF-8
        wire.string(1, "m") + wire.length_delimited(5, wire.length_delimited(3, b"\x80")),  # packed shape cut
        wire.string(1, "m") + wire.length_delimited(5, wire.length_delimited(5, wire.length_delimited(6, b"\x00" * 3))),
        wire.string(1, "m") + wire.length_delimited(4, wire.length_delimited(2, wire.tag(3, 2) + b"\x05")),
        wire.varint((1 << 29) << 3) + b"\x01" + wire.string(1, "m"),  # field number beyond protobuf's
    ],
)
def test_nested_corruption_protobuf_refuses_is_refused_by_the_router(data: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(data)
    with pytest.raises(InvalidArgument):
        modelid.model_name(data)


def test_oversize_id_is_refused_and_echoed_truncated() -> None:
    """Bug: a 200,000-character model id was echoed whole into the NOT_FOUND message, until
    the client's metadata limit tripped instead of an answer."""
    for metadata, body in (((), _request("x" * 200_000)), ((("mm-model-id", "y" * 200_000),), _request("m"))):
        with pytest.raises(InvalidArgument) as info:
            modelid.resolve(metadata, body.SerializeToString())
        assert len(info.value.message) < 200 and "…" in info.value.message
    assert modelid.resolve((), _request("z" * 128).SerializeToString())[0] == "z" * 128
