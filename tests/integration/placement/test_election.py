"""Leader election over real etcd: one leader, fast take-over, stale fences rejected."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mesh import types
from mesh.kv.etcd import EtcdClient, put_op
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.settings import CommonSettings
from mesh.state import MeshState
from placement.leader import Leader
from tests.integration.placement.harness import WAIT, leader_record, start_replica, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd_endpoint: str):
    client = EtcdClient([etcd_endpoint])
    yield client
    await client.close()


@pytest.fixture
def common(etcd_endpoint: str, mesh_root: str) -> CommonSettings:
    return CommonSettings(etcd_endpoints=etcd_endpoint, root=mesh_root, lease_ttl_s=2)


async def test_one_leader_then_takeover_when_the_leader_dies(client: EtcdClient, common: CommonSettings) -> None:
    keys = Keys(common.root)
    replicas = {name: start_replica(common, name) for name in ("p1", "p2")}
    try:
        first = await wait_until(lambda: leader_record(client, keys))
        await wait_until(lambda: _async(any(r.is_leader() for r in replicas.values())))
        assert [r.name for r in replicas.values() if r.is_leader()] == [first.holder_id]
        assert first.address.startswith("127.0.0.1:")

        dead = replicas.pop(first.holder_id)
        dead.task.cancel()  # dies without being asked to stop: resigns on the way out
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(dead.task, WAIT)
        (survivor,) = replicas.values()
        second = await wait_until(lambda: _holder_is(client, keys, survivor.name))
        assert second.address != first.address
        await wait_until(lambda: _async(survivor.is_leader()))
    finally:
        for replica in replicas.values():
            await replica.shutdown()


async def test_revoked_lease_hands_over(client: EtcdClient, common: CommonSettings) -> None:
    keys = Keys(common.root)
    replicas = {name: start_replica(common, name) for name in ("p1", "p2")}
    try:
        first = await wait_until(lambda: leader_record(client, keys))
        kv = await client.get(keys.leader())
        await client.revoke(kv.lease)  # as if the leader's lease expired (paused process)
        other = next(n for n in replicas if n != first.holder_id)
        await wait_until(lambda: _holder_is(client, keys, other))
        await wait_until(lambda: _async(not replicas[first.holder_id].is_leader()))
    finally:
        for replica in replicas.values():
            await replica.shutdown()


async def test_write_with_stale_fence_is_rejected(client: EtcdClient, etcd_endpoint: str, mesh_root: str) -> None:
    keys = Keys(mesh_root)
    view = View(client, keys.prefix())
    leader = Leader(client, MeshState(view, keys), "old", "127.0.0.1:1", 2, Metrics())
    view_task = asyncio.create_task(view.run())
    leader_task = asyncio.create_task(leader.run())
    try:
        await wait_until(lambda: _async(leader.is_leader))
        assert await leader.write([put_op(keys.root + "/probe/ok", b"1")])
        # Someone else takes the key (our lease is still alive: we have not noticed anything).
        await client.delete(keys.leader())
        await client.create(keys.leader(), types.encode(types.LeaderRecord("new", "127.0.0.1:2")))
        assert not await leader.write([put_op(keys.root + "/probe/stale", b"1")])
        assert not leader.is_leader
        assert await client.get(keys.root + "/probe/stale") is None
        assert (await leader_record(client, keys)).holder_id == "new"
    finally:
        for task in (leader_task, view_task):
            task.cancel()
        await asyncio.gather(leader_task, view_task, return_exceptions=True)
        await client.delete(keys.leader())


async def _async(value: object) -> object:
    return value


async def _holder_is(client: EtcdClient, keys: Keys, holder: str) -> types.LeaderRecord | None:
    record = await leader_record(client, keys)
    return record if record is not None and record.holder_id == holder else None
