"""Graceful drain of a real runtime pod (a `python -m puller.main` child) against real etcd,
the test playing placement: it writes the leader key and the assignment, and deletes the
assignment once the pod says it is draining.

SIGTERM -> the instance record says draining, grpc health is NOT_SERVING, V2 requests for the
model held are still answered; the assignment deleted -> the pod unloads, exits 0, and its
lease is revoked (its keys are gone at once, long before the lease TTL would expire them).
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as tpb

from mesh import demo, types
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.types import Assignment, CopyRecord, CopyState, InstanceRecord, LeaderRecord

from .podproc import WAIT_S, Pod, start_runtime

pytestmark = pytest.mark.integration

TTL_S = 30  # long: keys gone right after exit can only mean the lease was revoked


@pytest.fixture
def start_pod(etcd_endpoint: str, tmp_path: pathlib.Path) -> Iterator[Callable[..., Pod]]:
    started: list[Pod] = []

    def start(drain_timeout_s: float = 60.0) -> Pod:
        pod = start_runtime(etcd_endpoint, tmp_path, TTL_S, drain_timeout_s=str(drain_timeout_s))
        started.append(pod)
        return pod

    yield start
    for pod in started:
        procs.stop(pod.proc)


@pytest.fixture
async def etcd(etcd_endpoint: str) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd_endpoint])
    yield client
    await client.close()


async def until(fn: Callable[[], Awaitable[object]], what: str) -> object:
    try:
        async with asyncio.timeout(WAIT_S):
            while not (value := await fn()):  # noqa: ASYNC110 - polls etcd, another process's writes
                await asyncio.sleep(0.05)
            return value
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def instance(etcd: EtcdClient, pod: Pod) -> InstanceRecord | None:
    kv = await etcd.get(pod.keys.instance(pod.name))
    return types.decode(InstanceRecord, kv.value) if kv else None


async def copy_state(etcd: EtcdClient, pod: Pod, model: str) -> CopyState | None:
    kv = await etcd.get(pod.keys.copy(model, pod.name))
    return types.decode(CopyRecord, kv.value).state if kv else None


async def place(etcd: EtcdClient, pod: Pod, model: str, path: pathlib.Path) -> None:
    """Plays placement (a leader exists, and the pod is assigned `model`) and another pod that
    could take the model (without both a draining pod stops without waiting)."""
    await etcd.put(pod.keys.leader(), types.encode(LeaderRecord("test-placement", "127.0.0.1:1")))
    other = InstanceRecord(f"{pod.name}-other", "127.0.0.1:2", 1 << 30)
    await etcd.put(pod.keys.instance(other.instance_id), types.encode(other))
    record = Assignment(model_id=model, instance_id=pod.name, storage_uri=path.as_uri(), assigned_unix_ms=1)
    await etcd.put(pod.keys.assignment(pod.name, model), types.encode(record))

    async def loaded() -> bool:
        return await copy_state(etcd, pod, model) is CopyState.LOADED

    await until(loaded, f"{model} LOADED")


def request(model: str) -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return req


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return resp.status


async def exit_code(pod: Pod) -> int:
    return await asyncio.to_thread(pod.proc.wait, WAIT_S)


async def test_sigterm_drains_serves_meanwhile_and_exits_with_the_lease_revoked(
    start_pod: Callable[..., Pod], etcd: EtcdClient, tmp_path: pathlib.Path
) -> None:
    pod = start_pod()
    await place(etcd, pod, "linear", demo.save(demo.linear_model(1), tmp_path / "linear.onnx"))
    async with grpc.aio.insecure_channel(pod.address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=tpb.ModelInferRequest.SerializeToString,
            response_deserializer=tpb.ModelInferResponse.FromString,
        )
        await infer(request("linear"), timeout=10)
        assert await health(pod.address) == health_pb2.HealthCheckResponse.SERVING

        pod.proc.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            rec = await instance(etcd, pod)
            return rec is not None and rec.draining

        await until(draining, "draining=True in etcd")
        assert await health(pod.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Still serving the model it holds, on the existing connection and on a new one.
        served = 0
        for _ in range(20):
            resp = await infer(request("linear"), timeout=10)
            served += len(resp.raw_output_contents)
        async with grpc.aio.insecure_channel(pod.address) as fresh:
            call = fresh.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=tpb.ModelInferRequest.SerializeToString,
                response_deserializer=tpb.ModelInferResponse.FromString,
            )
            served += len((await call(request("linear"), timeout=10)).raw_output_contents)
        assert served == 21
        assert pod.proc.poll() is None
        assert await copy_state(etcd, pod, "linear") is CopyState.LOADED

    await etcd.delete(pod.keys.assignment(pod.name, "linear"))  # placement: ready elsewhere
    assert await exit_code(pod) == 0
    assert await instance(etcd, pod) is None  # revoked, not expired (TTL 30 s)
    assert await copy_state(etcd, pod, "linear") is None
    log = pod.log()
    assert "drained in" in log and "lease revoked" in log and "Traceback" not in log


async def test_second_signal_stops_at_once_and_revokes(
    start_pod: Callable[..., Pod], etcd: EtcdClient, tmp_path: pathlib.Path
) -> None:
    pod = start_pod()
    await place(etcd, pod, "linear", demo.save(demo.linear_model(2), tmp_path / "linear2.onnx"))
    pod.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        rec = await instance(etcd, pod)
        return rec is not None and rec.draining

    await until(draining, "draining=True in etcd")
    pod.proc.send_signal(signal.SIGTERM)
    assert await exit_code(pod) == 0
    assert await instance(etcd, pod) is None
    assert "second signal: stopping at once" in pod.log()


async def test_drain_timeout_stops_the_pod_anyway(
    start_pod: Callable[..., Pod], etcd: EtcdClient, tmp_path: pathlib.Path
) -> None:
    pod = start_pod(drain_timeout_s=1.0)
    await place(etcd, pod, "linear", demo.save(demo.linear_model(3), tmp_path / "linear3.onnx"))
    pod.proc.send_signal(signal.SIGTERM)
    assert await exit_code(pod) == 0
    assert await instance(etcd, pod) is None
    assert "drain timed out" in pod.log()
