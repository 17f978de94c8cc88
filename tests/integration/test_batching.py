"""Dynamic batching end to end: a model registered with max_batch_size through the router,
concurrent tritonclient requests answered exactly as onnxruntime answers them alone, batches
seen in the runtime's mesh_batch_size metric, and a bad request failing alone.

The batcher runs a request at once when the model is idle and batches only what arrives while
a run is in progress, so the model here does real work per run (a chain of identity MatMuls,
exact in float) to keep a run in progress while concurrent requests arrive."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import demo
from mesh.cli.local import LocalMesh

from .conftest import start_mesh

pytestmark = pytest.mark.integration

N = 16
ROUNDS = 5  # bursts tried until one shares a run (the first almost always does)


def _slow_model(seed: int, chain: int = 100, hidden: int = 256):  # noqa: ANN202
    """[batch, 4] -> [batch, 3] through `chain` x (MatMul by identity + Relu) at width `hidden`:
    milliseconds of onnxruntime work per run, 256 KiB of weights, and results exactly those of
    the two outer random MatMuls."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, hidden)).astype(np.float32), "W_in"),
        numpy_helper.from_array(np.eye(hidden, dtype=np.float32), "I"),
        numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "W_out"),
    ]
    nodes = [helper.make_node("MatMul", ["input", "W_in"], ["h0"])]
    for i in range(chain):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "I"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{chain}", "W_out"], ["output"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return demo._finish(graph)


@pytest.fixture(scope="module")
def batching_mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    folder = tmp_path_factory.mktemp("batching")
    path = demo.save(_slow_model(11), folder / "batched.onnx")
    m = start_mesh(folder, etcd_endpoint, pods=1, capacity="256MiB")
    try:
        # 200 ms queue delay: requests fired together reliably share a batch on a slow machine.
        m.register("batched", path, max_batch_size=N, max_queue_delay_us=200_000)  # type: ignore[arg-type]
        yield m, path
    finally:
        m.stop()


def _infer(client: triton.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("batched", [inp], client_timeout=60).as_numpy("output")


def _fire(mesh: LocalMesh, xs: list[np.ndarray]) -> list[np.ndarray | InferenceServerException]:
    barrier = threading.Barrier(len(xs), timeout=30)

    def one(x: np.ndarray) -> np.ndarray | InferenceServerException:
        c = triton.InferenceServerClient(mesh.router_address)
        try:
            c.is_server_live()  # connect before the barrier
            barrier.wait()
            return _infer(c, x)
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(len(xs)) as pool:
        return list(pool.map(one, xs))


def _batches(mesh: LocalMesh) -> tuple[float, float]:
    sample = mesh.scrape("pod-0")
    return sample.get("mesh_batch_size_count", 0.0), sample.get("mesh_batch_size_sum", 0.0)


def test_concurrent_requests_are_batched_and_match_onnxruntime(batching_mesh) -> None:
    mesh, path = batching_mesh
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = triton.InferenceServerClient(mesh.router_address)
    try:
        _infer(c, np.ones((1, 4), np.float32))  # cold load first
    finally:
        c.close()
    rng = np.random.default_rng(2)
    for _ in range(ROUNDS):
        runs_before, requests_before = _batches(mesh)
        xs = [rng.standard_normal((1 + i % 2, 4)).astype(np.float32) for i in range(N)]
        results = _fire(mesh, xs)
        for x, out in zip(xs, results, strict=True):
            assert isinstance(out, np.ndarray), out
            np.testing.assert_allclose(out, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
        runs, requests = _batches(mesh)
        assert requests - requests_before == N
        if runs - runs_before < N:
            return  # at least one onnxruntime run served several requests
    pytest.fail(f"no burst of {N} concurrent requests shared a run in {ROUNDS} tries")


def test_a_bad_request_fails_alone_with_invalid_argument(batching_mesh) -> None:
    mesh, path = batching_mesh
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = [np.full((1, 4), i, np.float32) for i in range(7)]
    xs.insert(3, np.ones((1, 5), np.float32))  # wrong width: rejected before it is queued
    results = _fire(mesh, xs)
    for i, (x, out) in enumerate(zip(xs, results, strict=True)):
        if i == 3:
            assert isinstance(out, InferenceServerException)
            assert out.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert isinstance(out, np.ndarray), out
            np.testing.assert_allclose(out, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
