"""The controller and reconciler over an in-memory MeshState: no etcd, no network.

The test plays the runtime pods: it watches for the assignment the controller writes and
answers with a copy report, like a pod would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mesh.clock import FakeClock
from mesh.errors import DeadlineExceeded, LoadFailed, NoCapacity, NotFound, Unavailable
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import CopyState
from placement.controller import Controller
from placement.reconcile import Reconciler
from placement.usage import Usage
from tests.unit.placement.fakes import FakeUsage, World

WAIT = 5.0  # bound on every wait; the tests finish in milliseconds


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def usage() -> FakeUsage:
    return FakeUsage()


@pytest.fixture
async def controller(world: World, usage: FakeUsage):
    ctl = Controller(world.state, world.leader, PlacementSettings(load_timeout_s=WAIT), Metrics(), usage,
                     clock=FakeClock())
    yield ctl
    await ctl.close()
    assert len(ctl.flights) == 0


def play_pod(world: World, answer: Callable[[str, str], tuple[CopyState, str]]) -> None:
    """On each new assignment, reports the copy as answer(model, instance) says."""
    seen: set[tuple[str, str]] = set()

    def hook(section: str, ids: tuple[str, ...]) -> None:
        if section != "assignments" or len(ids) != 2:
            return
        instance_id, model_id = ids
        if model_id in world.state.assignments.get(instance_id, {}) and (model_id, instance_id) not in seen:
            seen.add((model_id, instance_id))
            state, error = answer(model_id, instance_id)
            asyncio.get_running_loop().call_soon(
                lambda: world.loaded(model_id, instance_id, 10, state=state, error=error))

    world.state.on_change(hook)


async def test_unknown_model_is_not_found(controller: Controller) -> None:
    with pytest.raises(NotFound):
        await controller.ensure_loaded("nope", WAIT)


async def test_ready_copy_answers_at_once_even_on_a_follower(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 100)
    world.loaded("m", "a", 10)
    world.leader.is_leader = False
    copies = await controller.ensure_loaded("m", WAIT)
    assert [c.instance_id for c in copies] == ["a"]


async def test_follower_is_unavailable(world: World, controller: Controller) -> None:
    world.model("m")
    world.leader.is_leader = False
    with pytest.raises(Unavailable):
        await controller.ensure_loaded("m", WAIT)


async def test_places_on_most_free_pod(world: World, controller: Controller) -> None:
    world.model("m", size=30)
    world.pod("a", 100)
    world.pod("b", 200)
    play_pod(world, lambda m, i: (CopyState.LOADED, ""))
    copies = await controller.ensure_loaded("m", WAIT)
    assert [c.instance_id for c in copies] == ["b"]
    assert world.state.assignments["b"]["m"].predicted_bytes == 30


async def test_evicts_lru_using_pod_usage(world: World, controller: Controller, usage: FakeUsage) -> None:
    world.model("old")
    world.model("new")
    world.model("m", size=50)
    world.pod("a", 100)
    world.loaded("old", "a", 50, at_ms=1)
    world.loaded("new", "a", 50, at_ms=2)
    # The pod says 'old' was used last: recency from GetUsage beats etcd's update times.
    usage.answers["addr-a"] = {"old": Usage(9, 0), "new": Usage(5, 0)}
    play_pod(world, lambda m, i: (CopyState.LOADED, ""))
    await controller.ensure_loaded("m", WAIT)
    assert sorted(world.state.assignments["a"]) == ["m", "old"]
    # victim delete + assignment + both decisions: one fenced transaction
    assert len(world.leader.writes[0]) == 4
    assert world.state.decisions["new"].action == "evicted" and "for model 'm'" in world.state.decisions["new"].reason
    assert world.state.decisions["m"].action == "placed" and world.state.decisions["m"].instance_id == "a"


async def test_no_capacity(world: World, controller: Controller) -> None:
    world.model("m", size=500)
    world.pod("a", 100)
    with pytest.raises(NoCapacity):
        await controller.ensure_loaded("m", WAIT)


async def test_failed_load_retries_once_on_another_pod(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 100)
    world.pod("b", 100)
    play_pod(world, lambda m, i: (CopyState.FAILED, "boom") if i == "a" else (CopyState.LOADED, ""))
    copies = await controller.ensure_loaded("m", WAIT)
    assert [c.instance_id for c in copies] == ["b"]
    assert "m" not in world.state.assignments.get("a", {})


async def test_both_pods_fail_gives_reasons(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 100)
    world.pod("b", 100)
    play_pod(world, lambda m, i: (CopyState.FAILED, f"bad model on {i}"))
    with pytest.raises(LoadFailed) as err:
        await controller.ensure_loaded("m", WAIT)
    assert "bad model on a" in err.value.message and "bad model on b" in err.value.message


async def test_the_only_pod_failing_gives_its_reason_not_no_pod(world: World, controller: Controller) -> None:
    # One pod: after its failed load none is left to try. The caller hears the load's reason
    # (LoadFailed), not "no runtime pod can take it" (Unavailable, which says retry).
    world.model("m")
    world.pod("a", 100)
    play_pod(world, lambda m, i: (CopyState.FAILED, "archive holds a link"))
    with pytest.raises(LoadFailed, match="a: archive holds a link"):
        await controller.ensure_loaded("m", WAIT)


async def test_pod_dying_while_loading_moves_the_model(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 200)
    world.pod("b", 100)
    play_pod(world, lambda m, i: (CopyState.LOADING if i == "a" else CopyState.LOADED, ""))
    task = asyncio.create_task(controller.ensure_loaded("m", WAIT))
    await world.state.wait_for(lambda: "a" in world.state.copies.get("m", {}), WAIT)
    world.kill("a")
    copies = await asyncio.wait_for(task, WAIT)
    assert [c.instance_id for c in copies] == ["b"]


async def test_concurrent_callers_share_one_load(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 100)
    play_pod(world, lambda m, i: (CopyState.LOADED, ""))
    results = await asyncio.gather(*(controller.ensure_loaded("m", WAIT) for _ in range(20)))
    assert all(r[0].instance_id == "a" for r in results)
    assert len(world.leader.writes) == 1


async def test_caller_deadline_ends_the_wait_not_the_load(world: World, controller: Controller) -> None:
    world.model("m")
    world.pod("a", 100)
    with pytest.raises(DeadlineExceeded):
        await controller.ensure_loaded("m", 0.05)
    assert "m" in world.state.assignments["a"]
    world.loaded("m", "a", 10)
    assert (await controller.ensure_loaded("m", WAIT))[0].instance_id == "a"


async def test_reconcile_removes_unregistered_dead_and_overcommitted(world: World, controller: Controller) -> None:
    for m in ("keep", "old", "newest", "orphan"):
        world.model(m)
    world.pod("a", 100)
    world.pod("dead", 100)
    world.loaded("old", "a", 60, at_ms=1)
    world.loaded("newest", "a", 60, at_ms=5)
    world.loaded("keep", "dead", 10)
    world.loaded("orphan", "a", 0, at_ms=3, state=CopyState.LOADING)
    world.kill("dead")
    world.view.apply([(world.keys.model("orphan"), None)])
    deleted = await Reconciler(controller).reconcile_once()
    assert deleted == 3
    assert world.state.assignments == {"a": {"newest": world.state.assignments["a"]["newest"]}}


async def test_reconcile_deletes_a_big_dead_pod_in_several_transactions(world: World, controller: Controller) -> None:
    """Regression: a dead pod with 300 assignments made one 300-op txn, which etcd rejects
    ("too many operations in txn request", seen in the 1,000-model density run), so the
    reconcile loop crash-looped and the assignments were never cleared."""
    world.pod("a", 1 << 40)
    world.pod("dead", 1 << 40)
    for i in range(300):
        world.model(f"m{i}")
        world.loaded(f"m{i}", "dead", 1)
    world.kill("dead")
    deleted = await Reconciler(controller).reconcile_once()
    assert deleted >= 300
    assert "dead" not in world.state.assignments


async def test_placing_over_many_victims_respects_etcd_txn_limit(world: World, controller: Controller) -> None:
    """100 tiny models must go to make room for a big one: 2 ops per victim would exceed the
    128-operation transaction limit, so evictions are written in chunks first."""
    world.pod("a", 100)
    for i in range(100):
        world.model(f"tiny{i}")
        world.loaded(f"tiny{i}", "a", 1, at_ms=i)
    world.model("big", size=100)
    play_pod(world, lambda m, i: (CopyState.LOADED, ""))
    copies = await controller.ensure_loaded("big", WAIT)
    assert [c.instance_id for c in copies] == ["a"]
    assert set(world.state.assignments["a"]) == {"big"}
    assert len(world.leader.writes) > 1  # several transactions, each within the limit (FakeLeader asserts)


async def test_reconcile_clears_a_long_failed_copy_but_not_a_fresh_one(world: World, controller: Controller) -> None:
    """A FAILED proactive copy used to keep its assignment (and count as a copy) forever."""
    now = controller.clock.unix_ms()
    for m in ("stale", "fresh"):
        world.model(m)
    world.pod("a", 100)
    world.loaded("stale", "a", 0, at_ms=now - 60_000, state=CopyState.FAILED, error="bad model")
    world.loaded("fresh", "a", 0, at_ms=now - 1_000, state=CopyState.FAILED, error="bad model")
    deleted = await Reconciler(controller).reconcile_once()
    assert deleted == 1
    assert set(world.state.assignments["a"]) == {"fresh"}
