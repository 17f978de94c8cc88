"""A runtime pod against real etcd: assignments in, copy records out, V2 inference over gRPC.

The pod runs in a subprocess (`python -m puller.main`): it imports our inference protos, and
this test uses tritonclient's (same wire format), which cannot share one process.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2 as tpb

from mesh import demo, types
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.types import Assignment, CopyRecord, CopyState, InstanceRecord, ModelStats

POD = "pod-a"
WAIT_S = 30.0


class Pod:
    def __init__(self, proc: subprocess.Popen, address: str, keys: Keys, folder: pathlib.Path) -> None:
        self.proc, self.address, self.keys, self.folder = proc, address, keys, folder


@pytest.fixture(scope="module")
def pod(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    folder = tmp_path_factory.mktemp("runtime")
    port = procs.free_port()
    root = f"/test-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "MESH_ETCD_ENDPOINTS": etcd_endpoint,
        "MESH_ROOT": root,
        "MESH_LEASE_TTL_S": "5",
        "MESH_RUNTIME_LISTEN": f"127.0.0.1:{port}",
        "MESH_RUNTIME_INSTANCE_ID": POD,
        "MESH_RUNTIME_CACHE_DIR": str(folder / "cache"),
        "MESH_RUNTIME_USE_GPU": "never",
        "MESH_RUNTIME_FILE_ROOTS": str(folder),  # the tests' models are written there
        "PYTHONUNBUFFERED": "1",
    }
    with open(folder / "runtime.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "puller.main"], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        procs.wait_port("127.0.0.1", port, WAIT_S, proc)
        yield Pod(proc, f"127.0.0.1:{port}", Keys(root), folder)
    finally:
        procs.stop(proc)


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd_endpoint])
    yield client
    await client.close()


@pytest.fixture
async def infer(pod: Pod) -> AsyncIterator[Callable[..., object]]:
    channel = grpc.aio.insecure_channel(pod.address)
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=tpb.ModelInferRequest.SerializeToString,
        response_deserializer=tpb.ModelInferResponse.FromString,
    )
    yield call
    await channel.close()


async def wait_for(fn: Callable[[], object], what: str) -> object:
    async with asyncio.timeout(WAIT_S):
        while True:
            value = await fn()  # type: ignore[misc]
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)


async def copy_of(etcd: EtcdClient, pod: Pod, model: str) -> CopyRecord | None:
    kv = await etcd.get(pod.keys.copy(model, POD))
    return types.decode(CopyRecord, kv.value) if kv else None


async def assign(etcd: EtcdClient, pod: Pod, model: str, path: pathlib.Path) -> None:
    record = Assignment(model_id=model, instance_id=POD, storage_uri=path.as_uri(), assigned_unix_ms=1)
    await etcd.put(pod.keys.assignment(POD, model), types.encode(record))


async def wait_state(etcd: EtcdClient, pod: Pod, model: str, state: CopyState) -> CopyRecord:
    async def check() -> CopyRecord | None:
        rec = await copy_of(etcd, pod, model)
        return rec if rec and rec.state is state else None

    return await wait_for(check, f"{model} {state}")  # type: ignore[return-value]


def raw_request(model: str, x: np.ndarray, name: str = "input", datatype: str = "FP32") -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name=model, id="req-1")
    req.inputs.add(name=name, datatype=datatype, shape=x.shape)
    req.raw_input_contents.append(x.tobytes())
    return req


async def test_load_and_infer_raw(pod: Pod, etcd: EtcdClient, infer: Callable[..., object]) -> None:
    path = demo.save(demo.linear_model(1), pod.folder / "linear.onnx")
    await assign(etcd, pod, "linear", path)
    copy = await wait_state(etcd, pod, "linear", CopyState.LOADED)
    assert copy.address == pod.address and copy.size_bytes >= path.stat().st_size

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    resp = await infer(raw_request("linear", x))  # type: ignore[misc]
    assert resp.model_name == "linear" and resp.id == "req-1"
    (out,) = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [2, 3])
    got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-6)

    inst = types.decode(InstanceRecord, (await etcd.get(pod.keys.instance(POD))).value)  # type: ignore[union-attr]
    assert inst.models == ("linear",) and inst.used_bytes == copy.size_bytes
    stats = types.decode(ModelStats, (await etcd.get(pod.keys.stats("linear"))).value)  # type: ignore[union-attr]
    assert stats.inputs == ({"name": "input", "datatype": "FP32", "shape": [-1, 4]},)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (raw_request("linear", np.zeros((1, 4), np.float32), name="nope"), "unknown input 'nope'"),
        (raw_request("linear", np.zeros((1, 5), np.float32)), "expects \\[-1, 4\\]"),
        (raw_request("linear", np.zeros((1, 4), np.int32), datatype="INT32"), "expects FP32"),
    ],
)
async def test_bad_requests_are_invalid_argument(
    pod: Pod, etcd: EtcdClient, infer: Callable[..., object], request_: tpb.ModelInferRequest, match: str
) -> None:
    await wait_state(etcd, pod, "linear", CopyState.LOADED)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await infer(request_)  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match.replace("\\", "") in err.value.details()
    resp = await infer(raw_request("linear", np.ones((1, 4), np.float32)))  # type: ignore[misc]
    assert len(resp.raw_output_contents) == 1


async def test_unknown_model_is_unavailable(pod: Pod, infer: Callable[..., object]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await infer(raw_request("ghost", np.ones((1, 4), np.float32)))  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "'ghost' is not loaded on this pod" in err.value.details()


async def test_stream_continues_after_error_and_usage_counts(pod: Pod, etcd: EtcdClient) -> None:
    from mesh.pb.v1 import internal_pb2, internal_pb2_grpc

    await wait_state(etcd, pod, "linear", CopyState.LOADED)
    async with grpc.aio.insecure_channel(pod.address) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=tpb.ModelInferRequest.SerializeToString,
            response_deserializer=tpb.ModelStreamInferResponse.FromString,
        )
        good = raw_request("linear", np.ones((1, 4), np.float32))
        bad = raw_request("linear", np.ones((1, 4), np.float32), name="nope")
        replies = [r async for r in stream(iter([good, bad, good]))]
        assert [bool(r.error_message) for r in replies] == [False, True, False]
        assert "unknown input 'nope'" in replies[1].error_message
        usage = await internal_pb2_grpc.RuntimeStub(channel).GetUsage(internal_pb2.GetUsageRequest())
        (linear,) = usage.models
        assert linear.model_id == "linear" and linear.requests >= 2 and linear.in_flight == 0


async def test_corrupt_artifact_fails_and_good_model_keeps_serving(
    pod: Pod, etcd: EtcdClient, infer: Callable[..., object]
) -> None:
    bad = pod.folder / "corrupt.onnx"
    bad.write_bytes(os.urandom(2048))
    await assign(etcd, pod, "corrupt", bad)
    copy = await wait_state(etcd, pod, "corrupt", CopyState.FAILED)
    # Random bytes fail meshserve's own protobuf check (puller/onnxcheck.py) before onnxruntime.
    assert "cannot load model 'corrupt'" in copy.error
    stats = types.decode(ModelStats, (await etcd.get(pod.keys.stats("corrupt"))).value)  # type: ignore[union-attr]
    assert stats.last_error == copy.error
    resp = await infer(raw_request("linear", np.ones((1, 4), np.float32)))  # type: ignore[misc]
    assert len(resp.raw_output_contents) == 1
    await etcd.delete(pod.keys.assignment(POD, "corrupt"))
    await wait_for(lambda: _gone(etcd, pod, "corrupt"), "failed copy removed")


async def _gone(etcd: EtcdClient, pod: Pod, model: str) -> bool:
    return await copy_of(etcd, pod, model) is None


async def test_unassign_unloads(pod: Pod, etcd: EtcdClient, infer: Callable[..., object]) -> None:
    await wait_state(etcd, pod, "linear", CopyState.LOADED)
    await etcd.delete(pod.keys.assignment(POD, "linear"))
    await wait_for(lambda: _gone(etcd, pod, "linear"), "copy removed")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await infer(raw_request("linear", np.ones((1, 4), np.float32)))  # type: ignore[misc]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    async def empty() -> bool:
        kv = await etcd.get(pod.keys.instance(POD))
        return kv is not None and types.decode(InstanceRecord, kv.value).models == ()

    await wait_for(empty, "instance record without models")


async def test_stop_revokes_lease(pod: Pod, etcd: EtcdClient) -> None:
    pod.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(pod.proc.wait, WAIT_S) == 0
    assert await etcd.get(pod.keys.instance(POD)) is None
