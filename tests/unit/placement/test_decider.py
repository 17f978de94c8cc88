"""The decider and its ledger through the REAL View and MeshState over a MemoryStore whose watch
lags, as etcd's does: the three packing faults of issue 8 and the fence.

Each regression test names the bug it pins. The tests use only the controller's public API,
so they also run against the code before the decider (where they fail, as their docstrings say).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mesh.clock import FakeClock
from mesh.errors import NotFound
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import Assignment, CopyState
from placement.controller import Controller
from placement.reconcile import Reconciler
from tests.unit.placement.fakes import FakeUsage, StoreWorld

WAIT = 5.0
MiB = 1 << 20


class Pods:
    """Plays the runtime pods over the world's view: each new assignment is reported LOADED
    (at the size `sizes` says, default its predicted bytes) after `delay` seconds."""

    def __init__(self, world: StoreWorld, delay: float = 0.0) -> None:
        self.world, self.delay = world, delay
        self.sizes: dict[str, int] = {}
        self.seen: set[tuple[str, str]] = set()
        world.state.on_change(self._hook)

    def _hook(self, section: str, ids: tuple[str, ...]) -> None:
        if section != "assignments" or len(ids) != 2:
            return
        instance_id, model_id = ids
        assignment = self.world.state.assignments.get(instance_id, {}).get(model_id)
        if assignment is None or (model_id, instance_id) in self.seen:
            return
        self.seen.add((model_id, instance_id))
        size = self.sizes.get(model_id, assignment.predicted_bytes)
        asyncio.get_running_loop().call_later(
            self.delay, self.world.report, model_id, instance_id, CopyState.LOADED, size)


async def make(world: StoreWorld, **settings: object) -> Controller:
    await world.start()
    return Controller(world.state, world.leader, PlacementSettings(**{"load_timeout_s": WAIT, **settings}),
                      Metrics(), FakeUsage(), clock=FakeClock())


@pytest.fixture
async def lagging() -> AsyncIterator[StoreWorld]:
    world = StoreWorld(lag=0.001)  # 1 ms between a write and the watch showing it
    yield world
    await world.close()


def assert_within_capacity(world: StoreWorld, capacity: dict[str, int]) -> None:
    booked = world.booked()
    assert all(booked.get(p, 0) <= cap for p, cap in capacity.items()), (booked, capacity)


async def test_concurrent_misses_do_not_double_book_a_pod(lagging: StoreWorld) -> None:
    """Regression (issue 8): each EnsureLoaded planned from the watched view alone, so with a
    1 ms write -> watch lag two concurrent misses for 60-byte models were both assigned to the
    same 100-byte pod (both saw it empty)."""
    world = lagging
    for pod in ("a", "b"):
        world.pod(pod, 100)
    for m in ("m1", "m2"):
        world.model(m, size=60)
    ctl = await make(world)
    Pods(world, delay=0.01)
    try:
        await world.settle()
        results = await asyncio.gather(ctl.ensure_loaded("m1", WAIT), ctl.ensure_loaded("m2", WAIT))
        assert sorted(r[0].instance_id for r in results) == ["a", "b"]
        assert_within_capacity(world, {"a": 100, "b": 100})
    finally:
        await ctl.close()


async def test_a_cold_herd_spreads_over_the_pods(lagging: StoreWorld) -> None:
    """Regression (issue 8): 20 concurrent first requests for 20 models never measured all
    landed on pod-0 of 2: their size was taken as 0 ("model size not known before its first
    load"), so pod-0 always looked most free. Reserved at their prior, they spread."""
    world = lagging
    for pod in ("pod-0", "pod-1"):
        world.pod(pod, 10 << 30)
    for i in range(20):
        world.model(f"cold{i}")
    ctl = await make(world)  # default settings: the default prior
    Pods(world, delay=0.01).sizes.update({f"cold{i}": MiB for i in range(20)})
    try:
        await world.settle()
        await asyncio.gather(*(ctl.ensure_loaded(f"cold{i}", WAIT) for i in range(20)))
        per_pod = {p: len(ms) for p, ms in world.assignments().items()}
        assert per_pod == {"pod-0": 10, "pod-1": 10}, per_pod
    finally:
        await ctl.close()


async def test_a_model_of_unknown_size_evicts_for_its_prior(lagging: StoreWorld) -> None:
    """Regression (issue 8): a model never measured was predicted at 0 bytes, so it was placed
    onto a full pod with no eviction (cleaned up afterwards as "overcommit"). Its prior here is
    (its artifact size + the session overhead measured on the others, 50 - 40) x the default
    ratio (3): (5 + 10) x 3 = 45 bytes, so one idle model goes."""
    world = lagging
    world.pod("a", 100)
    for m in ("old", "new"):
        world.model(m, size=50, artifact=40)
    world.model("fresh", artifact=5)
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("old", "new"):
            await ctl.ensure_loaded(m, WAIT)
        await ctl.ensure_loaded("fresh", WAIT)
        placed = world.assignments()["a"]
        assert placed["fresh"].predicted_bytes == 45
        assert len(placed) == 2, sorted(placed)  # one 50-byte model evicted in the same transaction
        await world.settle()
        decision = world.state.decisions["fresh"]
        assert "prior: (artifact 5B + session 10B) x 3.00" in decision.reason, decision.reason
        assert_within_capacity(world, {"a": 100})
    finally:
        await ctl.close()


async def test_unknown_artifact_too_gets_the_default_prior_never_zero(lagging: StoreWorld) -> None:
    """Regression (issue 8): with the default settings a model of unknown size AND unknown
    artifact size was booked at 0 bytes (MESH_PLACEMENT_DEFAULT_MODEL_BYTES defaulted to 0)."""
    world = lagging
    world.pod("a", 100 * MiB)
    for m in ("old", "new"):
        world.model(m, size=50 * MiB)
    world.model("mystery")
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("old", "new"):
            await ctl.ensure_loaded(m, WAIT)
        await ctl.ensure_loaded("mystery", WAIT)
        placed = world.assignments()["a"]
        assert placed["mystery"].predicted_bytes == 64 * MiB
        assert len(placed) < 3, sorted(placed)
    finally:
        await ctl.close()


async def test_a_stale_plan_is_rejected_by_the_pod_fence() -> None:
    """A write the view has not shown (here another writer's assignment on pod a) makes the
    decider's plan stale: etcd rejects it (the pod's assignment-prefix fence), the decider
    plans again once the view moves, and the model goes where there is room."""
    world = StoreWorld()
    world.pod("a", 100)
    world.pod("b", 60)
    world.model("m", size=50)
    world.model("other", size=80)
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        world.store.hold()
        world.put(world.keys.assignment("a", "other"), Assignment("other", "a", "file:///x", predicted_bytes=80))
        task = asyncio.create_task(ctl.ensure_loaded("m", WAIT))
        for _ in range(500):  # the view is held: poll the leader, not the view
            if world.leader.rejected:
                break
            await asyncio.sleep(0.01)
        assert world.leader.rejected == 1
        world.store.release()
        copies = await asyncio.wait_for(task, WAIT)
        assert [c.instance_id for c in copies] == ["b"]
        assert sorted(world.assignments()["a"]) == ["other"]
    finally:
        await ctl.close()


async def test_a_pod_measured_over_capacity_is_relieved_before_anything_lands_on_it() -> None:
    """The pod's own report of its use is the ground truth: a pod whose used_bytes exceeds its
    capacity gets nothing placed on it without evicting first, and the clean-up evicts from it."""
    for relieve_first in (False, True):
        world = StoreWorld()
        world.pod("a", 100)
        for m in ("x", "y"):
            world.model(m, size=40)
        world.model("m", size=10)
        ctl = await make(world)
        Pods(world)
        try:
            await world.settle()
            for m in ("x", "y"):
                await ctl.ensure_loaded(m, WAIT)
            world.pod("a", 100, used_bytes=130)  # x and y measure 80; the pod says 130 in use
            await world.settle()
            assert ctl.ledger.measured_use("a") == 130
            if relieve_first:
                await Reconciler(ctl).reconcile_once()
                await world.settle()
                assert sorted(world.assignments()["a"]) == ["y"]  # never the newest
                assert "over its capacity" in world.state.decisions["x"].reason
            else:
                await ctl.ensure_loaded("m", WAIT)
                await world.settle()
                assert sorted(world.assignments()["a"]) == ["m", "y"]
                assert world.state.decisions["x"].action == "evicted"
        finally:
            await ctl.close()
            await world.close()


async def test_loads_in_flight_make_a_miss_wait_for_room_not_fail() -> None:
    """With the pod's room reserved by a load in flight, a second miss waits for that load's
    measurement (smaller than its prior) instead of failing with RESOURCE_EXHAUSTED."""
    world = StoreWorld()
    world.pod("a", 100)
    world.model("big", artifact=30)  # prior 90 bytes: nearly the whole pod
    world.model("small", size=20)
    ctl = await make(world)
    pods = Pods(world, delay=0.05)
    pods.sizes["big"] = 30
    try:
        await world.settle()
        first = asyncio.create_task(ctl.ensure_loaded("big", WAIT))
        await world.state.wait_for(lambda: "big" in world.state.assignments.get("a", {}), WAIT)
        second = await ctl.ensure_loaded("small", WAIT)
        assert [c.instance_id for c in second] == ["a"]
        await first
        assert sorted(world.assignments()["a"]) == ["big", "small"]
    finally:
        await ctl.close()


async def test_own_writes_the_watch_shows_before_the_txn_answers_are_not_kept_reserved() -> None:
    """Regression (seen in test_eviction): the ledger noted the view's revision AFTER the write
    returned; when the watch delivered the write before etcd's answer arrived, that revision
    already included it, the own write never looked "seen", its LOADED copy stayed booked as a
    load in flight, and the next miss waited for room that was there."""
    world = StoreWorld()
    slow_answer = world.leader.write

    async def write(ops, extra_compares=()):  # type: ignore[no-untyped-def]
        ok = await slow_answer(ops, extra_compares)
        await asyncio.sleep(0.02)  # the watch delivers meanwhile
        return ok

    world.leader.write = write  # type: ignore[method-assign]
    world.pod("a", 100)
    for m in ("x", "y", "z"):
        world.model(m, size=40)
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("x", "y"):
            await ctl.ensure_loaded(m, WAIT)
        await world.settle()
        assert ctl.ledger.in_flight() == 0 and ctl.ledger.unseen() == 0
        await asyncio.wait_for(ctl.ensure_loaded("z", WAIT), 2.0)  # evicts x at once
        assert sorted(world.assignments()["a"]) == ["y", "z"]
    finally:
        await ctl.close()
        await world.close()


async def test_a_model_the_router_saw_is_not_found_only_once_placement_caught_up() -> None:
    """Regression (seen in CI, tests/integration/test_drain.py): a registration is acknowledged
    once the router's view shows it; the first request's miss then reached a placement whose
    view had not caught up yet, which answered NOT_FOUND (and the router passed it on). With the
    router's revision in the request, placement waits for its view to reach it."""
    world = StoreWorld()
    world.pod("a", 100)
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        world.store.hold()  # this view stops seeing writes, as if its watch lagged
        world.model("fresh", size=10)
        router_saw = world.store.revision
        loading = asyncio.ensure_future(ctl.ensure_loaded("fresh", WAIT, min_revision=router_saw))
        await asyncio.sleep(0.05)
        assert not loading.done()  # not NOT_FOUND at once: waiting for the view
        world.store.release()
        copies = await asyncio.wait_for(loading, WAIT)
        assert [c.instance_id for c in copies] == ["a"]
        with pytest.raises(NotFound, match="not registered"):  # truly absent: still NOT_FOUND
            await ctl.ensure_loaded("never-registered", WAIT, min_revision=world.store.revision)
    finally:
        await ctl.close()
        await world.close()
