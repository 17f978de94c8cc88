"""Placement replicas in-process over real etcd, and fake runtime pods the test plays.

A fake pod is an InstanceRecord under its own lease plus a hook on a watched MeshState: when
an assignment for it appears, it writes the copy report the test chose (LOADED by default);
when the assignment goes, it deletes the copy, as a real pod unloads. Its address refuses
connections, so placement's GetUsage falls back to the copies' update times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable

from mesh import types
from mesh.kv.etcd import EtcdClient, Lease
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.settings import CommonSettings, PlacementSettings
from mesh.state import MeshState
from mesh.tasks import Supervisor
from mesh.types import CopyState
from placement.main import serve

WAIT = 15.0
DEAD_ADDRESS = "127.0.0.1:1"


async def wait_until(check: Callable[[], Awaitable[object]], within: float = WAIT) -> object:
    """Polls `check` until it returns something truthy; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.05)


@dataclasses.dataclass
class Replica:
    name: str
    task: asyncio.Task[None]
    stop: asyncio.Event
    metrics: Metrics

    def is_leader(self) -> bool:
        return self.metrics.registry.get_sample_value("mesh_placement_leader") == 1.0

    def placements(self, result: str = "ok") -> float:
        return self.metrics.registry.get_sample_value("mesh_placements_total", {"result": result}) or 0.0

    async def shutdown(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, WAIT)


def start_replica(common: CommonSettings, name: str, load_timeout_s: float = 10.0) -> Replica:
    settings = PlacementSettings(listen="127.0.0.1:0", instance_id=name, load_timeout_s=load_timeout_s)
    stop, metrics = asyncio.Event(), Metrics()
    task = asyncio.create_task(serve(common, settings, stop, metrics), name=f"placement-{name}")
    return Replica(name, task, stop, metrics)


async def leader_record(client: EtcdClient, keys: Keys) -> types.LeaderRecord | None:
    kv = await client.get(keys.leader())
    return types.decode(types.LeaderRecord, kv.value) if kv else None


class FakePods:
    """Plays any number of runtime pods over one watched view of the test's root."""

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.view = View(client, keys.prefix())
        self.state = MeshState(self.view, keys)
        self.answers: dict[tuple[str, str], tuple[CopyState, str]] = {}  # (model, pod) -> report
        self.sizes: dict[str, int] = {}  # model -> size reported (default 10)
        self.times: dict[str, int] = {}  # model -> updated_unix_ms reported (default now)
        self.leases: dict[str, Lease] = {}
        self._supervisor = Supervisor()
        self._tasks: set[asyncio.Task[None]] = set()
        self.state.on_change(self._on_change)

    async def start(self) -> None:
        self._supervisor.start("fake-pods-view", self.view.run)
        await self.view.wait_synced(WAIT)

    async def add_pod(self, instance_id: str, capacity: int) -> None:
        lease = await self.client.grant(30)
        self.leases[instance_id] = lease
        record = types.InstanceRecord(instance_id, DEAD_ADDRESS, capacity)
        await self.client.put(self.keys.instance(instance_id), types.encode(record), lease.id)

    async def report(self, model_id: str, instance_id: str, state: CopyState, size: int = 0,
                     error: str = "", at_ms: int = 0) -> None:
        copy = types.CopyRecord(model_id, instance_id, DEAD_ADDRESS, state, size, error=error,
                                updated_unix_ms=at_ms or int(time.time() * 1000))
        await self.client.put(self.keys.copy(model_id, instance_id), types.encode(copy),
                              self.leases[instance_id].id)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section != "assignments" or len(ids) != 2 or ids[0] not in self.leases:
            return
        instance_id, model_id = ids
        assigned = model_id in self.state.assignments.get(instance_id, {})
        has_copy = instance_id in self.state.copies.get(model_id, {})
        if assigned and not has_copy:
            state, error = self.answers.get((model_id, instance_id), (CopyState.LOADED, ""))
            size, at_ms = self.sizes.get(model_id, 10), self.times.get(model_id, 0)
            self._spawn(self.report(model_id, instance_id, state, size, error, at_ms))
        elif not assigned:
            self._spawn(self._unload(model_id, instance_id))

    async def _unload(self, model_id: str, instance_id: str) -> None:
        await self.client.delete(self.keys.copy(model_id, instance_id))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._supervisor.stop()
        for lease in self.leases.values():
            await lease.revoke()
