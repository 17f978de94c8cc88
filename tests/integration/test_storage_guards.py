"""Storage that cannot be aimed at the host (issue 10), end to end with a real router,
placement and runtime pod: every case is refused before any byte is read (local HTTP servers
count requests: 0 hits), a symlink or hard link swapped in after registration is refused by the
pod, no credential is stored or echoed, and the pod's cache is private and keeps no failed
artifact."""

from __future__ import annotations

import http.server
import os
import pathlib
import stat
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import demo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from .conftest import start_mesh

pytestmark = pytest.mark.integration

TOKEN = "tok-7f3a9c-never-echoed"


class Counting:
    """HTTP on `host`: /m/<name> serves models[name] (/private/... only with the bearer TOKEN),
    /to?u=URL redirects; every request is counted."""

    def __init__(self, host: str) -> None:
        self.hits = 0
        self.models: dict[str, bytes] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.hits += 1
                if self.path.startswith("/to?u="):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/to?u="))
                    self.end_headers()
                    return
                name, models = self.path.rsplit("/", 1)[-1], outer.models
                authorized = self.headers.get("authorization") == f"Bearer {TOKEN}"
                if name not in models or (self.path.startswith("/private/") and not authorized):
                    self.send_response(404 if name not in models else 403)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(models[name])))
                self.end_headers()
                self.wfile.write(models[name])

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("guards")
    out = {"root": base / "models", "outside": base / "outside", "creds": base / "creds"}
    for folder in out.values():
        folder.mkdir()
    (out["creds"] / "_default").mkdir()  # the default tenant's (the anonymous client's) Secrets
    (out["creds"] / "_default" / "store").write_text(TOKEN)
    return out


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Counting, Counting]]:
    forbidden = Counting("127.0.0.1")  # loopback: never allowed; must see 0 requests
    allowed = Counting("127.0.0.2")  # allow-listed (MESH_*_ALLOWED_NETWORKS)
    try:
        yield forbidden, allowed
    finally:
        forbidden.close()
        allowed.close()


@pytest.fixture(scope="module")
def guarded(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
            folders: dict[str, pathlib.Path]) -> Iterator[LocalMesh]:
    env = {"MESH_ROUTER_ALLOWED_NETWORKS": "127.0.0.2/32", "MESH_RUNTIME_ALLOWED_NETWORKS": "127.0.0.2/32",
           "MESH_RUNTIME_CREDENTIALS_DIR": str(folders["creds"])}
    m = start_mesh(tmp_path_factory.mktemp("mesh"), etcd_endpoint, pods=1, capacity="256MiB", env=env,
                   file_roots=(str(folders["root"]),))
    try:
        yield m
    finally:
        m.stop()


def register(mesh: LocalMesh, model_id: str, uri: str, **spec: object) -> types_pb2.ModelStatus:
    with grpc.insecure_channel(mesh.router_address) as channel:
        return registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
            registry_pb2.RegisterModelRequest(spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=uri, **spec)),
            timeout=15, metadata=mesh.auth_metadata)


def refused(mesh: LocalMesh, uri: str, **spec: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        register(mesh, "refused", uri, **spec)
    assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), uri
    return err.value


def infer(mesh: LocalMesh, model_id: str) -> np.ndarray:
    client = triton.InferenceServerClient(mesh.router_address)
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return client.infer(model_id, [inp], client_timeout=60).as_numpy("output")


def cache_dir(mesh: LocalMesh) -> pathlib.Path:
    return mesh.state_dir / "cache" / "pod-0"


def cached_bytes(mesh: LocalMesh) -> list[bytes]:
    return [p.read_bytes() for p in (cache_dir(mesh) / "objects").glob("*/model.onnx")]


def test_every_ssrf_form_refused_at_registration(guarded: LocalMesh, servers: tuple[Counting, Counting]) -> None:
    """Issue 10 regression: metadata, etcd's port, [::1], 2130706433 were accepted."""
    forbidden, _ = servers
    port = forbidden.port
    etcd_port = guarded.etcd.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]",
                 "[::1]", "0.0.0.0", "localhost", "10.0.0.1", "192.168.0.1"):
        err = refused(guarded, f"http://{host}:{port}/m/model.onnx")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "refused" in (err.details() or "")
    for uri in ("http://169.254.169.254/latest/meta-data/", f"http://127.0.0.1:{etcd_port}/v3/kv/range",
                "http://[fd00:ec2::254]/latest/"):
        assert refused(guarded, uri).code() == grpc.StatusCode.PERMISSION_DENIED
    assert forbidden.hits == 0


@pytest.mark.parametrize("path", ["/etc/shadow", "/proc/self/environ", "/dev/zero"])
def test_system_files_refused(guarded: LocalMesh, path: str, folders: dict[str, pathlib.Path]) -> None:
    """Issue 10 regression: file:///etc/shadow was accepted and copied into the cache."""
    err = refused(guarded, f"file://{path}")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert str(folders["root"]) not in (err.details() or "")  # the roots are not disclosed


def test_credentials_never_stored_or_echoed(guarded: LocalMesh) -> None:
    for uri in ("https://user:hunter2@models.example.com/m.onnx",
                "https://b.s3.amazonaws.com/m.onnx?X-Amz-Signature=deadbeef42&X-Amz-Credential=AKIA42",
                "https://h.example.com/m.onnx?token=deadbeef42"):
        err = refused(guarded, uri)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "credentials_ref" in (err.details() or "")
        for secret in ("hunter2", "deadbeef42", "AKIA42"):
            assert secret not in (err.details() or "")
    with grpc.insecure_channel(guarded.router_address) as channel:
        listed = registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
            registry_pb2.ListModelsRequest(), timeout=10, metadata=guarded.auth_metadata)
    assert "refused" not in [m.spec.model_id for m in listed.models]


def test_credentials_ref_fetch_works_and_the_token_is_never_shown(
        guarded: LocalMesh, servers: tuple[Counting, Counting], folders: dict[str, pathlib.Path]) -> None:
    _, allowed = servers
    path = demo.save(demo.linear_model(4), folders["outside"] / "private.onnx")
    allowed.models["private.onnx"] = path.read_bytes()
    status = register(guarded, "private", f"{allowed.url}/private/private.onnx", credentials_ref="store")
    assert status.spec.credentials_ref == "store"
    np.testing.assert_allclose(infer(guarded, "private"), _golden(path), rtol=1e-6)
    shown = str(guarded.get_model("private"))
    logs = "".join(p.read_text(errors="replace") for p in (guarded.state_dir / "logs").glob("*.log"))
    assert TOKEN not in shown and TOKEN not in logs


def test_redirect_to_a_refused_address_is_never_followed(guarded: LocalMesh,
                                                         servers: tuple[Counting, Counting]) -> None:
    forbidden, allowed = servers
    register(guarded, "hop", f"{allowed.url}/to?u={forbidden.url}/m/model.onnx")
    before = allowed.hits
    with pytest.raises(InferenceServerException):
        infer(guarded, "hop")
    status = guarded.get_model("hop")
    assert "refused" in status.last_error and allowed.hits > before
    assert forbidden.hits == 0


@pytest.mark.parametrize("swap", ["symlink", "hardlink", "folder"])
def test_swap_after_registration_refused_by_the_pod(guarded: LocalMesh, folders: dict[str, pathlib.Path],
                                                    swap: str) -> None:
    """Issue 10 regression: replacing a registered file by a symlink got the target copied,
    because the pod never checked the roots. The swapped-in target is a valid model outside the
    roots, so a missing check would load and serve it."""
    root, outside = folders["root"], folders["outside"]
    folder = root / f"swap-{swap}"
    folder.mkdir()
    registered = demo.save(demo.linear_model(1), folder / "m.onnx")
    target = demo.save(demo.linear_model(2), outside / f"target-{swap}.onnx")
    model_id = f"swap-{swap}"
    register(guarded, model_id, registered.as_uri())  # a plain file under the root: accepted
    if swap == "symlink":
        registered.unlink()
        registered.symlink_to(target)
    elif swap == "hardlink":
        registered.unlink()
        os.link(target, registered)
    else:
        os.rename(folder, root / f"moved-{swap}")
        (outside / f"dir-{swap}").mkdir()
        os.link(target, outside / f"dir-{swap}" / "m.onnx")
        folder.symlink_to(outside / f"dir-{swap}")
    with pytest.raises(InferenceServerException):
        infer(guarded, model_id)
    error = guarded.get_model(model_id).last_error
    assert ("symbolic link" if swap != "hardlink" else "hard links") in error
    assert target.read_bytes() not in cached_bytes(guarded)


def test_cache_private_and_failed_artifacts_deleted(guarded: LocalMesh, folders: dict[str, pathlib.Path]) -> None:
    good = demo.save(demo.linear_model(5), folders["root"] / "good.onnx")
    bad = folders["root"] / "corrupt.onnx"
    bad.write_bytes(b"this is not an onnx model" * 100)
    register(guarded, "good", good.as_uri())
    register(guarded, "corrupt", bad.as_uri())
    np.testing.assert_allclose(infer(guarded, "good"), _golden(good), rtol=1e-6)
    with pytest.raises(InferenceServerException):
        infer(guarded, "corrupt")
    assert guarded.get_model("corrupt").last_error
    cached = cached_bytes(guarded)
    assert good.read_bytes() in cached and bad.read_bytes() not in cached  # the failed one is gone
    root = cache_dir(guarded)
    for dirpath, _dirs, names in os.walk(root):
        assert stat.S_IMODE(pathlib.Path(dirpath).stat().st_mode) == 0o700, dirpath
        for name in names:
            mode = stat.S_IMODE((pathlib.Path(dirpath) / name).stat().st_mode)
            assert mode & 0o077 == 0, (dirpath, name, oct(mode))


def _golden(path: pathlib.Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": np.ones((1, 4), dtype=np.float32)})[0]
