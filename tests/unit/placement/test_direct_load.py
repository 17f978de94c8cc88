"""The controller's direct Runtime/Load after its fenced write (placement/controller.py), over
the REAL View and MeshState on a MemoryStore whose watch is held, so the pods' etcd records
never reach placement unless the test releases them: the miss is answered by the pod's direct
answer alone; the call comes only after the write succeeded, carries the record exactly as
written and the victims; a pod that gives no copy leaves the etcd path; and with telemetry,
the usage the pod sends back spares the next eviction its GetUsage round trip."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mesh import types
from mesh.clock import FakeClock
from mesh.errors import Unavailable
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import CopyRecord, CopyState
from placement.activity import ModelActivity
from placement.controller import Controller
from placement.usage import Loaded, Usage
from tests.unit.placement.fakes import FakeUsage, StoreWorld

WAIT = 5.0


class Telemetry:
    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        return {}


@pytest.fixture
async def world() -> AsyncIterator[StoreWorld]:
    w = StoreWorld()
    yield w
    await w.close()


async def make(world: StoreWorld, usage: FakeUsage, telemetry: bool = False) -> Controller:
    await world.start()
    return Controller(world.state, world.leader, PlacementSettings(load_timeout_s=WAIT), Metrics(), usage,
                      clock=FakeClock(), activity=Telemetry() if telemetry else None)


def pod_answers(world: StoreWorld, usage: FakeUsage, size: int = 60) -> None:
    """The pod answers Load with a LOADED copy; the test checks what etcd held at that moment."""

    async def on_load(address: str, model_id: str, raw: bytes, victims: tuple[str, ...]) -> Loaded:
        instance_id = address.removeprefix("addr-")
        written = world.store.snapshot(world.keys.assignment(instance_id, model_id))
        assert written == {world.keys.assignment(instance_id, model_id): raw}, "Load before the write succeeded"
        for victim in victims:
            assert not world.store.snapshot(world.keys.assignment(instance_id, victim)), "victim still assigned"
        copy = CopyRecord(model_id, instance_id, address, CopyState.LOADED, size)
        return Loaded(copy, {model_id: Usage(last_used_ms=0, in_flight=0)})

    usage.on_load = on_load


async def test_the_pods_direct_answer_ends_the_miss_without_etcd(world: StoreWorld) -> None:
    world.pod("a", 100)
    world.model("old", size=60)
    world.model("new", size=60)
    world.report("old", "a", CopyState.LOADED, 60)
    world.put(world.keys.assignment("a", "old"), types.Assignment("old", "a", "file:///m/old.onnx"))
    usage = FakeUsage()
    usage.answers["addr-a"] = {"old": Usage(last_used_ms=1, in_flight=0)}
    pod_answers(world, usage)
    ctl = await make(world, usage)
    try:
        world.store.hold()  # from here on the view shows nothing the pod or placement writes
        copies = await ctl.ensure_loaded("new", WAIT)
        assert [(c.instance_id, c.address, c.state) for c in copies] == [("a", "addr-a", CopyState.LOADED)]
        assert [(a, m, v) for a, m, _, v in usage.loads] == [("addr-a", "new", ("old",))]
        record = types.decode(types.Assignment, usage.loads[0][2])
        assert record.model_id == "new" and record.instance_id == "a" and record.predicted_bytes == 60
        assert ctl.metrics.direct_loads.labels("loaded")._value.get() == 1
    finally:
        await ctl.close()


async def test_no_load_call_without_a_successful_fenced_write(world: StoreWorld) -> None:
    world.pod("a", 100)
    world.model("m", size=10)
    usage = FakeUsage()
    pod_answers(world, usage)
    ctl = await make(world, usage)
    try:
        world.leader.is_leader = False  # leadership lost: Leader.write refuses
        with pytest.raises(Unavailable):
            await ctl.ensure_loaded("m", WAIT)
        assert usage.loads == [] and not world.assignments()
    finally:
        await ctl.close()


async def test_a_pod_that_gives_no_copy_leaves_the_etcd_report(world: StoreWorld) -> None:
    world.pod("a", 100)
    world.model("m", size=10)
    usage = FakeUsage()  # on_load unset: the pod answers no copy (an older pod, a restart)
    ctl = await make(world, usage)
    try:
        world.state.on_change(lambda section, ids: world.report("m", "a", CopyState.LOADED, 10)
                              if section == "assignments" and ids == ("a", "m") else None)
        copies = await ctl.ensure_loaded("m", WAIT)
        assert [(c.instance_id, c.state) for c in copies] == [("a", CopyState.LOADED)]
        assert len(usage.loads) == 1
        assert ctl.metrics.direct_loads.labels("no_answer")._value.get() == 1
    finally:
        await ctl.close()


async def _evicting_misses(world: StoreWorld, telemetry: bool) -> FakeUsage:
    """Three models of 60 on a 100-byte pod requested in turn: every miss after the first
    evicts. Returns the fake pods' Runtime service."""
    world.pod("a", 100)
    for m in ("m1", "m2", "m3"):
        world.model(m, size=60)
    usage = FakeUsage()
    usage.answers["addr-a"] = {}
    pod_answers(world, usage)
    ctl = await make(world, usage, telemetry=telemetry)
    try:
        await ctl.refresh_activity()
        for m in ("m1", "m2", "m3"):
            await ctl.ensure_loaded(m, WAIT)
            # The pod's LOADED report reaches etcd (the victims' plans need the copy loaded).
            world.report(m, "a", CopyState.LOADED, 60)
            await world.settle()
        assert [m for _, m, _, _ in usage.loads] == ["m1", "m2", "m3"]
    finally:
        await ctl.close()
    return usage


async def test_with_telemetry_the_load_answers_usage_spares_getusage(world: StoreWorld) -> None:
    usage = await _evicting_misses(world, telemetry=True)
    assert usage.calls == 0  # the victims of m2 and m3 were chosen on the Load answers' usage


async def test_without_telemetry_every_eviction_asks_the_pods(world: StoreWorld) -> None:
    """The pods' answers are the only recency then: a request since the last answer counts."""
    usage = await _evicting_misses(world, telemetry=False)
    assert usage.calls == 2
