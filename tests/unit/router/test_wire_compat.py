"""Our Triton extension messages (proto/mesh/pb/inference/model_config.proto, extensions.proto)
are wire-compatible with Triton's: every field of every message we define has the number,
type, label and (for message and enum fields) the type name that tritonclient's generated
descriptors give it, and every enum value its number. This test is the compatibility guarantee
for ModelConfig, ModelStatistics and the repository RPCs; our messages are a subset (fields we
leave out are skipped by parsers), never a variant."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, text_format
from tritonclient.grpc import model_config_pb2 as their_config
from tritonclient.grpc import service_pb2 as their_service

from mesh.pb.inference import extensions_pb2, model_config_pb2


def _proto(module: object) -> descriptor_pb2.FileDescriptorProto:
    out = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(out)  # type: ignore[attr-defined]
    return out


def _short(type_name: str) -> str:
    """A field's type name without its package (ours: mesh.inference, Triton's: inference)."""
    for package in (".mesh.inference.", ".inference."):
        if type_name.startswith(package):
            return type_name[len(package):]
    return type_name


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        out[prefix + message.name] = message
        for nested in message.nested_type:
            walk(nested, f"{prefix}{message.name}.")

    for message in file.message_type:
        walk(message, "")
    return out


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    out = {e.name: {v.name: v.number for v in e.value} for e in file.enum_type}
    for name, message in _messages(file).items():
        out.update({f"{name}.{e.name}": {v.name: v.number for v in e.value} for e in message.enum_type})
    return out


THEIRS = {**_messages(_proto(their_config)), **_messages(_proto(their_service))}
THEIR_ENUMS = {**_enums(_proto(their_config)), **_enums(_proto(their_service))}
OURS = {**_messages(_proto(model_config_pb2)), **_messages(_proto(extensions_pb2))}
OUR_ENUMS = {**_enums(_proto(model_config_pb2)), **_enums(_proto(extensions_pb2))}


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_field_matches_tritonclient(name: str) -> None:
    assert name in THEIRS, f"{name} is not a Triton message"
    theirs = {f.name: f for f in THEIRS[name].field}
    for field in OURS[name].field:
        assert field.name in theirs, f"{name}.{field.name} is not in Triton's {name}"
        their = theirs[field.name]
        assert (field.number, field.type, field.label, _short(field.type_name)) == (
            their.number, their.type, their.label, _short(their.type_name)), f"{name}.{field.name}"


@pytest.mark.parametrize("name", sorted(OUR_ENUMS))
def test_every_enum_value_matches_tritonclient(name: str) -> None:
    assert OUR_ENUMS[name].items() <= THEIR_ENUMS[name].items(), name


def test_the_messages_the_rpcs_and_config_files_need_are_there() -> None:
    assert {"ModelConfig", "ModelInput", "ModelOutput", "ModelDynamicBatching", "ModelInstanceGroup",
            "ModelVersionPolicy", "ModelParameter", "ModelConfigRequest", "ModelConfigResponse",
            "ModelStatisticsRequest", "ModelStatisticsResponse", "InferStatistics", "InferBatchStatistics",
            "RepositoryIndexRequest", "RepositoryIndexResponse", "RepositoryModelLoadRequest",
            "RepositoryModelUnloadRequest"} <= OURS.keys()
    # Every field Triton's InferStatistics and ModelStatistics have, we have (clients read them all).
    for name in ("InferStatistics", "ModelStatistics", "StatisticDuration", "InferBatchStatistics"):
        assert {f.name for f in THEIRS[name].field} == {f.name for f in OURS[name].field}, name


def test_bytes_from_tritonclient_parse_as_ours_and_back() -> None:
    theirs = their_config.ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=8)
    theirs.input.add(name="x", data_type=their_config.TYPE_FP32, dims=[-1, 4])
    theirs.dynamic_batching.max_queue_delay_microseconds = 100
    theirs.instance_group.add(count=2, kind=their_config.ModelInstanceGroup.KIND_GPU)
    ours = model_config_pb2.ModelConfig.FromString(theirs.SerializeToString())
    assert their_config.ModelConfig.FromString(ours.SerializeToString()) == theirs


def test_a_typical_onnx_config_pbtxt_parses() -> None:
    text = """
    name: "densenet_onnx"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    input [ { name: "data_0" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] reshape { shape: [ 1, 3, 224, 224 ] } } ]
    output [ { name: "fc6_1" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "densenet_labels.txt" } ]
    dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
    instance_group [ { count: 2 kind: KIND_CPU } ]
    version_policy: { specific: { versions: [ 1 ] } }
    parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
    """
    config = text_format.Parse(text, model_config_pb2.ModelConfig(), allow_unknown_field=True)
    assert (config.max_batch_size, list(config.input[0].dims), config.instance_group[0].count) == (8, [3, 224, 224], 2)
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.parameters["intra_op_thread_count"].string_value == "1"
