"""Draining pods (InstanceRecord.draining, set by a pod on SIGTERM), placement's half: the pod is
never a candidate; its recently used and min_copies models get a copy elsewhere first, then its
assignment of each goes once another LOADED copy exists; models not used recently are released
at once. The pod stops when it has no assignments left (its side, puller/)."""

from __future__ import annotations

import pytest

from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from placement.controller import Controller
from placement.reconcile import Reconciler
from tests.unit.placement.fakes import FakeUsage, StoreWorld
from tests.unit.placement.test_copies import FakeActivity
from tests.unit.placement.test_decider import Pods

WAIT = 5.0


@pytest.fixture
async def world():
    w = StoreWorld(lag=0.001)
    yield w
    await w.close()


async def test_a_draining_pod_hands_its_models_over_then_empties(world: StoreWorld) -> None:
    world.pod("d", 1000)
    for pod in ("a", "b"):
        world.pod(pod, 100)
    world.model("hot", size=30)
    world.model("cold", size=30)
    world.model("pinned", size=30, min_copies=1)
    world.model("new", size=10)
    clock, activity = FakeClock(), FakeActivity()
    await world.start()
    ctl = Controller(world.state, world.leader, PlacementSettings(load_timeout_s=WAIT, replace_window_s=300),
                     Metrics(), FakeUsage(), clock=clock, activity=activity)
    reconciler = Reconciler(ctl)
    pods = Pods(world, delay=0.05)
    try:
        await world.settle()
        for m in ("hot", "cold", "pinned"):  # d has the most room: all three land there
            assert (await ctl.ensure_loaded(m, WAIT))[0].instance_id == "d"
        activity.last_used = {"hot": clock.unix_ms() - 10_000, "cold": clock.unix_ms() - 3_600_000}
        world.pod("d", 1000, draining=True)
        await world.settle()

        # Never a candidate, however much room it has.
        assert (await ctl.ensure_loaded("new", WAIT))[0].instance_id in ("a", "b")

        await reconciler.reconcile_once()
        await world.settle()
        on_d = set(world.assignments().get("d", {}))
        assert on_d == {"hot", "pinned"}, on_d  # cold released at once: not used recently
        assert world.state.decisions["cold"].action == "drained"
        for m in ("hot", "pinned"):  # a copy elsewhere first, the draining one kept meanwhile
            elsewhere = [i for i, ms in world.assignments().items() if m in ms and i != "d"]
            assert len(elsewhere) == 1, (m, world.assignments())
            assert "is draining" in world.state.decisions[m].reason

        # The new copies load; the next pass releases the draining pod's.
        await world.state.wait_for(lambda: all(len(world.state.ready_copies(m)) == 2 for m in ("hot", "pinned")), WAIT)
        await reconciler.reconcile_once()
        await world.settle()
        assert "d" not in world.assignments(), world.assignments()
        assert world.state.decisions["hot"].action == "drained"
        assert "a LOADED copy is on" in world.state.decisions["hot"].reason
        assert pods.seen  # the pods played along
    finally:
        await ctl.close()
