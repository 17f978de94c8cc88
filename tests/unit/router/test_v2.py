"""Hand-encoded V2 messages, decoded with tritonclient's generated classes."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh.errors import InvalidArgument
from router import v2


def test_stream_response_wraps_infer_response_bytes() -> None:
    inner = pb.ModelInferResponse(model_name="m", id="7", raw_output_contents=[b"\x01" * 300])
    inner.outputs.add(name="out", datatype="FP32", shape=[1, 75])
    data = v2.stream_response(inner.SerializeToString())
    decoded = pb.ModelStreamInferResponse.FromString(data)
    assert decoded.error_message == ""
    assert decoded.infer_response == inner


def test_stream_error() -> None:
    decoded = pb.ModelStreamInferResponse.FromString(v2.stream_error("NOT_FOUND: model 'é' is gone"))
    assert decoded.error_message == "NOT_FOUND: model 'é' is gone"
    assert not decoded.HasField("infer_response")


def test_live_ready_responses() -> None:
    assert pb.ServerLiveResponse.FromString(v2.live_response(True)).live
    assert not pb.ServerReadyResponse.FromString(v2.live_response(False)).ready


def test_server_metadata() -> None:
    decoded = pb.ServerMetadataResponse.FromString(v2.server_metadata_response("meshserve", "0.1.0", ["x"]))
    assert (decoded.name, decoded.version, list(decoded.extensions)) == ("meshserve", "0.1.0", ["x"])


def test_model_metadata_with_dynamic_dims() -> None:
    data = v2.model_metadata_response(
        "m1", ["1"], "onnxruntime_onnx",
        [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        [{"name": "output", "datatype": "INT64", "shape": []}],
    )
    decoded = pb.ModelMetadataResponse.FromString(data)
    assert decoded.name == "m1" and list(decoded.versions) == ["1"]
    assert decoded.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in decoded.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in decoded.outputs] == [("output", "INT64", [])]


def test_name_of_requests() -> None:
    assert v2.name_of(pb.ModelReadyRequest(name="a", version="1").SerializeToString()) == "a"
    assert v2.name_of(pb.ModelMetadataRequest(name="b").SerializeToString()) == "b"


def test_name_of_refuses_oversize_and_corrupt_names() -> None:
    """Bug: ModelReady / ModelMetadata with a 200,000-character name came back NOT_FOUND with
    the whole name in the message; a corrupt version field after a valid name was accepted."""
    with pytest.raises(InvalidArgument) as info:
        v2.name_of(pb.ModelReadyRequest(name="n" * 200_000).SerializeToString())
    assert len(info.value.message) < 200
    with pytest.raises(InvalidArgument):
        v2.name_of(pb.ModelReadyRequest(name="a").SerializeToString() + b"\x12\x02\xff\xfe")


def test_stream_error_redacts_paths() -> None:
    data = v2.stream_error("FAILED_PRECONDITION: cannot open /tmp/x/cache/pod-1/objects/ab")
    assert pb.ModelStreamInferResponse.FromString(data).error_message == "FAILED_PRECONDITION: cannot open <path>"
