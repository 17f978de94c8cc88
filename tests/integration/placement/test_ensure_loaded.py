"""EnsureLoaded end to end: a placement replica over real etcd, the test playing the pods."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh import types
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.settings import CommonSettings
from mesh.types import CopyState
from tests.integration.placement.harness import (
    WAIT,
    FakePods,
    Replica,
    leader_record,
    start_replica,
    wait_until,
)

pytestmark = pytest.mark.integration


class Mesh:
    def __init__(self, client: EtcdClient, keys: Keys, pods: FakePods, replica: Replica,
                 stub: internal_pb2_grpc.PlacementStub) -> None:
        self.client, self.keys, self.pods, self.replica, self.stub = client, keys, pods, replica, stub

    async def register(self, model_id: str, size: int = 0) -> None:
        spec = types.ModelSpec(model_id, f"file:///models/{model_id}.onnx")
        await self.client.put(self.keys.model(model_id), types.encode(spec))
        if size:
            await self.client.put(self.keys.stats(model_id), types.encode(types.ModelStats(model_id, size)))

    async def ensure(self, model_id: str) -> internal_pb2.EnsureLoadedResponse:
        return await self.stub.EnsureLoaded(internal_pb2.EnsureLoadedRequest(model_id=model_id), timeout=WAIT)

    async def assigned(self, model_id: str) -> list[str]:
        kvs, _ = await self.client.get_prefix(self.keys.prefix("assignments"))
        return sorted(self.keys.parse(kv.key)[1][0] for kv in kvs if self.keys.parse(kv.key)[1][1] == model_id)


@pytest.fixture
async def mesh(etcd_endpoint: str, mesh_root: str):
    client = EtcdClient([etcd_endpoint])
    keys = Keys(mesh_root)
    pods = FakePods(client, keys)
    await pods.start()
    replica = start_replica(CommonSettings(etcd_endpoints=etcd_endpoint, root=mesh_root, lease_ttl_s=2), "p1")
    record = await wait_until(lambda: leader_record(client, keys))
    channel = grpc.aio.insecure_channel(record.address)
    try:
        yield Mesh(client, keys, pods, replica, internal_pb2_grpc.PlacementStub(channel))
    finally:
        await channel.close()
        await replica.shutdown()
        await pods.close()
        await client.close()


async def test_registered_model_is_assigned_and_loaded(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 1000)
    await mesh.register("m1")
    resp = await mesh.ensure("m1")
    assert [(c.instance_id, c.state) for c in resp.copies] == [("pod-a", types_pb2.LOADED)]
    assert await mesh.assigned("m1") == ["pod-a"]
    # A second call finds the ready copy without placing again.
    await mesh.ensure("m1")
    assert mesh.replica.placements() == 1


async def test_unknown_model_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.ensure("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_full_pod_evicts_least_recently_used(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 100)
    for model_id in ("old", "recent"):
        await mesh.register(model_id)
    # The pod already holds two models of 50 bytes; 'old' was last touched first.
    for model_id, at_ms in (("old", 1_000), ("recent", 2_000)):
        mesh.pods.sizes[model_id], mesh.pods.times[model_id] = 50, at_ms
        assignment = types.Assignment(model_id, "pod-a", "file:///x", assigned_unix_ms=at_ms)
        await mesh.client.put(mesh.keys.assignment("pod-a", model_id), types.encode(assignment))
    await wait_until(lambda: _ready(mesh.pods, "old", "recent"))
    # Registered last: once placement knows m3 (watch order), it has seen both copies too.
    await mesh.register("m3", size=40)
    resp = await mesh.ensure("m3")
    assert [c.instance_id for c in resp.copies] == ["pod-a"]
    assert await mesh.assigned("old") == []
    assert await mesh.assigned("recent") == ["pod-a"]
    assert mesh.replica.metrics.registry.get_sample_value("mesh_evictions_total", {"reason": "capacity"}) == 1


async def test_failed_load_moves_to_the_other_pod(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 100)
    await mesh.pods.add_pod("pod-b", 100)
    await mesh.register("flaky")
    mesh.pods.answers[("flaky", "pod-a")] = (CopyState.FAILED, "out of memory")
    resp = await mesh.ensure("flaky")
    assert [c.instance_id for c in resp.copies] == ["pod-b"]
    assert await mesh.assigned("flaky") == ["pod-b"]


async def test_failing_everywhere_is_failed_precondition_with_reason(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 100)
    await mesh.pods.add_pod("pod-b", 100)
    await mesh.register("bad")
    for pod in ("pod-a", "pod-b"):
        mesh.pods.answers[("bad", pod)] = (CopyState.FAILED, "not an ONNX model")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.ensure("bad")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not an ONNX model" in err.value.details()
    assert await mesh.assigned("bad") == []


async def test_concurrent_misses_write_one_assignment(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 100)
    await mesh.pods.add_pod("pod-b", 100)
    await mesh.register("hot")
    results = await asyncio.gather(*(mesh.ensure("hot") for _ in range(20)))
    assert {tuple(c.instance_id for c in r.copies) for r in results} == {("pod-a",)}
    assert await mesh.assigned("hot") == ["pod-a"]
    assert mesh.replica.placements() == 1


async def _ready(pods: FakePods, *model_ids: str) -> bool:
    return all(pods.state.ready_copies(m) for m in model_ids)


async def test_leader_removes_assignments_of_unregistered_models_and_dead_pods(mesh: Mesh) -> None:
    await mesh.pods.add_pod("pod-a", 100)
    await mesh.pods.add_pod("pod-b", 50)
    for model_id in ("gone", "orphaned"):
        await mesh.register(model_id)
    await mesh.ensure("gone")  # most free: pod-a
    await mesh.pods.leases["pod-a"].revoke()  # pod-a dies (its records go with its lease)
    assert (await mesh.ensure("orphaned")).copies[0].instance_id == "pod-b"
    await wait_until(lambda: _none_assigned(mesh, "gone"))
    await mesh.client.delete(mesh.keys.model("orphaned"))  # unregister
    await wait_until(lambda: _none_assigned(mesh, "orphaned"))


async def _none_assigned(mesh: Mesh, model_id: str) -> bool:
    return await mesh.assigned(model_id) == []
