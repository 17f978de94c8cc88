"""The V2 protocol's rules, with Triton's choices where V2 leaves one, case by case against a
real LocalMesh (issue 11). Each row: a request (built with tritonclient's generated messages),
the status it must get, and what its answer must hold. docs/PROTOCOL.md lists the rules."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from mesh import demo
from mesh.cli.local import LocalMesh

from .conftest import start_mesh

pytestmark = pytest.mark.integration
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder: pathlib.Path = tmp_path_factory.mktemp("conformance")
    m: LocalMesh = start_mesh(folder, etcd_endpoint, pods=1, capacity="128MiB")
    try:
        m.register("f32", demo.save(demo.identity_model(TensorProto.FLOAT), folder / "f32.onnx"))
        m.register("f16", demo.save(demo.identity_model(TensorProto.FLOAT16), folder / "f16.onnx"))
        with grpc.insecure_channel(m.router_address) as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    finally:
        m.stop()


def raw(model: str = "f32", dtype: str = "FP32", arr: np.ndarray | None = None, **fields: Any) -> pb.ModelInferRequest:
    arr = np.array([[1.5, -2.0]], np.float32) if arr is None else arr
    req = pb.ModelInferRequest(model_name=model, **fields)
    req.inputs.add(name="input", datatype=dtype, shape=list(arr.shape))
    req.raw_input_contents.append(arr.tobytes())
    return req


def typed(**fields: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="f32", **fields)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.5, -2.0])
    return req


def mixed() -> pb.ModelInferRequest:
    req = typed()
    req.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    return req


def typed_fp16() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="f16")
    req.inputs.add(name="input", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    return req


def with_params() -> pb.ModelInferRequest:
    req = raw(id="p")
    req.parameters["custom"].string_param = "x"
    return req


def outputs_raw(resp: pb.ModelInferResponse) -> bool:
    return len(resp.raw_output_contents) == len(resp.outputs) == 1 and not resp.outputs[0].HasField("contents") \
        and np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [1.5, -2.0]


@dataclasses.dataclass(frozen=True)
class Case:
    rule: str
    method: str
    request: Callable[[], Any]
    code: grpc.StatusCode
    check: Callable[[Any], bool] = lambda _: True
    detail: str = ""


CASES = [
    Case("raw request: outputs in raw_output_contents", "ModelInfer", raw, OK, outputs_raw),
    Case("typed request: outputs in raw_output_contents too (Triton)", "ModelInfer", typed, OK, outputs_raw),
    Case("id echoed", "ModelInfer", lambda: raw(id="req-7"), OK, lambda r: r.id == "req-7"),
    Case("model_name echoed", "ModelInfer", raw, OK, lambda r: r.model_name == "f32"),
    Case("model_version: the version that ran", "ModelInfer", raw, OK, lambda r: r.model_version == "1"),
    Case("explicit version 1 served", "ModelInfer", lambda: raw(model_version="1"), OK, lambda r: r.model_version == "1"),
    Case("unknown version: NOT_FOUND", "ModelInfer", lambda: raw(model_version="7"), NOT_FOUND, detail="version '7'"),
    Case("request parameters not echoed (Triton)", "ModelInfer", with_params, OK, lambda r: not r.parameters),
    Case("raw and typed in one request: INVALID_ARGUMENT", "ModelInfer", mixed, INVALID,
         detail="contents field must not be specified when using raw_input_contents for 'input' for model 'f32'"),
    Case("FP16 has no typed contents", "ModelInfer", typed_fp16, INVALID, detail="raw_input_contents"),
    Case("FP16 raw round-trips", "ModelInfer", lambda: raw("f16", "FP16", np.array([[0.5, 2.0]], np.float16)), OK,
         lambda r: np.frombuffer(r.raw_output_contents[0], np.float16).tolist() == [0.5, 2.0]),
    Case("datatype mismatch: INVALID_ARGUMENT", "ModelInfer", lambda: raw(dtype="FP64"), INVALID, detail="FP32"),
    Case("unknown model: NOT_FOUND", "ModelInfer", lambda: raw("absent"), NOT_FOUND),
    Case("ServerMetadata lists the extensions implemented", "ServerMetadata", pb.ServerMetadataRequest, OK,
         lambda r: set(r.extensions) == {"model_configuration", "model_repository", "statistics"}),
    Case("ModelMetadata: one version", "ModelMetadata", lambda: pb.ModelMetadataRequest(name="f32"), OK,
         lambda r: list(r.versions) == ["1"] and r.inputs[0].datatype == "FP32"),
    Case("ModelConfig of an unknown model: NOT_FOUND", "ModelConfig", lambda: pb.ModelConfigRequest(name="absent"),
         NOT_FOUND),
    Case("ModelConfig types are Triton's", "ModelConfig", lambda: pb.ModelConfigRequest(name="f16"), OK,
         lambda r: r.config.input[0].data_type == 10 and r.config.platform == "onnxruntime_onnx"),
    Case("statistics version must exist", "ModelStatistics", lambda: pb.ModelStatisticsRequest(name="f32", version="3"),
         NOT_FOUND),
    Case("repository index lists registered models", "RepositoryIndex", pb.RepositoryIndexRequest, OK,
         lambda r: {"f32", "f16"} <= {m.name for m in r.models} and all(m.version == "1" for m in r.models)),
    Case("unknown repository: NOT_FOUND", "RepositoryIndex", lambda: pb.RepositoryIndexRequest(repository_name="r"),
         NOT_FOUND),
    Case("load of an unregistered model: NOT_FOUND", "RepositoryModelLoad",
         lambda: pb.RepositoryModelLoadRequest(model_name="absent"), NOT_FOUND),
    Case("unload of an unknown model succeeds", "RepositoryModelUnload",
         lambda: pb.RepositoryModelUnloadRequest(model_name="absent"), OK),
]


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_rule(stub: Any, case: Case) -> None:
    try:
        response = getattr(stub, case.method)(case.request(), timeout=120)
    except grpc.RpcError as exc:
        assert (exc.code(), case.detail in (exc.details() or "")) == (case.code, True), exc.details()
        return
    assert case.code == OK, f"expected {case.code}, got OK"
    assert case.check(response), response
