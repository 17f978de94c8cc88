"""Leader election over real etcd: one leader, fast take-over, stale fences rejected, a paused
(zombie) leader's writes all refused, and leadership back at once after an etcd restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import signal
import threading
import time

import pytest

from mesh import types
from mesh.cli import procs
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


def _leader(client: EtcdClient, keys: Keys, name: str) -> tuple[Leader, View]:
    view = View(client, keys.prefix())
    return Leader(client, MeshState(view, keys), name, f"127.0.0.1:{name}", 2, Metrics()), view


async def test_leader_is_back_at_once_after_an_etcd_restart(tmp_path: pathlib.Path, mesh_root: str) -> None:
    """Regression: after etcd was killed and restarted placement had no leader for ~13 s — the
    leader gave its lease up ("could not revoke leader lease ...; it expires by itself"), and
    the lease, which etcd keeps through a restart, held the leader key until its TTL ran out.
    Now the leader steps down while etcd is away (its lease is in doubt) but keeps renewing,
    and leads again with the same lease and fence as soon as etcd answers."""
    keys = Keys(mesh_root)
    port, peer = procs.free_port(), procs.free_port()
    etcd = procs.start_etcd(tmp_path / "data", port, peer, tmp_path / "etcd.log")
    clients = [EtcdClient([f"127.0.0.1:{port}"], timeout=2) for _ in range(2)]
    pairs = [_leader(c, keys, f"p{i}") for i, c in enumerate(clients)]
    tasks = [asyncio.create_task(t) for leader, view in pairs for t in (view.run(), leader.run())]
    try:
        await wait_until(lambda: _async(any(leader.is_leader for leader, _ in pairs)))
        (first,) = [leader for leader, _ in pairs if leader.is_leader]
        fence = first.fence
        os.kill(etcd.pid, signal.SIGKILL)
        etcd.wait(10)
        # Longer than the TTL: the leader must notice that it may have lost the lease.
        await wait_until(lambda: _async(not any(leader.is_leader for leader, _ in pairs)))
        await asyncio.sleep(first.ttl_s)
        etcd = procs.start_etcd(tmp_path / "data", port, peer, tmp_path / "etcd.log")
        restarted = time.monotonic()
        await wait_until(lambda: _async(any(leader.is_leader for leader, _ in pairs)))
        elected_s = time.monotonic() - restarted
        (now,) = [leader for leader, _ in pairs if leader.is_leader]
        record = await wait_until(lambda: leader_record(clients[0], keys))
        assert (now.holder_id, now.fence) == (first.holder_id, fence) == (record.holder_id, fence)
        assert (await clients[0].get(keys.leader())).create_revision == fence
        print(f"\n[election] leader again {elected_s:.2f}s after etcd restarted (TTL {first.ttl_s}s)")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
        procs.stop(etcd)


class _TxnLog(EtcdClient):
    """Records each transaction's written keys and outcome (instrumentation, real etcd)."""

    txns: list[tuple[tuple[str, ...], bool]]

    async def txn(self, compares, success, failure=()):  # type: ignore[no-untyped-def]
        ok, rev = await super().txn(compares, success, failure)
        written = tuple(op.request_put.key.decode() for op in success if op.HasField("request_put"))
        self.txns.append((written, ok))
        return ok, rev


async def test_paused_leader_writes_are_all_rejected(etcd_endpoint: str, mesh_root: str) -> None:
    """F4, a zombie leader: the leader's whole process stalls (GC pause, SIGSTOP) beyond its
    lease TTL, a standby takes over, and the old leader resumes believing it still leads and
    writes at once. Every such write is refused by etcd (the txn compares the leader key's
    create revision with the old fence) and none is applied. The old leader runs on an event
    loop of its own in a thread, so the test can freeze it whole, as SIGSTOP would."""
    keys = Keys(mesh_root)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_old(coro):  # runs a coroutine on the old leader's loop, waits for it from here
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def start_old() -> tuple[_TxnLog, Leader, list[asyncio.Task[None]]]:
        client = _TxnLog([etcd_endpoint])
        client.txns = []
        leader, view = _leader(client, keys, "old")
        return client, leader, [asyncio.create_task(view.run()), asyncio.create_task(leader.run())]

    old_client, old, old_tasks = await on_old(start_old())
    client = EtcdClient([etcd_endpoint])
    new, new_view = _leader(client, keys, "new")
    new_tasks: list[asyncio.Task[None]] = []
    resume = threading.Event()
    stale: list[asyncio.Future[bool]] = []
    try:
        await wait_until(lambda: _async(old.is_leader))
        assert await on_old(old.write([put_op(keys.root + "/probe/before", b"1")]))

        def freeze() -> None:
            resume.wait(60)
            # What a resumed process runs first: writes queued before the pause, ahead of any
            # timer or watch event that would tell it that it lost the lease.
            stale.extend(loop.create_task(old.write([put_op(f"{keys.root}/probe/stale-{i}", b"x")]))
                         for i in range(5))

        loop.call_soon_threadsafe(freeze)
        new_tasks = [asyncio.create_task(new_view.run()), asyncio.create_task(new.run())]
        await wait_until(lambda: _async(new.is_leader))
        assert old.is_leader, "the frozen leader has not noticed anything"
        resume.set()
        await wait_until(lambda: _async(len(stale) == 5))

        async def outcomes() -> list[bool]:
            return list(await asyncio.gather(*stale))

        assert await on_old(outcomes()) == [False] * 5
        # Each reached etcd's txn guard (none was refused locally for a fence already cleared).
        stale_txns = [ok for keys_written, ok in old_client.txns if any("stale" in k for k in keys_written)]
        assert stale_txns == [False] * 5
        for i in range(5):
            assert await client.get(f"{keys.root}/probe/stale-{i}") is None
        assert not old.is_leader and new.is_leader
        assert (await leader_record(client, keys)).holder_id == "new"
    finally:
        resume.set()
        for task in new_tasks:
            task.cancel()
        await asyncio.gather(*new_tasks, return_exceptions=True)

        async def stop_old() -> None:
            for task in old_tasks:
                task.cancel()
            await asyncio.gather(*old_tasks, return_exceptions=True)
            await old_client.close()

        await on_old(stop_old())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        await client.close()


async def _async(value: object) -> object:
    return value


async def _holder_is(client: EtcdClient, keys: Keys, holder: str) -> types.LeaderRecord | None:
    record = await leader_record(client, keys)
    return record if record is not None and record.holder_id == holder else None
