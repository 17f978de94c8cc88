"""s3:// models and model repositories end to end: moto's S3 server, real etcd, a LocalMesh
(router, placement, runtime pods as processes), tritonclient through the router, and the mesh
CLI as a user runs it (`mesh register --repository`, `mesh up --repository --repository-poll`).

The repository commands run in child processes: config.pbtxt is parsed into our generated
inference.ModelConfig, which shares its protobuf names with tritonclient's (docs/ARCHITECTURE.md,
"Why two `inference` descriptor pools never meet")."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from mesh import demo
from mesh.cli import procs
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from tests.integration.conftest import start_mesh
from tests.integration.puller.test_s3_storage import save_external
from tests.integration.s3server import S3Server, s3_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration
BUCKET = "meshrepo"
REPO_MODELS = 20


def write_repository(root: pathlib.Path, count: int) -> pathlib.Path:
    for i in range(count):
        demo.save(demo.linear_model(100 + i), root / f"m{i:02d}" / "1" / "model.onnx")
        (root / f"m{i:02d}" / "config.pbtxt").write_text(
            f'name: "m{i:02d}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            'dynamic_batching { max_queue_delay_microseconds: 200 }\n'
            'input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    return root


@pytest.fixture(scope="module")
def store(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Server:  # noqa: F811
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    src = tmp_path_factory.mktemp("s3models")
    s3.upload_file(str(demo.save(demo.linear_model(7), src / "single.onnx")), BUCKET, "ok/single/model.onnx")
    s3_server.upload_folder(BUCKET, "ok/external/", save_external(src / "external", seed=8))
    s3.upload_file(str(src / "single.onnx"), BUCKET, "other/model.onnx")
    s3_server.upload_folder(BUCKET, "ok/repo/", write_repository(src / "repo", REPO_MODELS))
    return s3_server


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, store: S3Server) -> Iterator[LocalMesh]:
    env = {**store.env(),
           "MESH_ROUTER_TENANT_STORAGE_PREFIXES": f'{{"": ["s3://{BUCKET}/ok"]}}',
           "MESH_RUNTIME_TENANT_STORAGE_PREFIXES": f'{{"": ["s3://{BUCKET}/ok"]}}'}
    m = start_mesh(tmp_path_factory.mktemp("s3mesh"), etcd_endpoint, pods=2, capacity="256MiB", env=env)
    try:
        yield m
    finally:
        m.stop()


def infer(mesh: LocalMesh, model_id: str) -> np.ndarray:
    client = triton.InferenceServerClient(mesh.router_address)
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = triton.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model_id, [inp], client_timeout=60).as_numpy("output")  # type: ignore[no-any-return]
    finally:
        client.close()


def expected(model: object, tmp: pathlib.Path) -> np.ndarray:
    path = demo.save(model, tmp / "expected.onnx")  # type: ignore[arg-type]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # type: ignore[no-any-return]


def test_s3_single_object_and_folder_with_external_data(mesh: LocalMesh, tmp_path: pathlib.Path) -> None:
    mesh.register("s3-single", f"s3://{BUCKET}/ok/single/model.onnx")
    np.testing.assert_allclose(infer(mesh, "s3-single"), expected(demo.linear_model(7), tmp_path), rtol=1e-5)
    mesh.register("s3-external", f"s3://{BUCKET}/ok/external/")
    out = infer(mesh, "s3-external")
    want = expected(demo.linear_model(8, weight_bytes=256 * 1024), tmp_path)
    np.testing.assert_allclose(out, want, rtol=1e-4)


def test_bad_key_fails_the_load_with_a_clear_reason(mesh: LocalMesh) -> None:
    mesh.register("s3-missing", f"s3://{BUCKET}/ok/missing/model.onnx")
    with pytest.raises(triton.InferenceServerException) as err:
        infer(mesh, "s3-missing")
    text = str(err.value)
    assert "no such object in the bucket" in text, text
    assert "127.0.0.1" not in text and "meshtest" not in text and "/cache" not in text


def test_denied_prefix_and_credentials_in_uri_are_refused_at_registration(mesh: LocalMesh) -> None:
    with pytest.raises(grpc.RpcError) as err:
        mesh.register("s3-other", f"s3://{BUCKET}/other/model.onnx")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allowed prefixes" in str(err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        mesh.register("s3-creds", f"s3://key:secret@{BUCKET}/ok/single/model.onnx")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "secret" not in str(err.value.details())


def mesh_cmd(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def register_calls(mesh: LocalMesh) -> tuple[float, float]:
    samples = mesh.scrape("router")

    def count(method: str) -> float:
        return sum(v for k, v in samples.items()
                   if k.startswith("mesh_requests_total{") and f'method="{method}"' in k)
    return count("RegisterModels"), count("RegisterModel")


def test_repository_from_s3_is_registered_in_one_call(mesh: LocalMesh, store: S3Server,
                                                      tmp_path: pathlib.Path) -> None:
    env = {**os.environ, **store.env(), "MESH_TOKEN": mesh.token}
    bulk_before, single_before = register_calls(mesh)
    done = mesh_cmd("register", "--repository", f"s3://{BUCKET}/ok/repo", "--router", mesh.router_address, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{REPO_MODELS} registered, 0 updated" in done.stdout, done.stdout
    assert "\x1b[" not in done.stdout  # no progress bar drawn into a pipe
    bulk_after, single_after = register_calls(mesh)
    assert (bulk_after - bulk_before, single_after - single_before) == (1, 0)
    status = mesh.get_model("m05")
    assert status.spec.storage_uri == f"s3://{BUCKET}/ok/repo/m05/1/model.onnx"
    assert (status.spec.max_batch_size, status.spec.max_queue_delay_us) == (8, 200)
    np.testing.assert_allclose(infer(mesh, "m05"), expected(demo.linear_model(105), tmp_path), rtol=1e-5)
    again = mesh_cmd("register", "--repository", f"s3://{BUCKET}/ok/repo", "--router", mesh.router_address, env=env)
    assert f"0 registered, 0 updated, {REPO_MODELS} unchanged" in again.stdout, again.stdout + again.stderr


def test_bulk_rpc_reports_each_model(mesh: LocalMesh) -> None:
    specs = [types_pb2.ModelSpec(model_id="bulk-ok", storage_uri=f"s3://{BUCKET}/ok/single/model.onnx"),
             types_pb2.ModelSpec(model_id="bad id!", storage_uri=f"s3://{BUCKET}/ok/single/model.onnx"),
             types_pb2.ModelSpec(model_id="bulk-denied", storage_uri=f"s3://{BUCKET}/other/model.onnx")]
    with mesh.router_channel() as channel:
        resp = registry_pb2_grpc.ModelRegistryStub(channel).RegisterModels(registry_pb2.RegisterModelsRequest(
            models=[registry_pb2.RegisterModelRequest(spec=s) for s in specs]), timeout=30)
    codes = [(r.model_id, grpc.StatusCode.OK.value[0] if not r.code else r.code, r.action) for r in resp.results]
    assert codes == [("bulk-ok", 0, "created"), ("bad id!", grpc.StatusCode.INVALID_ARGUMENT.value[0], ""),
                     ("bulk-denied", grpc.StatusCode.PERMISSION_DENIED.value[0], "")]


def test_mesh_up_serves_a_repository_and_the_poll_follows_it(etcd_endpoint: str, tmp_path: pathlib.Path,
                                                            mesh_root: str) -> None:
    repo = write_repository(tmp_path / "repo", 3)
    for version in (1, 2, 3):  # three versions, the policy serving the newest two
        demo.save(demo.linear_model(300 + version), repo / "ver" / str(version) / "model.onnx")
    (repo / "ver" / "config.pbtxt").write_text('version_policy { latest { num_versions: 2 } }\n')
    port = procs.free_port()
    env = {**os.environ, "MESH_ROOT": mesh_root, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli.main", "up", "--etcd", etcd_endpoint, "--state-dir", str(tmp_path / "state"),
         "--port", str(port), "--pods", "1", "--placements", "1", "--capacity", "128MiB",
         "--repository", str(repo), "--repository-poll", "1s", "--allow-anonymous"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not any("Ctrl-C stops everything" in x for x in out):
            line = up.stdout.readline()
            if not line:
                break
            out.append(line)
        text = "".join(out)
        assert "5 registered" in text and "models: m00, m01, m02, ver/2, ver/3" in text, text
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            x = np.ones((1, 4), np.float32)
            inp = triton.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            assert client.infer("m01", [inp], client_timeout=60).as_numpy("output").shape == (1, 3)
            # the poll: one model added, one removed
            demo.save(demo.linear_model(900), repo / "added" / "1" / "model.onnx")
            shutil.rmtree(repo / "m02")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (_registered(port, "added") and not _registered(port, "m02")):
                time.sleep(0.5)
            assert _registered(port, "added") and not _registered(port, "m02")
            assert client.infer("added", [inp], client_timeout=60).as_numpy("output").shape == (1, 3)
            _check_versions(client, repo, port, x, inp)
        finally:
            client.close()
    finally:
        procs.stop(up, grace=60)


def _check_versions(client: triton.InferenceServerClient, repo: pathlib.Path, port: int, x: np.ndarray,
                    inp: triton.InferInput) -> None:
    """Every version the version policy selects is served as that version, "" the newest, as
    by Triton; a new version replaces the oldest on the next poll."""
    def answer(version: str) -> tuple[str, np.ndarray]:
        result = client.infer("ver", [inp], model_version=version, client_timeout=60)
        return result.get_response().model_version, result.as_numpy("output")

    def expected(version: int) -> np.ndarray:
        session = ort.InferenceSession(str(repo / "ver" / str(version) / "model.onnx"))
        return session.run(None, {"input": x})[0]

    for asked, served in (("2", 2), ("3", 3), ("", 3)):
        version, output = answer(asked)
        assert version == str(served)
        np.testing.assert_allclose(output, expected(served), rtol=1e-6)
    with pytest.raises(triton.InferenceServerException, match="'ver' version '1' is not found"):
        answer("1")
    demo.save(demo.linear_model(304), repo / "ver" / "4" / "model.onnx")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (_registered(port, "ver", "4") and not _registered(port, "ver", "2")):
        time.sleep(0.5)
    assert _registered(port, "ver", "4") and _registered(port, "ver", "3") and not _registered(port, "ver", "2")
    version, output = answer("")
    assert version == "4"
    np.testing.assert_allclose(output, expected(4), rtol=1e-6)


def _registered(port: int, model_id: str, version: str = "") -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            registry_pb2_grpc.ModelRegistryStub(channel).GetModel(
                registry_pb2.GetModelRequest(model_id=model_id, version=version), timeout=10)
            return True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
