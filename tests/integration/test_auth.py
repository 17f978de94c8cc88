"""Authentication on every public RPC of a real router process (tokens, scopes, rotation,
revocation, expiry, anonymous mode, client certificates), over real etcd, placement and a pod.

The RPC lists come from the service descriptors, so an RPC added later is covered (and must
be authenticated) without touching this file.
"""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.utils import InferenceServerException

from mesh import credentials, demo
from mesh.cli import procs
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, tokens_pb2, tokens_pb2_grpc, types_pb2
from tests.pki import CA

from .conftest import start_mesh

pytestmark = pytest.mark.integration

UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
ROOT = pathlib.Path(__file__).resolve().parents[2]
PUBLIC_PROTOS = ("mesh/pb/inference/grpc_predict_v2.proto", "mesh/pb/v1/registry.proto", "mesh/pb/v1/tokens.proto")


def _public_methods() -> list[tuple[str, bool]]:
    """(path, streaming) of every RPC the router's public port serves, from proto/ (through
    protoc: our `inference` module cannot be imported beside tritonclient's)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "public.pb"
        include = pathlib.Path(protoc.__file__).parent / "_proto"
        assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", "--include_imports",
                            f"--descriptor_set_out={out}", *PUBLIC_PROTOS]) == 0
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return [(f"/{f.package}.{s.name}/{m.name}", m.client_streaming or m.server_streaming)
            for f in files if f.name in PUBLIC_PROTOS for s in f.service for m in s.method]


METHODS = _public_methods()
ADMIN_ONLY = {"mesh.v1.TokenAdmin"}


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    folder = tmp_path_factory.mktemp("auth")
    m = start_mesh(folder, etcd_endpoint, pods=1, capacity="64MiB", allow_anonymous=False,
                   env={"MESH_ROUTER_FILE_ROOTS": str(folder), "MESH_RUNTIME_FILE_ROOTS": str(folder)})
    try:
        m.register("m", demo.save(demo.linear_model(3), folder / "m.onnx"))
        yield m
    finally:
        m.stop()


def call(address: str, method: str, streaming: bool, metadata: tuple = (),
         credentials_: grpc.ChannelCredentials | None = None) -> grpc.StatusCode:
    """Calls `method` with an empty request (raw bytes), returns the status code."""
    channel = (grpc.secure_channel(address, credentials_) if credentials_ else grpc.insecure_channel(address))
    with channel:
        try:
            if streaming:
                for _ in channel.stream_stream(method)(iter([b""]), metadata=metadata, timeout=10):
                    pass
            else:
                channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def admin(mesh: LocalMesh) -> tokens_pb2_grpc.TokenAdminStub:
    return tokens_pb2_grpc.TokenAdminStub(grpc.insecure_channel(mesh.router_address))


def create(mesh: LocalMesh, **request: object) -> str:
    resp = admin(mesh).CreateToken(tokens_pb2.CreateTokenRequest(**request), metadata=mesh.auth_metadata,  # type: ignore[arg-type]
                                   timeout=10)
    return resp.token


def revoke(mesh: LocalMesh, which: str) -> list[str]:
    resp = admin(mesh).RevokeToken(tokens_pb2.RevokeTokenRequest(token=which), metadata=mesh.auth_metadata,
                                   timeout=10)
    return [t.name for t in resp.revoked]


def infer(address: str, token: str = "", model: str = "m") -> np.ndarray:
    client = triton.InferenceServerClient(address)
    try:
        x = triton.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        headers = {"authorization": f"Bearer {token}"} if token else None
        return client.infer(model, [x], headers=headers, client_timeout=60).as_numpy("output")
    finally:
        client.close()


def infer_code(address: str, token: str = "") -> str:
    try:
        infer(address, token)
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


def test_every_public_rpc_refuses_missing_wrong_revoked_and_expired_tokens(mesh: LocalMesh) -> None:
    assert len(METHODS) >= 14, METHODS  # 7 V2 + 4 registry + 3 token methods at least
    revoked = create(mesh, name="to-revoke")
    assert revoke(mesh, "to-revoke") == ["to-revoke"]
    expired = create(mesh, name="short-lived", ttl_s=1)
    time.sleep(1.1)  # the expiry is the router's clock passing expires_unix_ms, not a timing threshold
    cases = {"no token": (), "wrong token": credentials.metadata(credentials.new_token()),
             "revoked token": credentials.metadata(revoked), "expired token": credentials.metadata(expired),
             "not a bearer token": (("authorization", f"Basic {revoked}"),)}
    got = {(case, method): call(mesh.router_address, method, streaming, md)
           for case, md in cases.items() for method, streaming in METHODS}
    wrong = {k: v for k, v in got.items() if v != UNAUTH}
    assert not wrong, wrong


def test_tenant_token_is_refused_admin_operations_and_admitted_to_the_rest(mesh: LocalMesh) -> None:
    tenant = credentials.metadata(create(mesh, name="tenant-scope"))
    for method, streaming in METHODS:
        code = call(mesh.router_address, method, streaming, tenant)
        if method.split("/")[1] in ADMIN_ONLY:
            assert code == DENIED, (method, code)
        else:  # authenticated: what the empty request gets (OK, NOT_FOUND, INVALID_ARGUMENT, or
            # PERMISSION_DENIED from a handler's own admin check, e.g. another tenant's quota)
            assert code != UNAUTH, (method, code)
        admin_code = call(mesh.router_address, method, streaming, mesh.auth_metadata)
        assert admin_code not in (UNAUTH, DENIED), (method, admin_code)


def test_tritonclient_with_headers_and_without(mesh: LocalMesh) -> None:
    assert infer_code(mesh.router_address) == "StatusCode.UNAUTHENTICATED"
    assert infer_code(mesh.router_address, credentials.new_token()) == "StatusCode.UNAUTHENTICATED"
    out = infer(mesh.router_address, mesh.token)
    assert out.shape == (1, 3)
    # The error tells a user how to pass a token.
    with pytest.raises(InferenceServerException, match="authorization: Bearer <token>"):
        infer(mesh.router_address)


def test_rotation_two_valid_tokens_then_revoke_one(mesh: LocalMesh) -> None:
    old = create(mesh, name="rot-old")
    new = create(mesh, name="rot-new", ttl_s=3600)
    np.testing.assert_allclose(infer(mesh.router_address, old), infer(mesh.router_address, new))
    assert revoke(mesh, "rot-old") == ["rot-old"]
    assert infer_code(mesh.router_address, old) == "StatusCode.UNAUTHENTICATED"
    assert infer(mesh.router_address, new).shape == (1, 3)


def test_listing_never_shows_secrets_and_revoke_by_id_or_token(mesh: LocalMesh) -> None:
    a, b = create(mesh, name="list-a", tenant="team-x"), create(mesh, name="list-b", tenant="team-x")
    resp = admin(mesh).ListTokens(tokens_pb2.ListTokensRequest(tenant="team-x"), metadata=mesh.auth_metadata)
    assert sorted(t.name for t in resp.tokens) == ["list-a", "list-b"]
    everything = admin(mesh).ListTokens(tokens_pb2.ListTokensRequest(), metadata=mesh.auth_metadata)
    raw = everything.SerializeToString()
    assert a.encode() not in raw and b.encode() not in raw and mesh.token.encode() not in raw
    assert any(t.configured and t.name == "bootstrap-admin" for t in everything.tokens)
    by_id = next(t.id for t in resp.tokens if t.name == "list-a")
    assert revoke(mesh, by_id[:8]) == ["list-a"]
    assert revoke(mesh, b) == ["list-b"]  # the token itself
    with pytest.raises(grpc.RpcError) as exc:
        revoke(mesh, "list-a")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        revoke(mesh, "bootstrap-admin")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "settings" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        create(mesh, name="bad", scope="root")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_infer_scope_calls_and_reads_but_never_changes_the_registry(mesh: LocalMesh) -> None:
    """RELIABILITY.md S1: a token handed to inference clients cannot register or unregister."""
    token = create(mesh, name="infer-only", scope="infer")
    md = credentials.metadata(token)
    assert infer(mesh.router_address, token).shape == (1, 3)
    registry = registry_pb2_grpc.ModelRegistryStub(grpc.insecure_channel(mesh.router_address))
    assert registry.GetModel(registry_pb2.GetModelRequest(model_id="m"), metadata=md, timeout=10).spec.model_id == "m"
    for write in (lambda: registry.RegisterModel(registry_pb2.RegisterModelRequest(
                      spec=types_pb2.ModelSpec(model_id="sneaky", storage_uri="file:///x.onnx")), metadata=md, timeout=10),
                  lambda: registry.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="m"),
                                                   metadata=md, timeout=10)):
        with pytest.raises(grpc.RpcError) as exc:
            write()
        assert exc.value.code() == DENIED and "infer scope" in exc.value.details()
    assert registry.GetModel(registry_pb2.GetModelRequest(model_id="m"), metadata=md, timeout=10).spec.model_id == "m"


def test_admin_token_created_through_the_api_works(mesh: LocalMesh) -> None:
    ops = credentials.metadata(create(mesh, name="ops", scope="admin"))
    stub = admin(mesh)
    assert stub.ListTokens(tokens_pb2.ListTokensRequest(), metadata=ops).tokens


@contextlib.contextmanager
def extra_router(mesh: LocalMesh, name: str, env: dict[str, str]) -> Iterator[str]:
    """One more router process of the same mesh with its own settings; yields its address."""
    port = procs.free_port()
    proc = procs.start_mesh_process(["router"], {
        **mesh.common_env(), "MESH_ROUTER_LISTEN": f"127.0.0.1:{port}",
        "MESH_ROUTER_ADMIN_TOKEN_SHA256": credentials.digest(mesh.token), **env}, mesh.log(name))
    try:
        procs.wait_port("127.0.0.1", port, 30, proc)
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop(proc)


def _until_ok(fn, within: float = 30.0):  # type: ignore[no-untyped-def]
    """The new router answers once its view has loaded (UNAVAILABLE before)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return fn()
        except (grpc.RpcError, InferenceServerException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _until_answered(fn, within: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Until `fn()` (a status code) is OK: a new router is UNAVAILABLE until its view loads."""
    deadline = time.monotonic() + within
    while (code := fn()) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, code
        time.sleep(0.2)


def test_anonymous_mode_admits_no_credentials_as_the_default_tenant(mesh: LocalMesh) -> None:
    with extra_router(mesh, "router-anonymous", {"MESH_ROUTER_ALLOW_ANONYMOUS": "true"}) as address:
        assert _until_ok(lambda: infer(address)).shape == (1, 3)
        # A bad token is still refused; a good one still works.
        assert infer_code(address, credentials.new_token()) == "StatusCode.UNAUTHENTICATED"
        assert infer(address, mesh.token).shape == (1, 3)
        # Anonymous callers have tenant scope, not admin.
        assert call(address, "/mesh.v1.TokenAdmin/ListTokens", False) == DENIED
    log = mesh.log("router-anonymous").read_text()
    assert "WARNING" in log and "AUTHENTICATION IS OPTIONAL" in log, log[-2000:]


def test_client_certificates_name_the_tenant_and_admins(mesh: LocalMesh, tmp_path: pathlib.Path) -> None:
    ca = CA.create(tmp_path / "pki")
    server = ca.issue("router")
    alice = ca.issue("alice", sans="URI:meshserve://tenant/team-a,DNS:alice.example", usage="clientAuth")
    default = ca.issue("default-tenant-client", sans="URI:meshserve://tenant/", usage="clientAuth")
    ops = ca.issue("ops", sans="DNS:ops.example", usage="clientAuth")
    stranger = CA.create(tmp_path / "other", "other-ca").issue("mallory", usage="clientAuth")
    env = {"MESH_ROUTER_TLS_CERT": str(server.cert), "MESH_ROUTER_TLS_KEY": str(server.key),
           "MESH_ROUTER_TLS_CLIENT_CA": str(ca.cert), "MESH_ROUTER_TLS_CLIENT_AUTH": "require",
           "MESH_ROUTER_CERT_ADMINS": "ops"}

    def creds(leaf) -> grpc.ChannelCredentials:  # type: ignore[no-untyped-def]
        return grpc.ssl_channel_credentials(ca.cert.read_bytes(), leaf.key.read_bytes(), leaf.cert.read_bytes())

    with extra_router(mesh, "router-mtls", env) as address:
        list_tokens = "/mesh.v1.TokenAdmin/ListTokens"
        _until_answered(lambda: call(address, "/mesh.v1.ModelRegistry/ListModels", False, credentials_=creds(ops)))
        # Certificates with no token: tenant scope for alice, admin for ops (MESH_ROUTER_CERT_ADMINS).
        assert call(address, list_tokens, False, credentials_=creds(alice)) == DENIED
        assert call(address, list_tokens, False, credentials_=creds(ops)) == grpc.StatusCode.OK
        for method, streaming in METHODS:
            if method.split("/")[1] not in ADMIN_ONLY:
                code = call(address, method, streaming, credentials_=creds(alice))
                assert code != UNAUTH, (method, code)
        # A token sent with a certificate is what counts, a bad one is refused.
        bad = credentials.metadata(credentials.new_token())
        assert call(address, list_tokens, False, bad, creds(ops)) == UNAUTH
        # tritonclient over mTLS, the default tenant's certificate, no token.
        client = triton.InferenceServerClient(address, ssl=True, root_certificates=str(ca.cert),
                                              private_key=str(default.key), certificate_chain=str(default.cert))
        try:
            x = triton.InferInput("input", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            assert client.infer("m", [x], client_timeout=60).as_numpy("output").shape == (1, 3)
        finally:
            client.close()
        # No certificate, or one another CA signed: refused in the TLS handshake.
        no_cert = grpc.ssl_channel_credentials(ca.cert.read_bytes())
        assert call(address, list_tokens, False, mesh.auth_metadata, no_cert) == grpc.StatusCode.UNAVAILABLE
        assert call(address, list_tokens, False, mesh.auth_metadata,
                    grpc.ssl_channel_credentials(ca.cert.read_bytes(), stranger.key.read_bytes(),
                                                 stranger.cert.read_bytes())) == grpc.StatusCode.UNAVAILABLE


def test_token_file_written_by_local_mesh_is_private(mesh: LocalMesh) -> None:
    assert mesh.token_file.read_text().strip() == mesh.token
    assert mesh.token_file.stat().st_mode & 0o777 == 0o600
