"""End to end through real processes: tritonclient → router → placement → runtime pod, on a
real etcd. Results are compared with onnxruntime run directly in the test."""

from __future__ import annotations

import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh.cli.local import LocalMesh

pytestmark = pytest.mark.integration


def expected(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def infer(client: triton.InferenceServerClient, model_id: str, x: np.ndarray,
          name: str = "input", datatype: str = "FP32", headers: dict | None = None) -> np.ndarray:
    inp = triton.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    result = client.infer(model_id, [inp], headers=headers, client_timeout=60)
    return result.as_numpy("output")


@pytest.fixture
def client(mesh: LocalMesh):
    c = triton.InferenceServerClient(mesh.router_address)
    yield c
    c.close()


def test_cold_then_warm_model_matches_onnxruntime(client, mesh, model_files) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    cold = infer(client, "linear-0", x)
    np.testing.assert_allclose(cold, expected(model_files["linear-0"], x), rtol=1e-5, atol=1e-6)
    status = mesh.get_model("linear-0")
    assert [c.state for c in status.copies].count(2) == 1  # one LOADED copy
    assert status.size_bytes > 0
    warm = infer(client, "linear-0", x)
    np.testing.assert_array_equal(warm, cold)
    assert client.is_model_ready("linear-0")
    meta = client.get_model_metadata("linear-0")
    assert meta.inputs[0].name == "input" and meta.inputs[0].datatype == "FP32"


def test_model_id_from_mm_headers(client, mesh, model_files) -> None:
    """The mm-model-id / mm-vmodel-id headers (ModelMesh) win over model_name."""
    x = np.ones((1, 4), dtype=np.float32)
    out = infer(client, "ignored-name", x, headers={"mm-model-id": "linear-1"})
    np.testing.assert_allclose(out, expected(model_files["linear-1"], x), rtol=1e-5, atol=1e-6)
    out = infer(client, "ignored-name", x, headers={"mm-vmodel-id": "linear-1"})
    np.testing.assert_allclose(out, expected(model_files["linear-1"], x), rtol=1e-5, atol=1e-6)


def test_concurrent_requests_for_a_cold_model_load_it_once(mesh, model_files) -> None:
    loads_before = _loads(mesh)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    want = expected(model_files["linear-2"], x)

    def one(_: int) -> np.ndarray:
        c = triton.InferenceServerClient(mesh.router_address)
        try:
            return infer(c, "linear-2", x)
        finally:
            c.close()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for r in results:
        np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-6)
    status = mesh.get_model("linear-2")
    assert len(status.copies) == 1, status
    assert _loads(mesh) - loads_before == 1


def _loads(mesh: LocalMesh) -> float:
    return sum(mesh.scrape(pod).get('mesh_loads_total{result="ok"}', 0) for pod in ("pod-0", "pod-1"))


def test_unknown_model_is_not_found(client) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, "no-such-model", np.ones((1, 4), dtype=np.float32))
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in err.value.message()


@pytest.mark.parametrize(
    ("name", "shape", "datatype", "fragment"),
    [
        ("wrong", (1, 4), "FP32", "wrong"),
        ("input", (1, 5), "FP32", "shape"),
        ("input", (1, 4), "INT32", "datatype"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_pod_stays_up(client, name, shape, datatype, fragment) -> None:
    x = np.ones(shape, dtype=np.float32 if datatype == "FP32" else np.int32)
    with pytest.raises(InferenceServerException) as err:
        infer(client, "linear-3", x, name=name, datatype=datatype)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert fragment in err.value.message().lower()
    out = infer(client, "linear-3", np.ones((1, 4), dtype=np.float32))
    assert out.shape == (1, 3)


def test_corrupt_artifact_fails_with_reason_while_others_serve(client, mesh) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, "corrupt", np.ones((1, 4), dtype=np.float32))
    assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
    status = mesh.get_model("corrupt")
    assert status.last_error, status
    assert status.state == 4  # MODEL_FAILED
    out = infer(client, "linear-0", np.ones((1, 4), dtype=np.float32))
    assert out.shape == (1, 3)


def test_every_process_answers_grpc_health_checks(mesh) -> None:
    """Kubernetes grpc probes (grpc.health.v1) on the router, a runtime pod and placement."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for name in ("router", "pod-0", "placement"):
        with grpc.insecure_channel(f"127.0.0.1:{mesh.ports[name]}") as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
