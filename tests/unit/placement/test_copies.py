"""Proactive placement (placement/copies.py via the reconcile pass) over an in-memory MeshState.

Hot models get copies on other pods, cooled copies are dropped (never the last, never below
min_copies, never within the churn guard), a telemetry gap is not idleness, a dead pod's
recently used models are re-placed where they fit — each action bounded per pass and
explained by a Decision. Time is a FakeClock; the router telemetry is a fake ActivitySource.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from mesh import types
from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import CopyState
from placement.activity import ModelActivity
from placement.controller import Controller
from placement.reconcile import Reconciler
from tests.unit.placement.fakes import FakeLeader, FakeUsage, World

WINDOW_S = 60.0


class FakeActivity:
    """An ActivitySource the test sets: model -> requests per second over the window."""

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}
        self.last_used: dict[str, int] = {}
        self.down = False  # Redis unreachable: snapshot answers None
        self.raises = False  # a reader bug: snapshot raises

    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        if self.raises:
            raise ConnectionError("telemetry reader exploded")
        if self.down:
            return None
        ids = set(self.rates) | set(self.last_used)
        return {m: ModelActivity(m, self.last_used.get(m, 0), int(self.rates.get(m, 0) * WINDOW_S), WINDOW_S)
                for m in ids}


class LaggingLeader(FakeLeader):
    """Like etcd: a write is acknowledged at once but reaches the watch (the View) a moment
    later, so the state read right after a write does not show it yet."""

    async def write(self, ops: Sequence, extra_compares: Sequence[object] = ()) -> bool:  # type: ignore[override]
        view = self.view
        applied: list = []
        real_apply = view.apply
        view.apply = applied.extend  # type: ignore[method-assign]
        try:
            ok = await super().write(ops, extra_compares)
        finally:
            view.apply = real_apply  # type: ignore[method-assign]
        if applied:
            asyncio.get_running_loop().call_later(0.01, real_apply, list(applied))
        return ok


class Mesh:
    """World + controller + reconciler + fake telemetry + clock, for one test."""

    def __init__(self, lagging: bool = False, **settings: object) -> None:
        self.world = World()
        if lagging:
            self.world.leader = LaggingLeader(self.world.view)
        self.clock = FakeClock()
        self.activity = FakeActivity()
        defaults: dict[str, object] = {"load_timeout_s": 5.0, "copy_rate_per_s": 1.0, "max_copies": 3,
                                       "min_residency_s": 30.0, "copy_guard_s": 30.0, "replace_window_s": 300.0,
                                       "max_actions_per_pass": 8}
        self.ctl = Controller(self.world.state, self.world.leader, PlacementSettings(**{**defaults, **settings}),
                              Metrics(), FakeUsage(), clock=self.clock, activity=self.activity)
        self.reconciler = Reconciler(self.ctl)

    @property
    def now(self) -> int:
        return self.clock.unix_ms()

    def model(self, model_id: str, size: int = 10, **spec: int) -> None:
        w = self.world
        w.put(w.keys.model(model_id), types.ModelSpec(model_id, f"file:///m/{model_id}.onnx", **spec))
        w.put(w.keys.stats(model_id), types.ModelStats(model_id, size_bytes=size))

    def loaded(self, model_id: str, instance_id: str, size: int = 10, ago_s: float = 1000.0,
               state: CopyState = CopyState.LOADED) -> None:
        self.world.loaded(model_id, instance_id, size, at_ms=self.now - int(ago_s * 1000), state=state)

    def on(self, model_id: str) -> list[str]:
        """Live pods assigned the model."""
        st = self.world.state
        return sorted(i for i in st.assigned_instances(model_id) if i in st.instances)

    def decision(self, model_id: str) -> types.Decision:
        return self.world.state.decisions[model_id]

    async def settle(self) -> None:
        """Lets lagging writes reach the view: their timers (10 ms) fire before this one."""
        if isinstance(self.world.leader, LaggingLeader):
            await asyncio.sleep(0.05)

    async def reconcile(self) -> None:
        await self.reconciler.reconcile_once()
        await self.settle()

    async def close(self) -> None:
        await self.ctl.close()


@pytest.fixture
async def mesh():
    m = Mesh()
    yield m
    await m.close()


# -- hot models get copies ---------------------------------------------------------------------


async def test_hot_model_gets_a_second_copy_on_another_pod(mesh: Mesh) -> None:
    for pod in ("a", "b"):
        mesh.world.pod(pod, 100)
    mesh.model("m")
    mesh.loaded("m", "a")
    mesh.activity.rates["m"] = 5.0  # 5 req/s on one copy, threshold 1 per copy
    await mesh.reconcile()
    assert mesh.on("m") == ["a", "b"]
    d = mesh.decision("m")
    assert d.action == "copy_added" and d.instance_id == "b"
    assert "5.00 req/s over 1 copies exceeds 1 per copy" in d.reason


async def test_copy_never_shares_a_pod_and_stays_within_free_room(mesh: Mesh) -> None:
    mesh.world.pod("a", 100)
    mesh.world.pod("full", 15)
    mesh.model("m")
    mesh.model("other")
    mesh.loaded("m", "a")
    mesh.loaded("other", "full")  # 5 bytes free on 'full': the copy does not fit, nothing is evicted
    mesh.activity.rates["m"] = 50.0
    writes = len(mesh.world.leader.writes)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"] and mesh.on("other") == ["full"]
    assert len(mesh.world.leader.writes) == writes
    assert "m" not in mesh.world.state.decisions


@pytest.mark.parametrize(("setting", "spec_max", "expected"), [(3, 0, 3), (3, 2, 2), (2, 4, 4)])
async def test_copies_stop_at_max_copies(setting: int, spec_max: int, expected: int) -> None:
    mesh = Mesh(max_copies=setting)
    try:
        for pod in "abcde":
            mesh.world.pod(pod, 100)
        mesh.model("m", max_copies=spec_max)
        mesh.loaded("m", "a")
        mesh.activity.rates["m"] = 1000.0
        counts = []
        for _ in range(6):
            await mesh.reconcile()
            counts.append(len(mesh.on("m")))
        # one copy per model per pass, then the maximum holds
        assert counts[: expected - 1] == list(range(2, expected + 1))
        assert counts[-1] == expected
    finally:
        await mesh.close()


async def test_copies_are_bounded_per_pass() -> None:
    mesh = Mesh(max_actions_per_pass=3)
    try:
        for pod in "ab":
            mesh.world.pod(pod, 1000)
        for i in range(10):
            mesh.model(f"m{i}")
            mesh.loaded(f"m{i}", "a")
            mesh.activity.rates[f"m{i}"] = 10.0
        await mesh.reconcile()
        assert sum(len(mesh.on(f"m{i}")) == 2 for i in range(10)) == 3
        await mesh.reconcile()
        assert sum(len(mesh.on(f"m{i}")) == 2 for i in range(10)) == 6
    finally:
        await mesh.close()


async def test_copies_off_without_a_rate_threshold() -> None:
    mesh = Mesh(copy_rate_per_s=0.0)
    try:
        for pod in "ab":
            mesh.world.pod(pod, 100)
        mesh.model("m")
        mesh.loaded("m", "a")
        mesh.activity.rates["m"] = 1000.0
        await mesh.reconcile()
        assert mesh.on("m") == ["a"]
    finally:
        await mesh.close()


# -- cooled copies are dropped -------------------------------------------------------------------


async def test_cooled_copy_is_dropped_but_never_the_last(mesh: Mesh) -> None:
    for pod in "ab":
        mesh.world.pod(pod, 100)
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=2000)
    mesh.loaded("m", "b", ago_s=1000)
    mesh.activity.rates["m"] = 0.1  # below half the threshold, even on one copy
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]  # the newest copy went: the older one is warm
    d = mesh.decision("m")
    assert d.action == "copy_dropped" and d.instance_id == "b" and "cooled to 0.10 req/s" in d.reason
    mesh.activity.rates["m"] = 0.0
    for _ in range(3):
        mesh.clock.advance(100)
        await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_warm_model_between_thresholds_keeps_its_copies(mesh: Mesh) -> None:
    for pod in "ab":
        mesh.world.pod(pod, 100)
    mesh.model("m")
    mesh.loaded("m", "a")
    mesh.loaded("m", "b")
    mesh.activity.rates["m"] = 1.5  # 0.75 per copy: not hot; 1.5 on one copy: not cool (hysteresis)
    await mesh.reconcile()
    assert mesh.on("m") == ["a", "b"]


async def test_cooled_copies_never_go_below_min_copies(mesh: Mesh) -> None:
    for pod in "abc":
        mesh.world.pod(pod, 100)
    mesh.model("m", min_copies=2)
    for pod in "abc":
        mesh.loaded("m", pod)
    mesh.activity.rates["m"] = 0.0
    for _ in range(3):
        mesh.clock.advance(100)
        await mesh.reconcile()
    assert len(mesh.on("m")) == 2
    assert mesh.decision("m").action == "copy_dropped"


async def test_churn_guard_keeps_a_fresh_copy(mesh: Mesh) -> None:
    for pod in "ab":
        mesh.world.pod(pod, 100)
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=5)
    mesh.loaded("m", "b", ago_s=5)  # both loaded 5 s ago; the guard is 30 s
    mesh.activity.rates["m"] = 0.0
    await mesh.reconcile()
    assert mesh.on("m") == ["a", "b"] and "m" not in mesh.world.state.decisions
    mesh.clock.advance(30)
    await mesh.reconcile()
    assert len(mesh.on("m")) == 1 and mesh.decision("m").action == "copy_dropped"


async def test_the_only_loaded_copy_is_not_dropped_while_another_loads(mesh: Mesh) -> None:
    """Regression: 'never the last' counted assigned copies, so with one LOADED copy and one
    still LOADING the loaded one was dropped, leaving the model with no ready copy."""
    for pod in "ab":
        mesh.world.pod(pod, 100)
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=1000)
    mesh.loaded("m", "b", ago_s=1000, state=CopyState.LOADING)
    mesh.activity.rates["m"] = 0.0
    await mesh.reconcile()
    assert mesh.on("m") == ["a", "b"]
    assert mesh.world.state.ready_copies("m")


@pytest.mark.parametrize("failure", ["down", "raises"])
async def test_telemetry_gap_drops_nothing(mesh: Mesh, failure: str) -> None:
    """Redis down (snapshot None) or the reader failing: no copy is dropped for lack of data."""
    for pod in "ab":
        mesh.world.pod(pod, 1000)
    for i in range(5):
        mesh.model(f"m{i}")
        mesh.loaded(f"m{i}", "a")
        mesh.loaded(f"m{i}", "b")
    setattr(mesh.activity, failure, True)
    for _ in range(3):
        mesh.clock.advance(100)
        await mesh.reconcile()
    assert all(mesh.on(f"m{i}") == ["a", "b"] for i in range(5))
    assert mesh.ctl.last_activity is None
    assert not mesh.world.state.decisions


# -- min_copies ----------------------------------------------------------------------------------


async def test_min_copies_are_kept_even_when_idle(mesh: Mesh) -> None:
    for pod in "abc":
        mesh.world.pod(pod, 100)
    mesh.model("m", min_copies=2)
    mesh.activity.down = True  # no telemetry needed
    await mesh.reconcile()
    await mesh.reconcile()
    assert len(mesh.on("m")) == 2
    d = mesh.decision("m")
    assert d.action == "copy_added" and "min_copies is 2" in d.reason


# -- dead pods -----------------------------------------------------------------------------------


async def test_dead_pods_recently_used_models_are_replaced(mesh: Mesh) -> None:
    mesh.world.pod("a", 100)
    mesh.world.pod("dead", 100)
    for m in ("recent", "stale", "copied"):
        mesh.model(m)
        mesh.loaded(m, "dead")
    mesh.loaded("copied", "a")  # still has a live copy: nothing to re-place
    mesh.activity.last_used = {"recent": mesh.now - 10_000, "stale": mesh.now - 1000_000,
                               "copied": mesh.now - 10_000}
    await mesh.reconcile()  # telemetry read
    mesh.world.kill("dead")
    await mesh.reconcile()
    assert "dead" not in mesh.world.state.assignments
    assert mesh.on("recent") == ["a"] and mesh.on("stale") == [] and mesh.on("copied") == ["a"]
    d = mesh.decision("recent")
    assert d.action == "replaced" and d.instance_id == "a" and "its pod died" in d.reason


async def test_first_pass_of_a_new_leader_reads_telemetry_before_replacing(mesh: Mesh) -> None:
    """Regression: the dead pod's models were chosen by the telemetry of the PREVIOUS pass,
    so a leader's first pass (none yet) re-placed nothing."""
    mesh.world.pod("a", 100)
    mesh.world.pod("dead", 100)
    mesh.model("recent")
    mesh.loaded("recent", "dead")
    mesh.activity.last_used = {"recent": mesh.now - 10_000}
    mesh.world.kill("dead")
    await mesh.reconcile()
    assert mesh.on("recent") == ["a"] and mesh.decision("recent").action == "replaced"


async def test_replacement_never_evicts(mesh: Mesh) -> None:
    mesh.world.pod("a", 100)
    mesh.world.pod("dead", 100)
    mesh.model("resident", size=90)
    mesh.loaded("resident", "a", size=90)
    mesh.model("recent", size=20)
    mesh.loaded("recent", "dead", size=20)
    mesh.activity.last_used = {"recent": mesh.now - 1000, "resident": mesh.now - 900_000}
    await mesh.reconcile()
    mesh.world.kill("dead")
    await mesh.reconcile()
    assert mesh.on("resident") == ["a"] and mesh.on("recent") == []
    assert "resident" not in mesh.world.state.decisions


async def test_replacements_are_bounded_per_pass_and_finished_later() -> None:
    """Regression: re-placements beyond max_actions_per_pass were forgotten (the dead pod's
    assignments were already deleted), so only the first few models ever came back."""
    mesh = Mesh(max_actions_per_pass=2)
    try:
        mesh.world.pod("a", 1000)
        mesh.world.pod("dead", 1000)
        for i in range(5):
            mesh.model(f"m{i}")
            mesh.loaded(f"m{i}", "dead")
            mesh.activity.last_used[f"m{i}"] = mesh.now - 1000 * (i + 1)  # m0 most recent
        await mesh.reconcile()
        mesh.world.kill("dead")
        await mesh.reconcile()
        assert [m for m in (f"m{i}" for i in range(5)) if mesh.on(m)] == ["m0", "m1"]
        await mesh.reconcile()
        await mesh.reconcile()
        assert all(mesh.on(f"m{i}") == ["a"] for i in range(5))
        assert all(mesh.decision(f"m{i}").action == "replaced" for i in range(5))
    finally:
        await mesh.close()


async def test_replacements_respect_room_even_before_the_view_catches_up() -> None:
    """Regression: several models re-placed in one pass were planned against a view that did
    not yet show the pass's own earlier writes (etcd's watch lags the write), so they all went
    to the same 'most free' pod and overcommitted it."""
    mesh = Mesh(lagging=True)
    try:
        mesh.world.pod("a", 100)
        mesh.world.pod("b", 100)
        mesh.world.pod("dead", 1000)
        for i in range(3):
            mesh.model(f"m{i}", size=60)
            mesh.loaded(f"m{i}", "dead", size=60)
            mesh.activity.last_used[f"m{i}"] = mesh.now - 1000 * (i + 1)
        await mesh.reconcile()
        mesh.world.kill("dead")
        await mesh.settle()
        await mesh.reconcile()
        placed = {m: mesh.on(m) for m in ("m0", "m1", "m2")}
        assert placed["m0"] and placed["m1"] and placed["m0"] != placed["m1"], placed
        assert placed["m2"] == [], placed  # no room left without evicting
    finally:
        await mesh.close()


async def test_a_replaced_min_copies_model_is_not_copied_twice_in_one_pass() -> None:
    """Regression (with the lagging view): a model re-placed in a pass was counted again by
    the min_copies rule of the same pass, which saw no copy yet and added a second."""
    mesh = Mesh(lagging=True)
    try:
        for pod in ("a", "b", "dead"):
            mesh.world.pod(pod, 100)
        mesh.model("m", min_copies=1)
        mesh.loaded("m", "dead")
        mesh.activity.last_used["m"] = mesh.now - 1000
        await mesh.reconcile()
        mesh.world.kill("dead")
        await mesh.settle()
        await mesh.reconcile()
        assert len(mesh.on("m")) == 1
    finally:
        await mesh.close()
