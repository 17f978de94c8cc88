"""BF16 end to end (issue 11 item 1) against a real LocalMesh: tritonclient.grpc (sync and aio)
and tritonclient.http (binary data), unmodified, with bfloat16 models served by the runtime
pods (puller/ortvalues.py). The answer's bytes are exact, ModelMetadata says BF16 and
ModelConfig TYPE_BF16, typed contents and size mismatches are INVALID_ARGUMENT (as Triton),
and concurrent requests to a batching model come back exactly."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bf16_tensor, serialize_bf16_tensor

from mesh import demo
from mesh.cli.local import LocalMesh
from tests.unit.puller.test_bf16 import add_model

from .conftest import start_mesh

pytestmark = pytest.mark.integration

# Multiples of 1/4 in [-8, 8]: every one, and every sum of two, is exact in bfloat16, so
# float32 math is the expected answer and tritonclient's truncation loses nothing.
A = np.array([[1.5, -2.0, 0.25, 7.75], [0.0, -0.5, 3.0, -8.0]], np.float32)
B = np.array([[0.5, 0.25, -1.0, 8.0], [-0.0, 2.5, -3.0, 1.75]], np.float32)


def bf16_bytes(values: np.ndarray) -> bytes:
    """The raw V2 bytes of exactly-representable values: each float32's top half, little-endian."""
    return (np.ascontiguousarray(values, "<f4").view("<u4") >> 16).astype("<u2").tobytes()


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    folder: pathlib.Path = tmp_path_factory.mktemp("bf16")
    m = start_mesh(folder, etcd_endpoint, pods=2, capacity="256MiB")
    try:
        m.register("bf16-add", demo.save(add_model(), folder / "add.onnx"))
        m.register("bf16-id-batched", demo.save(demo.identity_model(TensorProto.BFLOAT16, width=3), folder / "id.onnx"),
                   max_batch_size=16, max_queue_delay_us=20_000)
        yield m
    finally:
        m.stop()


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(mesh.router_address)
    try:
        yield c
    finally:
        c.close()


def _inputs(module: object = triton) -> list[object]:
    a = module.InferInput("a", [2, 4], "BF16")  # type: ignore[attr-defined]
    b = module.InferInput("b", [2, 4], "BF16")  # type: ignore[attr-defined]
    a.set_data_from_numpy(A)  # tritonclient wants float32 and sends each one's top half
    b.set_data_from_numpy(B)
    return [a, b]


def test_grpc_add_answers_exact_bf16_bytes(client: triton.InferenceServerClient) -> None:
    result = client.infer("bf16-add", _inputs(), client_timeout=120,  # type: ignore[arg-type]
                          outputs=[triton.InferRequestedOutput("y"), triton.InferRequestedOutput("f")])
    response = result.get_response()
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "BF16", [2, 4]),
                                                                              ("f", "FP32", [2, 4])]
    assert response.raw_output_contents[0] == bf16_bytes(A + B)
    y = result.as_numpy("y")  # tritonclient's deserialize_bf16_tensor: float32
    assert y is not None and y.dtype == np.float32 and y.tolist() == (A + B).tolist()
    assert result.as_numpy("f").tolist() == (A + B).tolist()


def test_bytes_are_tritonclients_own_serialization(client: triton.InferenceServerClient) -> None:
    """What serialize_bf16_tensor makes is what the pod reads; deserialize_bf16_tensor reads the answer."""
    assert serialize_bf16_tensor(A).item() == bf16_bytes(A)
    result = client.infer("bf16-add", _inputs(), client_timeout=120)  # type: ignore[arg-type]
    raw = result.get_response().raw_output_contents[0]
    assert deserialize_bf16_tensor(raw).reshape(2, 4).tolist() == (A + B).tolist()


def test_metadata_says_bf16_and_config_type_bf16(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("bf16-add", as_json=True)
    assert meta["inputs"] == [{"name": "a", "datatype": "BF16", "shape": ["-1", "4"]},
                              {"name": "b", "datatype": "BF16", "shape": ["-1", "4"]}]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("y", "BF16"), ("f", "FP32")]
    config = client.get_model_config("bf16-add").config
    bf16 = triton.model_config_pb2.TYPE_BF16
    assert [(i.name, i.data_type) for i in config.input] == [("a", bf16), ("b", bf16)]
    assert [(o.name, o.data_type) for o in config.output] == [("y", bf16), ("f", triton.model_config_pb2.TYPE_FP32)]


def _call(mesh: LocalMesh, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(mesh.router_address) as channel, pytest.raises(grpc.RpcError) as exc:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    return exc.value


def test_typed_bf16_contents_are_invalid_argument(mesh: LocalMesh) -> None:
    """InferTensorContents has no bf16 field: BF16 travels raw only, as Triton answers."""
    request = service_pb2.ModelInferRequest(model_name="bf16-add")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="BF16", shape=[1, 4]).contents.fp32_contents.extend([1.0] * 4)
    err = _call(mesh, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BF16 must be sent in raw_input_contents" in (err.details() or "")


@pytest.mark.parametrize(("shape", "nbytes", "message"), [
    ([2, 4], 14, "raw contents are 14 bytes but shape [2, 4] of BF16 needs exactly 16"),
    ([2, 3], 12, "has shape [2, 3] but the model expects [-1, 4]"),
])
def test_size_and_shape_mismatches_are_invalid_argument(mesh: LocalMesh, shape: list[int], nbytes: int,
                                                        message: str) -> None:
    request = service_pb2.ModelInferRequest(model_name="bf16-add")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="BF16", shape=shape)
        request.raw_input_contents.append(b"\x80\x3f" * (nbytes // 2))
    err = _call(mesh, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.details() or "")


def test_http_binary_data(mesh: LocalMesh) -> None:
    c = triton_http.InferenceServerClient(mesh.rest_address, connection_timeout=120, network_timeout=120)
    try:
        inputs = []
        for name, values in (("a", A), ("b", B)):
            x = triton_http.InferInput(name, [2, 4], "BF16")
            x.set_data_from_numpy(values, binary_data=True)
            inputs.append(x)
        result = c.infer("bf16-add", inputs, outputs=[triton_http.InferRequestedOutput("y", binary_data=True)])
        assert result.get_output("y")["datatype"] == "BF16"
        assert result.as_numpy("y").tolist() == (A + B).tolist()
        assert c.get_model_metadata("bf16-add")["outputs"][0] == {"name": "y", "datatype": "BF16", "shape": [-1, 4]}
    finally:
        c.close()


def test_concurrent_requests_to_a_batching_model_come_back_exactly(mesh: LocalMesh) -> None:
    """Each request's rows come back as it sent them, however the pod's batcher grouped them
    (it concatenates uint16 bit patterns; tests/unit/puller/test_bf16.py pins a real batch)."""
    rows = [1, 2, 3, 1, 4, 2] * 8
    sent = [np.arange(n * 3, dtype=np.float32).reshape(n, 3) * 0.5 - i for i, n in enumerate(rows)]

    async def run() -> list[np.ndarray]:
        c = triton_aio.InferenceServerClient(mesh.router_address)
        try:
            async def one(x: np.ndarray) -> np.ndarray:
                inp = triton_aio.InferInput("input", list(x.shape), "BF16")
                inp.set_data_from_numpy(x)
                result = await c.infer("bf16-id-batched", [inp], client_timeout=120)
                assert result.get_output("output").datatype == "BF16"
                return result.as_numpy("output")

            await one(sent[0])  # loads a copy first
            return list(await asyncio.gather(*(one(x) for x in sent)))
        finally:
            await c.close()

    got = asyncio.run(run())
    for x, y in zip(sent, got, strict=True):
        assert y.shape == x.shape and y.tolist() == x.tolist()
