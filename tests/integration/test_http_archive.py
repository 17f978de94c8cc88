"""A multi-file model over http(s) (issue 12 item 2): model.onnx with its external data packed
in a .tar.gz or .zip, as KServe's storage initializer takes it, pulled by a real mesh (etcd, a
router, placement, one pod) from a local HTTP server, verified by its tree digest and served;
a bad archive fails the load with a reason the user can act on."""

from __future__ import annotations

import http.server
import io
import pathlib
import tarfile
import threading
import zipfile
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from mesh.cli.local import LocalMesh
from puller.cachefiles import tree_sha256
from tests.integration.conftest import start_mesh
from tests.integration.puller.test_s3_storage import save_external

pytestmark = pytest.mark.integration

HOST = "127.0.0.2"  # allow-listed below: the pods refuse loopback addresses otherwise


def _tgz(folder: pathlib.Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)  # `tar czf m.tgz m/`: one folder holding the model
    return out.getvalue()


def _zip(folder: pathlib.Path, link: bool = False) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.iterdir()):
            z.write(path, path.name)
        if link:
            info = zipfile.ZipInfo("secret.bin")
            info.external_attr = 0o120777 << 16  # a symlink
            z.writestr(info, "/etc/passwd")
    return out.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, pathlib.Path]]:
    folder = save_external(tmp_path_factory.mktemp("archive") / "model", seed=11)
    bodies = {"/m.tar.gz": _tgz(folder), "/m.zip": _zip(folder), "/bad.zip": _zip(folder, link=True)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = bodies.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    env = {"MESH_ROUTER_ALLOWED_NETWORKS": f"{HOST}/32", "MESH_RUNTIME_ALLOWED_NETWORKS": f"{HOST}/32"}
    m = start_mesh(tmp_path_factory.mktemp("archmesh"), etcd_endpoint, pods=1, capacity="256MiB", env=env)
    try:
        yield m
    finally:
        m.stop()


def _infer(mesh: LocalMesh, model_id: str) -> np.ndarray:
    client = triton.InferenceServerClient(mesh.router_address)
    try:
        inp = triton.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))
        return client.infer(model_id, [inp], client_timeout=60).as_numpy("output")  # type: ignore[no-any-return]
    finally:
        client.close()


@pytest.mark.parametrize("name", ["m.tar.gz", "m.zip"])
def test_an_archive_over_http_is_a_model_folder(mesh: LocalMesh, served, name: str) -> None:
    base, folder = served
    model_id = "arch-" + name.replace(".", "-")
    mesh.register(model_id, f"{base}/{name}", sha256=tree_sha256(folder))  # the folder's digest, as for s3://
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": np.arange(8, dtype=np.float32).reshape(2, 4)})[0]
    np.testing.assert_allclose(_infer(mesh, model_id), want, rtol=1e-5)


def test_an_archive_with_a_link_fails_the_load_with_its_reason(mesh: LocalMesh, served) -> None:
    base, _ = served
    mesh.register("arch-bad", f"{base}/bad.zip")
    with pytest.raises(triton.InferenceServerException) as err:
        _infer(mesh, "arch-bad")
    text = str(err.value)
    assert "holds a link or special file ('secret.bin')" in text, text
    assert "/cache" not in text and "objects/" not in text


def test_a_wrong_digest_is_refused(mesh: LocalMesh, served) -> None:
    base, _ = served
    mesh.register("arch-digest", f"{base}/m.zip?v=2", sha256="0" * 64)
    with pytest.raises(triton.InferenceServerException) as err:
        _infer(mesh, "arch-digest")
    assert "expected " + "0" * 64 in str(err.value)
