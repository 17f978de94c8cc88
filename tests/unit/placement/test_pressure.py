"""Memory pressure (placement/pressure.py): the autoscaling signal and the idle-at-eviction
observation, over a plain state object and the fake clock."""

from __future__ import annotations

import types as pytypes

from mesh.clock import FakeClock
from mesh.errors import NoCapacity, Unavailable
from mesh.metrics import Metrics
from mesh.types import CopyRecord, CopyState, InstanceRecord, ModelSpec
from placement.planner import PodModel, PodView
from placement.pressure import Pressure
from placement.tenancy import TenantCapReached

MiB = 1 << 20


class Leading:
    is_leader = True


def world(clock: FakeClock) -> tuple[pytypes.SimpleNamespace, Pressure, Metrics]:
    state = pytypes.SimpleNamespace(
        instances={"p1": InstanceRecord("p1", "a:1", 100 * MiB, used_bytes=90 * MiB),
                   "p2": InstanceRecord("p2", "a:2", 100 * MiB, used_bytes=70 * MiB),
                   "gone": InstanceRecord("gone", "a:3", 100 * MiB, used_bytes=10 * MiB, draining=True)},
        copies={}, models={m: ModelSpec(m, "file:///x.onnx", tenant=m.partition(":")[0] if ":" in m else "")
                           for m in ("big", "hot", "cold", "t:m")})
    metrics = Metrics(service="placement", tenant_labels=True)
    p = Pressure(state, Leading(), clock, metrics, window_s=300, hot_s=60)  # type: ignore[arg-type]
    p.export()
    return state, p, metrics


def test_unplaced_and_hot_evicted_models_count_until_held_or_expired() -> None:
    clock = FakeClock()
    state, p, metrics = world(clock)
    f = p.figures()
    assert (f.pods, f.capacity_bytes, f.used_bytes, f.unplaced_bytes) == (2, 200 * MiB, 160 * MiB, 0)  # draining left out
    p.refused("big", 80 * MiB, NoCapacity("no room"))
    p.refused("cold", 5 * MiB, Unavailable("lost leadership"))  # not a lack of room
    p.refused("t:m", 5 * MiB, TenantCapReached("cap"))  # more pods would not lift a tenant's cap
    now = clock.unix_ms()
    p.evicted([PodModel("hot", 30 * MiB, last_used_ms=now - 5_000),
               PodModel("cold", 40 * MiB, last_used_ms=now - 3_600_000)], now)
    f = p.figures()
    assert f.unplaced_bytes == 110 * MiB and f.wanted_bytes == 270 * MiB
    assert abs(f.ratio - 270 / 200) < 1e-9
    assert metrics.registry.get_sample_value("mesh_placement_pressure_ratio") == f.ratio
    assert metrics.registry.get_sample_value("mesh_placement_unplaced_bytes") == 110 * MiB
    # idle at eviction observed, ours and ModelMesh's
    assert metrics.registry.get_sample_value("mesh_eviction_idle_seconds_count") == 2
    assert metrics.registry.get_sample_value("mesh_eviction_idle_seconds_sum") == 5 + 3600
    assert metrics.registry.get_sample_value("modelmesh_age_at_eviction_milliseconds_count") == 2
    # "hot" loads again somewhere: no longer wanted
    state.copies["hot"] = {"p2": CopyRecord("hot", "p2", "a:2", CopyState.LOADING)}
    assert p.figures().unplaced_bytes == 80 * MiB
    clock.advance(301)
    assert p.figures().unplaced_bytes == 0  # the window passed


def test_a_standby_reports_no_unplaced_bytes_and_no_model_counts() -> None:
    clock = FakeClock()
    state, p, metrics = world(clock)
    p.refused("big", 80 * MiB, NoCapacity("no room"))
    state.copies["t:m"] = {"p1": CopyRecord("t:m", "p1", "a:1", CopyState.LOADED, size_bytes=7 * MiB),
                           "p2": CopyRecord("t:m", "p2", "a:2", CopyState.FAILED)}
    assert metrics.registry.get_sample_value("modelmesh_models_managed_total") == 4
    assert metrics.registry.get_sample_value("modelmesh_models_loaded_total") == 1
    assert metrics.registry.get_sample_value("modelmesh_models_with_failure_total") == 1
    assert metrics.registry.get_sample_value("mesh_tenant_memory_bytes", {"tenant": "t"}) == 7 * MiB
    Leading.is_leader = False
    try:
        assert p.figures().unplaced_bytes == 0
        assert metrics.registry.get_sample_value("modelmesh_models_managed_total") == 0
    finally:
        Leading.is_leader = True


def test_evicted_from_picks_the_victims_of_a_pod_view() -> None:
    clock = FakeClock()
    _, p, metrics = world(clock)
    now = clock.unix_ms()
    pod = PodView("p1", 100 * MiB, (PodModel("hot", 10 * MiB, last_used_ms=now - 1000), PodModel("cold", 10 * MiB)))
    p.evicted_from(pod, ["hot"], now)
    assert metrics.registry.get_sample_value("mesh_eviction_idle_seconds_count") == 1
    assert p.figures().unplaced_bytes == 10 * MiB
