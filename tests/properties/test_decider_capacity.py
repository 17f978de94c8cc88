"""Property: whatever the interleaving of misses, watch deliveries, loads and failures, the
decider never books a pod beyond its capacity — summed over what etcd holds: the measured size
of each LOADED copy plus the predicted bytes of each assignment still in flight.

Runs the REAL View and MeshState over a MemoryStore held in manual mode: Hypothesis chooses
when the watch delivers (random lags), which misses arrive, and which loads succeed or fail.
A check at the end shows the property can fail: with the ledger's own-write tracking and the
pod fence both switched off (the code before the decider), the same checker catches the
double-booking.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import types
from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import CopyState
from placement.controller import Controller
from placement.ledger import Ledger
from tests.unit.placement.fakes import FakeUsage, StoreWorld

PODS = {"a": 100, "b": 100, "c": 70}
# model -> (measured size known to placement, artifact bytes, true size once loaded)
MODELS = {
    "k20": (20, 0, 20), "k35": (35, 0, 35), "k60": (60, 0, 60), "k45": (45, 0, 45),
    "u5": (0, 5, 10), "u10": (0, 10, 20), "u15": (0, 15, 30), "u25": (0, 25, 50),
}  # unknown ones measure 2 x their artifact: the learned ratio (2) never under-predicts them

step = st.one_of(
    st.tuples(st.just("miss"), st.sampled_from(sorted(MODELS))),
    st.tuples(st.just("deliver"), st.integers(1, 4)),
    st.tuples(st.just("report"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("run"), st.integers(1, 5)),
)


async def _spin(n: int = 8) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _violation(world: StoreWorld) -> str | None:
    booked = world.booked()
    over = {p: b for p, b in booked.items() if b > PODS.get(p, 0)}
    return f"over capacity: {over} (capacities {PODS})" if over else None


async def _run(steps: list[tuple], reserve: bool = True) -> str | None:
    world = StoreWorld()
    for pod, cap in PODS.items():
        world.pod(pod, cap)
    for m, (size, artifact, _) in MODELS.items():
        world.model(m, size=size, artifact=artifact)
    await world.start()
    world.store.hold()
    ctl = Controller(world.state, world.leader, PlacementSettings(load_timeout_s=30, prior_ratio=2.0),
                     Metrics(), FakeUsage(), clock=FakeClock())
    if not reserve:
        ctl.ledger.track_own_writes = False
        ctl.ledger.fence = lambda instance_id: []  # type: ignore[method-assign]
    tasks: list[asyncio.Task] = []
    try:
        for s in steps:
            kind = s[0]
            if kind == "miss":
                tasks.append(asyncio.create_task(ctl.ensure_loaded(s[1], 30)))
            elif kind == "deliver":
                for _ in range(s[1]):
                    world.store.release_next()
            elif kind == "report":
                copies = world.copies()
                waiting = sorted((i, m) for i, ms in world.assignments().items() for m in ms
                                 if (m, i) not in copies or copies[(m, i)].state is CopyState.LOADING)
                if waiting:
                    instance_id, model_id = waiting[s[1] % len(waiting)]
                    if s[2]:
                        world.report(model_id, instance_id, CopyState.LOADED, MODELS[model_id][2])
                    else:
                        world.report(model_id, instance_id, CopyState.FAILED, error="boom")
            await _spin(8 if kind != "run" else 8 * s[1])
            found = _violation(world)
            if found:
                return found
        world.store.release()
        await _spin(40)
        return _violation(world)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ctl.close()
        await world.close()


async def _guarded(steps: list[tuple]) -> str | None:
    """_run bounded in time: an example that stalls fails with every task's stack printed
    (once seen in a whole-suite run, never reproduced alone) instead of hanging the suite."""
    task = asyncio.ensure_future(_run(steps))
    done, _ = await asyncio.wait({task}, timeout=60)
    if not done:
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.print_stack(limit=8, file=sys.stderr)
        task.cancel()
        pytest.fail(f"example stalled for 60 s: {steps}")
    return task.result()


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40))
def test_capacity_is_never_exceeded(steps: list[tuple]) -> None:
    assert asyncio.run(_guarded(steps)) is None


DOUBLE_BOOKING = [("miss", "k60"), ("miss", "k45"), ("miss", "u25"), ("miss", "k35"), ("deliver", 4)]


@pytest.mark.parametrize("reserve", [True, False])
def test_the_property_can_fail(reserve: bool) -> None:
    """Concurrent misses before the watch delivers anything: with reservations and the fence
    the decider spreads them; without (planning on the view alone) it double-books pod a."""
    found = asyncio.run(_run(DOUBLE_BOOKING, reserve=reserve))
    if reserve:
        assert found is None
    else:
        assert found is not None and "'a'" in found, found
    assert Ledger.track_own_writes  # the switch is per ledger, not global


def test_the_checker_counts_what_etcd_holds() -> None:
    """booked() sums LOADED measurements and in-flight predictions, not FAILED copies."""
    async def check() -> dict[str, int]:
        world = StoreWorld()
        await world.start()
        for m, pred in (("x", 30), ("y", 40), ("z", 50)):
            world.put(world.keys.assignment("a", m), types.Assignment(m, "a", "file:///x", predicted_bytes=pred))
        world.report("x", "a", CopyState.LOADED, 10)
        world.report("y", "a", CopyState.FAILED, error="boom")
        booked = world.booked()
        await world.close()
        return booked

    assert asyncio.run(check()) == {"a": 10 + 50}
