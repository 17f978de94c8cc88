"""EnsureLoaded with excluded instances (issue 9, "the retry that cannot reload"): a router
whose only copy's pod is dead or stuck names that pod, and placement loads elsewhere instead
of answering with the copy the router just failed to reach."""

from __future__ import annotations

from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import CopyState
from placement.controller import Controller
from tests.unit.placement.fakes import FakeUsage, World
from tests.unit.placement.test_controller import WAIT, play_pod


async def test_excluded_copy_is_not_ready_and_a_copy_is_loaded_elsewhere() -> None:
    """Regression: placement answered "ready" with the copy on the dead pod (its record lingers
    until the lease lapses), so the router's reload found nothing and failed UNAVAILABLE."""
    world = World()
    world.model("m")
    world.pod("a", 100)
    world.pod("b", 100)
    world.loaded("m", "a", 10)
    ctl = Controller(world.state, world.leader, PlacementSettings(load_timeout_s=WAIT), Metrics(), FakeUsage(),
                     clock=FakeClock())
    try:
        play_pod(world, lambda m, i: (CopyState.LOADED, ""))
        assert [c.instance_id for c in await ctl.ensure_loaded("m", WAIT)] == ["a"]  # no exclusion: at once
        copies = await ctl.ensure_loaded("m", WAIT, exclude=frozenset({"a"}))
        assert [c.instance_id for c in copies] == ["b"]
        assert world.state.decisions["m"].instance_id == "b"
    finally:
        await ctl.close()
    assert len(ctl.flights) == 0


async def test_excluded_pod_is_never_chosen_for_the_new_copy() -> None:
    world = World()
    world.model("m")
    world.pod("big", 1000)  # the planner's first choice (most free), but excluded
    world.pod("small", 100)
    ctl = Controller(world.state, world.leader, PlacementSettings(load_timeout_s=WAIT), Metrics(), FakeUsage(),
                     clock=FakeClock())
    try:
        play_pod(world, lambda m, i: (CopyState.LOADED, ""))
        copies = await ctl.ensure_loaded("m", WAIT, exclude=frozenset({"big"}))
        assert [c.instance_id for c in copies] == ["small"]
        assert "m" not in world.state.assignments.get("big", {})
    finally:
        await ctl.close()
