"""TLS and mTLS end to end, with certificates the test makes (tests/pki.py), on real processes.

One mesh with internal mutual TLS on (MESH_INTERNAL_TLS_*: router, placement and the pod each
with its own certificate from one internal CA) and two routers: "router" serves TLS on its
public port (no client certificates), "router-1" requires client certificates (mutual TLS).
A cold request therefore goes client -TLS-> router -mTLS-> placement -mTLS-> pod (direct Load)
and router -mTLS-> pod (ModelInfer).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from mesh.cli import procs
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from tests.pki import CA, Leaf

pytestmark = pytest.mark.integration

CLIENT_CN = "tls-client"


class PKI:
    def __init__(self, d: pathlib.Path) -> None:
        self.internal = CA.create(d / "internal", "internal-ca")
        self.public = CA.create(d / "public", "public-ca")
        self.clients = CA.create(d / "clients", "clients-ca")
        self.other = CA.create(d / "other", "other-ca")  # trusted by nobody
        self.leaf = {name: self.internal.issue(name) for name in ("router", "router-1", "placement", "pod-0")}
        self.router_public = self.public.issue("router-public")
        self.client = self.clients.issue(CLIENT_CN, usage="clientAuth")
        self.stranger = self.other.issue(CLIENT_CN, usage="clientAuth")  # same name, wrong CA


def _internal_env(leaf: Leaf) -> dict[str, str]:
    return {"MESH_INTERNAL_TLS_CERT": str(leaf.cert), "MESH_INTERNAL_TLS_KEY": str(leaf.key)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, pki: PKI,
             model_files: dict[str, pathlib.Path]) -> Iterator[LocalMesh]:
    models = str(model_files["linear-0"].parent)
    public = {"MESH_ROUTER_TLS_CERT": str(pki.router_public.cert), "MESH_ROUTER_TLS_KEY": str(pki.router_public.key),
              # Authentication: the test's client certificate has the admin scope on router-1;
              # callers without a token or certificate come in as the default tenant.
              "MESH_ROUTER_CERT_ADMINS": CLIENT_CN}
    root = f"/tls-{uuid.uuid4().hex[:10]}"
    mesh = LocalMesh(
        state_dir=tmp_path_factory.mktemp("tls-mesh"), etcd=etcd_endpoint, root=root, lease_ttl_s=3,
        pods=1, routers=2, capacity="256MiB", allow_anonymous=True,
        env={"MESH_INTERNAL_TLS_CA": str(pki.internal.cert),
             "MESH_ROUTER_FILE_ROOTS": models, "MESH_RUNTIME_FILE_ROOTS": models},
        process_env={
            "router": {**_internal_env(pki.leaf["router"]), **public},
            "router-1": {**_internal_env(pki.leaf["router-1"]), **public,
                         "MESH_ROUTER_TLS_CLIENT_CA": str(pki.clients.cert), "MESH_ROUTER_TLS_CLIENT_AUTH": "require"},
            "placement": _internal_env(pki.leaf["placement"]),
            "pod-0": {**_internal_env(pki.leaf["pod-0"]), "MESH_RUNTIME_HEALTH_PORT": str(procs.free_port())},
        },
        # The mesh's own readiness calls present the client certificate (router ignores it).
        router_credentials=grpc.ssl_channel_credentials(
            pki.public.cert.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()),
    )
    mesh.start(timeout=90)
    try:
        yield mesh
    finally:
        mesh.stop()


def _register(mesh: LocalMesh, address: str, model_id: str, path: pathlib.Path) -> None:
    """Registers through the router at `address` (the caller the model then belongs to)."""
    with mesh.router_channel(address) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(registry_pb2.RegisterModelRequest(
            spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri())), timeout=30)


def _infer(client: triton.InferenceServerClient, model_id: str, x: np.ndarray) -> np.ndarray:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model_id, [inp], client_timeout=60).as_numpy("output")


def _expected(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _refused(client: triton.InferenceServerClient) -> None:
    try:
        with pytest.raises(InferenceServerException) as info:
            client.is_server_live(client_timeout=5)
        assert info.value.status() == "StatusCode.UNAVAILABLE", info.value
    finally:
        client.close()


def test_tls_client_gets_a_cold_model_loaded_and_served_over_internal_mtls(tls_mesh, pki, model_files) -> None:
    """tritonclient ssl=True + the public CA -> router; the miss goes router -> placement ->
    pod (direct Load) and router -> pod (ModelInfer), all over mutual TLS."""
    address = tls_mesh.router_addresses[0]
    _register(tls_mesh, address, "tls-linear", model_files["linear-0"])
    client = triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert))
    try:
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        out = _infer(client, "tls-linear", x)
        np.testing.assert_allclose(out, _expected(model_files["linear-0"], x), rtol=1e-5, atol=1e-6)
        assert client.is_model_ready("tls-linear")
    finally:
        client.close()
    status = tls_mesh.get_model("tls-linear")
    assert [c.address for c in status.copies if c.state == types_pb2.LOADED] == \
        [f"127.0.0.1:{tls_mesh.ports['pod-0']}"]
    # placement -> pod: the direct Load was answered (a refused handshake counts no_answer,
    # and the copy would then have come through etcd alone).
    samples = tls_mesh.scrape("placement")
    assert samples.get('mesh_direct_loads_total{outcome="no_answer"}', 0) == 0
    assert "direct Load on" not in tls_mesh.log("placement").read_text()
    log = tls_mesh.log("router").read_text()
    assert f"(port {tls_mesh.ports['router']}, TLS; to pods and placement: mutual TLS)" in log


def test_router_refuses_plaintext_and_clients_that_do_not_trust_it(tls_mesh, pki) -> None:
    address = tls_mesh.router_addresses[0]
    _refused(triton.InferenceServerClient(address))
    _refused(triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.other.cert)))


def test_mtls_router_serves_a_client_certificate_and_refuses_none_or_a_wrong_ca(tls_mesh, pki, model_files) -> None:
    address = tls_mesh.router_addresses[1]
    _register(tls_mesh, address, "mtls-linear", model_files["linear-1"])
    client = triton.InferenceServerClient(
        address, ssl=True, root_certificates=str(pki.public.cert),
        private_key=str(pki.client.key), certificate_chain=str(pki.client.cert))
    try:
        x = np.ones((2, 4), dtype=np.float32)
        np.testing.assert_allclose(_infer(client, "mtls-linear", x), _expected(model_files["linear-1"], x),
                                   rtol=1e-5, atol=1e-6)
    finally:
        client.close()
    _refused(triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert)))
    _refused(triton.InferenceServerClient(
        address, ssl=True, root_certificates=str(pki.public.cert),
        private_key=str(pki.stranger.key), certificate_chain=str(pki.stranger.cert)))
    _refused(triton.InferenceServerClient(address))


@pytest.mark.parametrize("target", ["pod-0", "placement"])
def test_internal_servers_refuse_plaintext_and_foreign_certificates(tls_mesh, pki, target) -> None:
    """Nothing reaches a pod's or placement's port without a certificate of the internal CA;
    one with such a certificate does (the positive control)."""
    address = f"127.0.0.1:{tls_mesh.ports[target]}"
    ca = pki.internal.cert.read_bytes()

    def check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
        with channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    for channel in (grpc.insecure_channel(address),
                    grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)),
                    grpc.secure_channel(address, grpc.ssl_channel_credentials(
                        ca, pki.stranger.key.read_bytes(), pki.stranger.cert.read_bytes()))):
        with pytest.raises(grpc.RpcError) as info:
            check(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    router = pki.leaf["router"]
    ok = check(grpc.secure_channel(address, grpc.ssl_channel_credentials(
        ca, router.key.read_bytes(), router.cert.read_bytes())))
    assert ok.status == health_pb2.HealthCheckResponse.SERVING


def test_pod_health_port_answers_plaintext_probes(tls_mesh) -> None:
    """Kubernetes grpc probes cannot speak TLS: MESH_RUNTIME_HEALTH_PORT serves health alone."""
    port = tls_mesh.process_env["pod-0"]["MESH_RUNTIME_HEALTH_PORT"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MESH_TOKEN": ""})


def test_cli_speaks_tls_and_presents_a_client_certificate(tls_mesh, pki) -> None:
    tls_router, mtls_router = tls_mesh.router_addresses
    ok = _cli("list", "--router", tls_router, "--tls-ca", str(pki.public.cert))
    assert ok.returncode == 0, ok.stderr
    plain = _cli("list", "--router", tls_router, "--timeout", "5")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    ok = _cli("list", "--router", mtls_router, "--tls-ca", str(pki.public.cert),
              "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    assert ok.returncode == 0, ok.stderr
    refused = _cli("list", "--router", mtls_router, "--tls-ca", str(pki.public.cert), "--timeout", "5")
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
