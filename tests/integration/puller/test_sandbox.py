"""Loading untrusted models on a real runtime pod (`python -m puller.main`) against real etcd:
each hostile model ends FAILED with the right reason while the pod keeps serving another model
with correct outputs, and the verdict cache spares a second child (also across a restart).

The crashing model is a test hook, not an onnxruntime bug: no model found crashes onnxruntime
1.31, so the pod runs with MESH_RUNTIME_SANDBOX_TEST_CRASH_PRODUCER set and the sandbox child
calls os.abort() for a model with that producer_name - the SIGABRT a crash would be. The other
cases are real: a warm-up that allocates 1 GiB under a 256 MiB limit, a Loop that never ends,
a custom-op domain, external data `../../etc/passwd`, `/etc/passwd`, and a symlink in the
artifact's cache folder that escapes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import re
import shutil
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2 as tpb

from mesh import demo, types
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.types import Assignment, CopyRecord, CopyState
from tests import badmodels

from .podproc import WAIT_S, Pod, start_runtime

pytestmark = pytest.mark.integration

GOOD = "good"


class Mesh:
    def __init__(self, base: pathlib.Path, etcd_endpoint: str) -> None:
        self.base, self.etcd_endpoint = base, etcd_endpoint
        self.models = base / "models"
        self.models.mkdir()
        self.verdicts = base / "verdicts"
        self.pods: list[Pod] = []
        self.metrics_ports: dict[str, int] = {}

    def start(self, cache: pathlib.Path) -> Pod:
        port = procs.free_port()
        pod = start_runtime(
            self.etcd_endpoint, self.base, 5, file_roots=str(self.models), cache_dir=str(cache),
            sandbox_memory_bytes="256MiB", sandbox_timeout_s="5", sandbox_verdict_dir=str(self.verdicts),
            sandbox_test_crash_producer=badmodels.CRASH_PRODUCER, metrics_port=str(port),
        )
        self.pods.append(pod)
        self.metrics_ports[pod.name] = port
        return pod

    def save(self, name: str, model: onnx.ModelProto) -> tuple[pathlib.Path, str]:
        path = demo.save(model, self.models / f"{name}.onnx")
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    def metrics_text(self, pod: Pod) -> str:
        url = f"http://127.0.0.1:{self.metrics_ports[pod.name]}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 - our own pod

    def metric(self, pod: Pod, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics_text(pod), re.M)
        return float(found.group(1)) if found else 0.0


def _escaping_cache(cache: pathlib.Path, model: onnx.ModelProto) -> str:
    """A cache folder holding an artifact whose external data is a symlink out of it (as a
    multi-file artifact could be laid out), indexed by the pod at start. Returns its sha256."""
    data = model.SerializeToString()
    digest = hashlib.sha256(data).hexdigest()
    folder = cache / "objects" / digest
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(data)
    (folder / "w.bin").symlink_to("/etc/passwd")
    return digest


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    mesh = Mesh(tmp_path_factory.mktemp("sandbox"), etcd_endpoint)
    try:
        yield mesh
    finally:
        for pod in mesh.pods:
            procs.stop(pod.proc)


@pytest.fixture(scope="module")
def escaping(mesh: Mesh) -> str:
    return _escaping_cache(mesh.base / "cache-a", badmodels.external_model("w.bin"))


@pytest.fixture(scope="module")
def pod(mesh: Mesh, escaping: str) -> Pod:
    return mesh.start(mesh.base / "cache-a")


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd_endpoint])
    yield client
    await client.close()


async def until(fn: Callable[[], object], what: str) -> object:
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if value := await fn():  # type: ignore[misc]
                    return value
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def copy_of(etcd: EtcdClient, pod: Pod, model: str) -> CopyRecord | None:
    kv = await etcd.get(pod.keys.copy(model, pod.name))
    return types.decode(CopyRecord, kv.value) if kv else None


async def assign(etcd: EtcdClient, pod: Pod, model: str, path: pathlib.Path, sha256: str) -> None:
    record = Assignment(model_id=model, instance_id=pod.name, storage_uri=path.as_uri(), sha256=sha256,
                        assigned_unix_ms=1)
    await etcd.put(pod.keys.assignment(pod.name, model), types.encode(record))


async def reaches(etcd: EtcdClient, pod: Pod, model: str, state: CopyState) -> CopyRecord:
    async def check() -> CopyRecord | None:
        rec = await copy_of(etcd, pod, model)
        return rec if rec and rec.state is state else None

    return await until(check, f"{model} {state.name}")  # type: ignore[return-value]


async def unassign(etcd: EtcdClient, pod: Pod, model: str) -> None:
    await etcd.delete(pod.keys.assignment(pod.name, model))

    async def gone() -> bool:
        return await copy_of(etcd, pod, model) is None

    await until(gone, f"{model} gone")


async def serves_good(pod: Pod, mesh: Mesh) -> None:
    """The other model answers with onnxruntime's own output for its file."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    req = tpb.ModelInferRequest(model_name=GOOD, id="r")
    req.inputs.add(name="input", datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    async with grpc.aio.insecure_channel(pod.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=tpb.ModelInferRequest.SerializeToString,
            response_deserializer=tpb.ModelInferResponse.FromString,
        )
        resp = await call(req, timeout=10)
    got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 3)
    session = ort.InferenceSession(str(mesh.models / f"{GOOD}.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-6)
    assert pod.proc.poll() is None  # the pod process itself never died


async def test_good_model_loads_through_the_sandbox(mesh: Mesh, pod: Pod, etcd: EtcdClient) -> None:
    path, sha = mesh.save(GOOD, demo.linear_model(1))
    await assign(etcd, pod, GOOD, path, sha)
    await reaches(etcd, pod, GOOD, CopyState.LOADED)
    await serves_good(pod, mesh)
    assert mesh.metric(pod, 'mesh_sandbox_runs_total{verdict="ok"}') == 1
    assert stat_mode(mesh.verdicts / f"{sha}.json") == 0o600


def stat_mode(path: pathlib.Path) -> int:
    return path.stat().st_mode & 0o777


CASES = [
    ("crash", badmodels.crash_model, "crashed", "crashed onnxruntime on its first load (killed by SIGABRT)"),
    ("alloc", lambda: badmodels.expand_model(1 << 28), "out_of_memory", "ran out of memory on its first load"),
    ("endless", badmodels.endless_model, "timed_out", "did not finish its first load"),
    ("custom", badmodels.custom_op_model, "refused", "custom-op domain 'com.evil'"),
    ("passwd", lambda: badmodels.external_model("../../etc/passwd"), "refused", "contains '..'"),
    ("absolute", lambda: badmodels.external_model("/etc/passwd"), "refused", "is absolute"),
]


@pytest.mark.parametrize(("name", "build", "verdict", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_hostile_model_fails_and_the_pod_serves_on(
    mesh: Mesh, pod: Pod, etcd: EtcdClient, name: str, build: Callable[[], onnx.ModelProto], verdict: str,
    reason: str,
) -> None:
    await reaches(etcd, pod, GOOD, CopyState.LOADED)
    path, sha = mesh.save(name, build())
    await assign(etcd, pod, name, path, sha)
    copy = await reaches(etcd, pod, name, CopyState.FAILED)
    assert reason in copy.error and f"'{name}'" in copy.error
    assert str(mesh.base) not in copy.error and "/cache" not in copy.error
    assert mesh.metric(pod, f'mesh_sandbox_runs_total{{verdict="{verdict}"}}') >= 1
    await serves_good(pod, mesh)


async def test_symlink_out_of_the_artifact_folder_fails(mesh: Mesh, pod: Pod, etcd: EtcdClient, escaping: str) -> None:
    # The cache holds this sha256 already (with its symlink): no pull, straight to the checks.
    await assign(etcd, pod, "escape", mesh.models / "absent.onnx", escaping)
    copy = await reaches(etcd, pod, "escape", CopyState.FAILED)
    assert "external data 'w.bin'" in copy.error and "resolves outside the model's own folder" in copy.error
    await serves_good(pod, mesh)


async def test_second_loads_use_the_cached_verdict(mesh: Mesh, pod: Pod, etcd: EtcdClient) -> None:
    runs = 'mesh_sandbox_runs_total{verdict="%s"}'
    ok, crashed = mesh.metric(pod, runs % "ok"), mesh.metric(pod, runs % "crashed")
    hits = mesh.metric(pod, "mesh_sandbox_verdict_cache_hits_total")
    assert crashed == 1
    await unassign(etcd, pod, GOOD)
    await unassign(etcd, pod, "crash")
    path, sha = mesh.save(GOOD, demo.linear_model(1))
    await assign(etcd, pod, GOOD, path, sha)
    await reaches(etcd, pod, GOOD, CopyState.LOADED)
    path, sha = mesh.save("crash", badmodels.crash_model())
    await assign(etcd, pod, "crash", path, sha)
    copy = await reaches(etcd, pod, "crash", CopyState.FAILED)
    assert "crashed onnxruntime" in copy.error
    assert mesh.metric(pod, runs % "ok") == ok and mesh.metric(pod, runs % "crashed") == crashed
    assert mesh.metric(pod, "mesh_sandbox_verdict_cache_hits_total") == hits + 2
    await serves_good(pod, mesh)


async def test_verdicts_survive_a_restart(mesh: Mesh, pod: Pod, etcd: EtcdClient) -> None:
    """A new pod process on the same verdict folder starts no child for artifacts vetted before."""
    fresh = mesh.start(mesh.base / "cache-b")
    try:
        for name in (GOOD, "crash"):
            path = mesh.models / f"{name}.onnx"
            await assign(etcd, fresh, name, path, hashlib.sha256(path.read_bytes()).hexdigest())
        await reaches(etcd, fresh, GOOD, CopyState.LOADED)
        copy = await reaches(etcd, fresh, "crash", CopyState.FAILED)
        assert "crashed onnxruntime" in copy.error
        assert mesh.metric(fresh, "mesh_sandbox_verdict_cache_hits_total") == 2
        assert "mesh_sandbox_runs_total{" not in mesh.metrics_text(fresh)
        await serves_good(fresh, mesh)
    finally:
        procs.stop(fresh.proc)
        shutil.rmtree(mesh.base / "cache-b", ignore_errors=True)
