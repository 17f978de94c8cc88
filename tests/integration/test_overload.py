"""Overload end to end: a real runtime pod (child process, tiny queue: 4 requests per model, one
executor thread) flooded beyond its queue with bounded concurrency, directly and through the
router. Some requests must be shed with RESOURCE_EXHAUSTED carrying grpc-retry-pushback-ms and a
message naming the setting; every other request must succeed with onnxruntime's answer; the pod
must still be up and serving afterwards.

Raw grpc with tritonclient's generated messages (not tritonclient's client): its exceptions do
not expose trailing metadata."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2 as tpb

from mesh import demo
from mesh.cli.local import LocalMesh

from .conftest import start_mesh

pytestmark = pytest.mark.integration

METHOD = "/inference.GRPCInferenceService/ModelInfer"
PUSHBACK = "grpc-retry-pushback-ms"
QUEUE = 4
BURST = 48  # concurrent requests per burst: 12x the model's queue
BURSTS = 10  # bursts tried until one overflows the queue (the first almost always does)


def _mlp(seed: int, width: int = 256, layers: int = 8):  # noqa: ANN202
    """[batch, width] -> [batch, width] through `layers` x (MatMul + Relu): a run takes a while."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "output" if i == layers - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [out])]
        prev = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])], inits,
    )
    return demo._finish(graph)


@pytest.fixture(scope="module")
def overload_mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    folder = tmp_path_factory.mktemp("overload")
    path = demo.save(_mlp(3), folder / "mlp.onnx")
    env = {"MESH_RUNTIME_MAX_QUEUE_PER_MODEL": str(QUEUE), "MESH_RUNTIME_EXECUTOR_THREADS": "1"}
    m = start_mesh(folder, etcd_endpoint, pods=1, capacity="256MiB", pod_env={0: env})
    try:
        m.register("mlp", path)
        yield m, path
    finally:
        m.stop()


def _request(x: np.ndarray) -> bytes:
    request = tpb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request.SerializeToString()


def _output(response: bytes, rows: int) -> np.ndarray:
    out = tpb.ModelInferResponse.FromString(response)
    return np.frombuffer(out.raw_output_contents[0], np.float32).reshape(rows, -1)


async def _burst(address: str, xs: list[np.ndarray]) -> list[bytes | grpc.aio.AioRpcError]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        await call(_request(xs[0]), timeout=60)  # connected (and, through the router, loaded)

        async def one(x: np.ndarray) -> bytes | grpc.aio.AioRpcError:
            try:
                return await call(_request(x), timeout=60)
            except grpc.aio.AioRpcError as exc:
                return exc

        return await asyncio.gather(*(one(x) for x in xs))


def _flood(address: str, path: pathlib.Path) -> int:
    """Bursts until one overflows the queue; checks every answer; returns the sheds seen."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    shed = 0
    for _ in range(BURSTS):
        xs = [rng.standard_normal((64, 256)).astype(np.float32) for _ in range(BURST)]
        for x, result in zip(xs, asyncio.run(_burst(address, xs)), strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result
                assert "MESH_RUNTIME_MAX_QUEUE_PER_MODEL" in (result.details() or "")
                assert int(dict(result.trailing_metadata() or ())[PUSHBACK]) >= 1
                shed += 1
            else:
                np.testing.assert_allclose(_output(result, 64), session.run(None, {"input": x})[0],
                                           rtol=1e-4, atol=1e-4)
        if shed:
            return shed
    return shed


def _serving(mesh: LocalMesh, address: str, path: pathlib.Path) -> None:
    assert mesh.procs["pod-0"].poll() is None, "the pod died"
    x = np.ones((1, 256), np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    (response,) = asyncio.run(_burst(address, [x]))
    assert not isinstance(response, Exception), response
    np.testing.assert_allclose(_output(response, 1), want, rtol=1e-4, atol=1e-4)


def test_a_flooded_pod_sheds_with_a_retry_hint_and_answers_the_rest(overload_mesh) -> None:
    mesh, path = overload_mesh
    _serving(mesh, mesh.router_address, path)  # loaded through the router first
    pod = f"127.0.0.1:{mesh.ports['pod-0']}"
    assert _flood(pod, path) > 0, f"no burst of {BURST} overflowed a queue of {QUEUE} in {BURSTS} tries"
    _serving(mesh, pod, path)
    sample = mesh.scrape("pod-0")
    assert sample.get('mesh_shed_total{reason="model_queue",service="runtime"}', 0) > 0, sample


def test_the_router_passes_the_pods_shed_and_its_retry_hint_on(overload_mesh) -> None:
    mesh, path = overload_mesh
    assert _flood(mesh.router_address, path) > 0, f"no burst of {BURST} overflowed a queue of {QUEUE}"
    _serving(mesh, mesh.router_address, path)
