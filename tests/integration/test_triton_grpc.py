"""tritonclient.grpc and tritonclient.grpc.aio, unmodified, against a real LocalMesh: health,
metadata, config, statistics, infer (raw and typed, every datatype), repository index, load and
unload (issue 11). Typed requests go through tritonclient's own generated stub (its client
always sends raw contents)."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from onnx import TensorProto
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from mesh import demo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, tokens_pb2, tokens_pb2_grpc, types_pb2

from .conftest import start_mesh

pytestmark = pytest.mark.integration

# V2 datatype -> (ONNX element type, numpy sample); BYTES is TensorProto.STRING.
DATATYPES = {
    "BOOL": (TensorProto.BOOL, np.array([[True, False]])),
    "UINT8": (TensorProto.UINT8, np.array([[0, 255]], np.uint8)),
    "UINT16": (TensorProto.UINT16, np.array([[0, 65535]], np.uint16)),
    "UINT32": (TensorProto.UINT32, np.array([[0, 2**32 - 1]], np.uint32)),
    "UINT64": (TensorProto.UINT64, np.array([[0, 2**64 - 1]], np.uint64)),
    "INT8": (TensorProto.INT8, np.array([[-128, 127]], np.int8)),
    "INT16": (TensorProto.INT16, np.array([[-32768, 32767]], np.int16)),
    "INT32": (TensorProto.INT32, np.array([[-(2**31), 2**31 - 1]], np.int32)),
    "INT64": (TensorProto.INT64, np.array([[-(2**63), 2**63 - 1]], np.int64)),
    "FP16": (TensorProto.FLOAT16, np.array([[0.5, -2.0]], np.float16)),
    "FP32": (TensorProto.FLOAT, np.array([[0.25, -1e30]], np.float32)),
    "FP64": (TensorProto.DOUBLE, np.array([[0.1, -1e300]], np.float64)),
    "BYTES": (TensorProto.STRING, np.array([[b"a\x00b", "é".encode()]], dtype=object)),
}
TYPED = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
         "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
         "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    folder: pathlib.Path = tmp_path_factory.mktemp("triton")
    m = start_mesh(folder, etcd_endpoint, pods=2, capacity="256MiB")
    try:
        m.register("lin", demo.save(demo.linear_model(1), folder / "lin.onnx"))
        m.register("stats", demo.save(demo.linear_model(2), folder / "stats.onnx"))
        m.register("batched", demo.save(demo.linear_model(3), folder / "batched.onnx"),
                   max_batch_size=8, max_queue_delay_us=500)
        m.register("lu", demo.save(demo.linear_model(4), folder / "lu.onnx"))
        for dt, (elem, _) in DATATYPES.items():
            m.register(f"id-{dt.lower()}", demo.save(demo.identity_model(elem), folder / f"id-{dt}.onnx"))
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


def _infer(client: triton.InferenceServerClient, model: str, datatype: str, arr: np.ndarray,
           request_id: str = "") -> triton.InferResult:
    x = triton.InferInput("input", list(arr.shape), datatype)
    x.set_data_from_numpy(arr)
    return client.infer(model, [x], request_id=request_id, client_timeout=120)


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "meshserve"
    assert {"model_configuration", "model_repository", "statistics"} <= set(meta["extensions"])


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_raw_infer_round_trips_every_datatype(client: triton.InferenceServerClient, datatype: str) -> None:
    arr = DATATYPES[datatype][1]
    result = _infer(client, f"id-{datatype.lower()}", datatype, arr, request_id=f"r-{datatype}")
    out = result.as_numpy("output")
    assert out is not None and out.shape == arr.shape
    if datatype == "BYTES":
        assert out.ravel().tolist() == arr.ravel().tolist()
    else:
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (f"id-{datatype.lower()}", "1", f"r-{datatype}")
    assert len(response.raw_output_contents) == 1


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_request_is_answered_in_raw_output_contents(mesh: LocalMesh, datatype: str) -> None:
    """Triton answers typed requests in raw_output_contents; clients index that list."""
    arr = DATATYPES[datatype][1]
    request = service_pb2.ModelInferRequest(model_name=f"id-{datatype.lower()}", id="typed")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=list(arr.shape))
    getattr(tensor.contents, TYPED[datatype]).extend(arr.ravel().tolist())
    with grpc.insecure_channel(mesh.router_address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    assert response.id == "typed" and response.model_version == "1"
    assert len(response.raw_output_contents) == 1 and not response.outputs[0].HasField("contents")
    out = triton.InferResult(response).as_numpy("output")
    assert out.ravel().tolist() == arr.ravel().tolist()


def test_raw_and_typed_in_one_request_is_invalid_argument(mesh: LocalMesh) -> None:
    request = service_pb2.ModelInferRequest(model_name="id-fp32")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    with grpc.insecure_channel(mesh.router_address) as channel, pytest.raises(grpc.RpcError) as exc:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents field must not be specified when using raw_input_contents for 'input'" in exc.value.details()


def test_model_metadata_and_config(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("lin", as_json=True)
    assert meta["versions"] == ["1"] and meta["inputs"][0]["datatype"] == "FP32"
    config = client.get_model_config("lin").config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("lin", "onnxruntime_onnx",
                                                                                      "onnxruntime", 0)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input", triton.model_config_pb2.TYPE_FP32,
                                                                           [-1, 4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [-1, 3])]
    assert config.instance_group[0].count >= 1  # the metadata call loaded a copy
    batched = client.get_model_config("batched", as_json=True)["config"]
    assert batched["max_batch_size"] == 8 and batched["input"][0]["dims"] == ["4"]
    assert batched["dynamic_batching"]["max_queue_delay_microseconds"] == "500"
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_config("nope")
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    for call in (lambda: client.get_model_config("lin", model_version="2"),
                 lambda: client.get_model_metadata("lin", model_version="2"),
                 lambda: client.get_inference_statistics("lin", model_version="2")):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert exc.value.status() == "StatusCode.NOT_FOUND"
    x = triton.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("lin", [x], model_version="2", client_timeout=120)
    assert exc.value.status() == "StatusCode.NOT_FOUND" and "version '2' is not found" in exc.value.message()
    assert client.infer("lin", [x], model_version="1", client_timeout=120).get_response().model_version == "1"


def test_statistics_count_every_request_over_the_copies(client: triton.InferenceServerClient) -> None:
    for _ in range(5):
        _infer(client, "stats", "FP32", np.ones((2, 4), np.float32))
    (stats,) = client.get_inference_statistics("stats").model_stats
    assert (stats.name, stats.version, stats.inference_count, stats.execution_count) == ("stats", "1", 5, 5)
    inf = stats.inference_stats
    assert inf.success.count == inf.queue.count == inf.compute_input.count == 5
    assert inf.compute_infer.count == inf.compute_output.count == 5 and inf.fail.count == 0
    assert inf.success.ns >= inf.compute_infer.ns > 0 and stats.last_inference > 0
    assert [(b.batch_size, b.compute_infer.count) for b in stats.batch_stats] == [(1, 5)]
    everything = client.get_inference_statistics().model_stats
    assert "stats" in {s.name for s in everything}
    (fresh,) = client.get_inference_statistics("lu").model_stats  # registered, never run: zeros
    assert fresh.inference_count == 0 and fresh.inference_stats.success.count == 0


def test_repository_index_load_and_unload(mesh: LocalMesh, client: triton.InferenceServerClient) -> None:
    def state() -> dict[str, str]:
        index = client.get_model_repository_index(as_json=True)["models"]
        return {m["name"]: m.get("state", "") for m in index}

    assert state()["lu"] == "UNAVAILABLE" and not client.is_model_ready("lu")
    client.load_model("lu", client_timeout=120)
    assert client.is_model_ready("lu") and state()["lu"] == "READY"
    with grpc.insecure_channel(mesh.router_address) as channel:
        ready = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=True), timeout=30)
    assert "lu" in {m.name for m in ready.models} and all(m.state == "READY" for m in ready.models)
    client.unload_model("lu", client_timeout=120)
    assert not client.is_model_ready("lu") and state()["lu"] != "READY"
    # The registration stays: the next request loads it again.
    assert _infer(client, "lu", "FP32", np.ones((1, 4), np.float32)).as_numpy("output").shape == (1, 3)
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("not-registered")
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    client.unload_model("not-registered")  # unloading an unknown model succeeds


def test_aio_client_does_the_same(mesh: LocalMesh) -> None:
    async def run() -> None:
        c = triton_aio.InferenceServerClient(mesh.router_address)
        try:
            assert await c.is_server_live() and await c.is_server_ready()
            assert "statistics" in (await c.get_server_metadata()).extensions
            assert (await c.get_model_metadata("id-int64")).versions == ["1"]
            assert (await c.get_model_config("id-int64")).config.input[0].data_type == \
                triton.model_config_pb2.TYPE_INT64
            x = triton_aio.InferInput("input", [1, 2], "INT64")
            x.set_data_from_numpy(np.array([[3, -4]], np.int64))
            result = await c.infer("id-int64", [x], client_timeout=120)
            assert result.as_numpy("output").tolist() == [[3, -4]]
            (stats,) = (await c.get_inference_statistics("id-int64")).model_stats
            assert stats.inference_count >= 1
            await c.load_model("id-int8")
            assert await c.is_model_ready("id-int8")
            await c.unload_model("id-int8")
            assert not await c.is_model_ready("id-int8")
            assert any(m.name == "id-int64" for m in (await c.get_model_repository_index()).models)
        finally:
            await c.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def tenants(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, dict[str, str]]]:
    """A mesh with authentication on; tenants a and b each register their own "m"."""
    folder: pathlib.Path = tmp_path_factory.mktemp("triton-tenants")
    m = start_mesh(folder, etcd_endpoint, pods=1, capacity="128MiB", allow_anonymous=False,
                   env={"MESH_ROUTER_FILE_ROOTS": str(folder), "MESH_RUNTIME_FILE_ROOTS": str(folder)})
    try:
        admin = tokens_pb2_grpc.TokenAdminStub(grpc.insecure_channel(m.router_address))
        tokens = {}
        for name, tenant, scope in (("a", "a", "tenant"), ("b", "b", "tenant"), ("a-infer", "a", "infer")):
            tokens[name] = admin.CreateToken(tokens_pb2.CreateTokenRequest(name=name, tenant=tenant, scope=scope),
                                             metadata=m.auth_metadata, timeout=10).token
        path = demo.save(demo.linear_model(5), folder / "m.onnx")
        registry = registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(m.router_address))
        for who in ("a", "b"):
            registry.RegisterModel(registry_pb2.RegisterModelRequest(
                spec=types_pb2.ModelSpec(model_id="m", storage_uri=path.resolve().as_uri())),
                metadata=(("authorization", f"Bearer {tokens[who]}"),), timeout=10)
        registry.RegisterModel(registry_pb2.RegisterModelRequest(
            spec=types_pb2.ModelSpec(model_id="only-b", storage_uri=path.resolve().as_uri())),
            metadata=(("authorization", f"Bearer {tokens['b']}"),), timeout=10)
        yield m, tokens
    finally:
        m.stop()


def test_a_tenant_sees_loads_and_unloads_only_its_own_models(tenants: tuple[LocalMesh, dict[str, str]]) -> None:
    mesh, tokens = tenants
    a, b, a_infer = ({"authorization": f"Bearer {tokens[k]}"} for k in ("a", "b", "a-infer"))
    c = triton.InferenceServerClient(mesh.router_address)
    try:
        x = triton.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(3):
            c.infer("m", [x], headers=a, client_timeout=120)
        c.infer("m", [x], headers=b, client_timeout=120)
        assert c.get_inference_statistics("m", headers=a).model_stats[0].inference_count == 3
        assert c.get_inference_statistics("m", headers=b).model_stats[0].inference_count == 1
        assert {s.name for s in c.get_inference_statistics(headers=a).model_stats} == {"m"}
        assert {m.name for m in c.get_model_repository_index(headers=a).models} == {"m"}
        assert {m.name for m in c.get_model_repository_index(headers=b).models} == {"m", "only-b"}
        for call in (lambda: c.get_model_config("only-b", headers=a), lambda: c.load_model("only-b", headers=a),
                     lambda: c.get_inference_statistics("only-b", headers=a)):
            with pytest.raises(InferenceServerException) as exc:
                call()
            assert exc.value.status() == "StatusCode.NOT_FOUND" and "only-b" in exc.value.message()
        # An infer-scope token reads but never loads or unloads.
        assert c.get_model_repository_index(headers=a_infer).models
        for call in (lambda: c.load_model("m", headers=a_infer), lambda: c.unload_model("m", headers=a_infer)):
            with pytest.raises(InferenceServerException) as exc:
                call()
            assert exc.value.status() == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_repository_index()  # no token
        assert exc.value.status() == "StatusCode.UNAUTHENTICATED"
        # a's unload leaves b's "m" (and b's other model) serving.
        c.load_model("only-b", headers=b, client_timeout=120)
        c.unload_model("only-b", headers=a)  # another tenant's model: nothing to unload, as an absent one
        c.unload_model("m", headers=a, client_timeout=120)
        assert not c.is_model_ready("m", headers=a)
        assert c.is_model_ready("m", headers=b) and c.is_model_ready("only-b", headers=b)
    finally:
        c.close()
