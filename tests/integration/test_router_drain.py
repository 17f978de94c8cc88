"""A router's graceful drain on SIGTERM (router/main.py; RELIABILITY.md F2, F7), with real
processes (LocalMesh: etcd, placement, one pod, one router).

SIGTERM: grpc health turns NOT_SERVING at once, new requests are still accepted and served for
MESH_ROUTER_DRAIN_SETTLE_S (Kubernetes endpoints take a moment to drop the router), then new
RPCs are refused (UNAVAILABLE: a client retries elsewhere) while an RPC in flight — here a
request for a cold model whose artifact downloads slowly — is answered correctly; then the
router exits 0. A second signal stops it at once.

Regression test: before, SIGTERM stopped the router's server at once with a 5 s grace and no
NOT_SERVING period, so a load balancer still sending to it got errors; a second signal did
nothing.
"""

from __future__ import annotations

import http.server
import os
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from .conftest import start_mesh

pytestmark = pytest.mark.integration

X = np.array([[1, 2, 3, 4]], dtype=np.float32)
SETTLE_S = 3.0  # long enough for one request sent right after NOT_SERVING, on a busy machine
DOWNLOAD_S = 12.0  # the in-flight request outlives the settle period by far


def _golden(path: pathlib.Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


def _infer(client: triton.InferenceServerClient, model_id: str, timeout: float = 30) -> np.ndarray:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(model_id, [inp], client_timeout=timeout).as_numpy("output")


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


class SlowArtifact:
    """Serves one file over HTTP on loopback, spread over `seconds` (a slow object store), so
    a cold load of it keeps a router request in flight that long. `started` is set on a GET."""

    def __init__(self, path: pathlib.Path, seconds: float) -> None:
        body, started = path.read_bytes(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                started.set()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                chunks = 24
                step = max(len(body) // chunks, 1)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    time.sleep(seconds / chunks)

            def log_message(self, *args: object) -> None:
                pass

        self.started = started
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SlowArtifact:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def drain_mesh(etcd_endpoint: str, tmp_path: pathlib.Path) -> Iterator:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB", env={
        "MESH_ROUTER_DRAIN_SETTLE_S": str(SETTLE_S), "MESH_ROUTER_DRAIN_GRACE_S": "60",
        "MESH_ROUTER_DEFAULT_DEADLINE_S": "90", "MESH_RUNTIME_DOWNLOAD_TIMEOUT_S": "90",
        # the slow artifact server is on loopback, which storage URIs may not name by default
        "MESH_ROUTER_ALLOWED_NETWORKS": "127.0.0.1/32", "MESH_RUNTIME_ALLOWED_NETWORKS": "127.0.0.1/32",
    })
    try:
        yield mesh
    finally:
        mesh.stop()


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(what)
        time.sleep(0.05)
    return time.monotonic() - start


def test_sigterm_not_serving_then_settle_then_in_flight_finish_then_exit_0(
    drain_mesh, model_files: dict[str, pathlib.Path]
) -> None:
    mesh = drain_mesh
    router = mesh.procs["router"]
    mesh.register("hot", model_files["linear-1"])
    client = triton.InferenceServerClient(mesh.router_address)
    np.testing.assert_allclose(_infer(client, "hot"), _golden(model_files["linear-1"]), rtol=1e-6)
    assert _health(mesh.router_address) == health_pb2.HealthCheckResponse.SERVING

    with SlowArtifact(model_files["linear-2"], DOWNLOAD_S) as artifact:
        mesh.register("slow", artifact.url)
        slow: dict[str, object] = {}

        def cold_request() -> None:
            own = triton.InferenceServerClient(mesh.router_address)
            try:
                slow["out"] = _infer(own, "slow", timeout=90)
            except InferenceServerException as exc:
                slow["error"] = f"{exc.status()}: {exc.message()}"
            finally:
                own.close()

        in_flight = threading.Thread(target=cold_request, daemon=True)
        in_flight.start()
        assert artifact.started.wait(30), "the cold load never started downloading"

        t0 = time.monotonic()
        os.kill(router.pid, signal.SIGTERM)
        not_serving_s = _wait(
            lambda: _health(mesh.router_address) == health_pb2.HealthCheckResponse.NOT_SERVING,
            10, "health never turned NOT_SERVING")
        # Accepted and served during the settle period, on the client's existing connection.
        np.testing.assert_allclose(_infer(client, "hot"), _golden(model_files["linear-1"]), rtol=1e-6)
        served_during_settle_s = time.monotonic() - t0

        refused: list[str] = []

        def refuses_new_rpcs() -> bool:
            try:
                _infer(client, "hot", timeout=5)
            except InferenceServerException as exc:
                refused.append(exc.status())
                return True
            return False

        _wait(refuses_new_rpcs, SETTLE_S + 30, "the router never stopped accepting")
        refused_s = time.monotonic() - t0
        assert refused == ["StatusCode.UNAVAILABLE"], refused  # a client retries that elsewhere
        assert in_flight.is_alive(), "the cold request ended before the router stopped accepting"
        assert router.poll() is None, "the router exited with a request in flight"

        in_flight.join(90)
        assert "error" not in slow, slow
        np.testing.assert_allclose(slow["out"], _golden(model_files["linear-2"]), rtol=1e-6)
        rc = router.wait(30)
        exit_s = time.monotonic() - t0
    client.close()
    assert rc == 0
    log = mesh.log("router").read_text(errors="replace")
    assert "router drained in" in log
    assert "shutdown:" not in log, "a shutdown step failed or timed out"
    print(f"\nrouter drain: NOT_SERVING after {not_serving_s:.2f}s, a request served "
          f"{served_during_settle_s:.2f}s after SIGTERM, new RPCs refused after ~{refused_s:.2f}s "
          f"(settle {SETTLE_S}s), in-flight cold request answered correctly, exit 0 after {exit_s:.2f}s")


def test_second_sigterm_stops_at_once(etcd_endpoint: str, tmp_path: pathlib.Path) -> None:
    """With a settle period far longer than the test waits, only the second signal can end it."""
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="64MiB",
                      env={"MESH_ROUTER_DRAIN_SETTLE_S": "300"})
    try:
        router = mesh.procs["router"]
        os.kill(router.pid, signal.SIGTERM)
        _wait(lambda: _health(mesh.router_address) == health_pb2.HealthCheckResponse.NOT_SERVING,
              10, "health never turned NOT_SERVING")
        assert router.poll() is None  # still settling
        t0 = time.monotonic()
        os.kill(router.pid, signal.SIGTERM)
        assert router.wait(30) == 0
        print(f"\nsecond SIGTERM: router exited 0 after {time.monotonic() - t0:.2f}s")
        assert "second signal: stopping at once" in mesh.log("router").read_text(errors="replace")
    finally:
        mesh.stop()
