"""A runtime pod through an etcd outage (an etcd of the test's own, stopped and restarted on
the same data dir and port): the loaded model keeps being served, the pod logs no traceback
(it used to log one every few seconds from its lease loop), and after the restart etcd agrees
with the pod again (its copy and instance records are there, under a live lease) and new
assignments load.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as tpb

from mesh import demo, types
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.types import Assignment, CopyRecord, CopyState, InstanceRecord

from .podproc import WAIT_S, Pod, start_runtime

pytestmark = pytest.mark.integration

TTL_S = 3
OUTAGE_S = 3 * TTL_S  # well past the lease TTL


class Etcd:
    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.client_port, self.peer_port = procs.free_port(), procs.free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.proc = self.start()

    def start(self):  # noqa: ANN201 - subprocess.Popen
        return procs.start_etcd(self.base / "data", self.client_port, self.peer_port, self.base / "etcd.log")


@pytest.fixture
def own_etcd(tmp_path: pathlib.Path) -> Iterator[Etcd]:
    etcd = Etcd(tmp_path / "etcd")
    try:
        yield etcd
    finally:
        procs.stop(etcd.proc)


async def until(fn: Callable[[], object], what: str) -> object:
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    if value := await fn():  # type: ignore[misc]
                        return value
                except Exception:  # noqa: BLE001 - etcd restarting: ask again
                    pass
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def state(etcd: EtcdClient, keys: Keys, pod: Pod, model: str) -> CopyState | None:
    kv = await etcd.get(keys.copy(model, pod.name))
    return types.decode(CopyRecord, kv.value).state if kv else None


async def assign(etcd: EtcdClient, pod: Pod, model: str, path: pathlib.Path) -> None:
    record = Assignment(model_id=model, instance_id=pod.name, storage_uri=path.as_uri(), assigned_unix_ms=1)
    await etcd.put(pod.keys.assignment(pod.name, model), types.encode(record))

    async def loaded() -> bool:
        return await state(etcd, pod.keys, pod, model) is CopyState.LOADED

    await until(loaded, f"{model} LOADED")


def request(model: str) -> tpb.ModelInferRequest:
    req = tpb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return req


async def test_pod_serves_through_an_etcd_outage_and_resyncs_after(own_etcd: Etcd, tmp_path: pathlib.Path) -> None:
    pod = start_runtime(own_etcd.endpoint, tmp_path / "pods", TTL_S)
    etcd = EtcdClient([own_etcd.endpoint], timeout=2)
    try:
        await assign(etcd, pod, "before", demo.save(demo.linear_model(1), tmp_path / "before.onnx"))
        async with grpc.aio.insecure_channel(pod.address) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=tpb.ModelInferRequest.SerializeToString,
                response_deserializer=tpb.ModelInferResponse.FromString,
            )
            procs.stop(own_etcd.proc)
            served = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + OUTAGE_S
            while loop.time() < end:  # the whole outage: every request answered
                served += len((await infer(request("before"), timeout=10)).raw_output_contents)
                await asyncio.sleep(0.05)
            assert served > 0
            own_etcd.proc = own_etcd.start()

            async def registered() -> bool:
                kv = await etcd.get(pod.keys.instance(pod.name))
                return kv is not None and types.decode(InstanceRecord, kv.value).models == ("before",)

            await until(registered, "instance record back")
            await until(lambda: state(etcd, pod.keys, pod, "before"), "copy record back")
            assert await state(etcd, pod.keys, pod, "before") is CopyState.LOADED
            # The assignments watch resumed: a new model loads.
            await assign(etcd, pod, "after", demo.save(demo.linear_model(2), tmp_path / "after.onnx"))
            await infer(request("after"), timeout=10)
        assert pod.proc.poll() is None
        log = pod.log()
        assert "Traceback" not in log, log[-3000:]
    finally:
        procs.stop(pod.proc)
        await etcd.close()
