"""Scale to zero (placement/idle.py via the reconcile pass) over an in-memory MeshState.

A model with min_copies 0 idle past its TTL (its own idle_unload_s, else the setting) loses
every copy with an "idle_unloaded" Decision; a model used within the TTL, held by min_copies,
still loading, on a pod that does not answer GetUsage, or with a request in flight keeps its
copies; the default 0 keeps today's behaviour. Time is a FakeClock; telemetry a fake source.
"""

from __future__ import annotations

import pytest

from mesh.types import CopyState, ModelSpec
from placement.idle import idle_models, ttl_ms
from placement.usage import Usage
from tests.unit.placement.test_copies import Mesh


@pytest.fixture
async def mesh():
    m = Mesh(idle_unload_s=60.0, copy_rate_per_s=0.0)
    m.world.pod("a", 100)
    m.world.pod("b", 100)
    yield m
    await m.close()


def answer(mesh: Mesh, pod: str, model: str, used_ago_s: float, in_flight: int = 0) -> None:
    mesh.ctl.usage.answers[f"addr-{pod}"] = {model: Usage(mesh.now - int(used_ago_s * 1000), in_flight)}  # type: ignore[attr-defined]


async def test_idle_model_loses_its_last_copy_with_a_decision_and_a_metric(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    mesh.activity.last_used["m"] = mesh.now - 90_000
    answer(mesh, "a", "m", used_ago_s=90)
    await mesh.reconcile()
    assert mesh.on("m") == []
    d = mesh.decision("m")
    assert d.action == "idle_unloaded" and d.instance_id == "a" and "60s" in d.reason
    assert mesh.ctl.metrics.evictions.labels("idle")._value.get() == 1


async def test_every_copy_of_an_idle_model_goes(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    mesh.loaded("m", "b", ago_s=120)
    answer(mesh, "a", "m", used_ago_s=100)
    answer(mesh, "b", "m", used_ago_s=100)
    await mesh.reconcile()
    assert mesh.on("m") == []


async def test_model_used_within_its_ttl_stays(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    mesh.activity.last_used["m"] = mesh.now - 10_000
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]
    assert mesh.ctl.usage.calls == 0  # type: ignore[attr-defined] - not a candidate: no pod asked


async def test_a_use_only_the_pod_saw_keeps_the_model(mesh: Mesh) -> None:
    """Telemetry lags (or Redis is down): the pod's own recency is asked before unloading."""
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    mesh.activity.down = True
    answer(mesh, "a", "m", used_ago_s=1)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_without_telemetry_the_pods_answers_suffice(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    mesh.activity.down = True
    answer(mesh, "a", "m", used_ago_s=100)
    await mesh.reconcile()
    assert mesh.on("m") == []


async def test_a_pod_that_does_not_answer_keeps_its_models(mesh: Mesh) -> None:
    """A gap in what placement knows is never idleness."""
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    await mesh.reconcile()  # no GetUsage answer from pod a
    assert mesh.on("m") == ["a"]


async def test_request_in_flight_keeps_the_model(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120)
    answer(mesh, "a", "m", used_ago_s=100, in_flight=1)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_min_copies_is_never_idle_unloaded(mesh: Mesh) -> None:
    mesh.model("m", min_copies=1, idle_unload_s=5)
    mesh.loaded("m", "a", ago_s=120)
    answer(mesh, "a", "m", used_ago_s=100)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_a_copy_still_loading_is_not_undone(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=120, state=CopyState.LOADING)
    answer(mesh, "a", "m", used_ago_s=100)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_a_fresh_load_is_not_idle_before_telemetry_shows_its_request(mesh: Mesh) -> None:
    mesh.model("m")
    mesh.loaded("m", "a", ago_s=5)
    answer(mesh, "a", "m", used_ago_s=1000)
    await mesh.reconcile()
    assert mesh.on("m") == ["a"]


async def test_the_models_own_ttl_overrides_the_default() -> None:
    m = Mesh(copy_rate_per_s=0.0)  # default off
    try:
        m.world.pod("a", 100)
        m.model("short", idle_unload_s=10)
        m.model("plain")
        for model in ("short", "plain"):
            m.loaded(model, "a", ago_s=120)
        m.ctl.usage.answers["addr-a"] = {}  # type: ignore[attr-defined] - the pod saw no use
        await m.reconcile()
        assert m.on("short") == [] and m.on("plain") == ["a"]
    finally:
        await m.close()


async def test_default_zero_keeps_the_last_copy_forever() -> None:
    m = Mesh(copy_rate_per_s=0.0)
    try:
        m.world.pod("a", 100)
        m.model("m")
        m.loaded("m", "a", ago_s=10_000)
        m.ctl.usage.answers["addr-a"] = {}  # type: ignore[attr-defined]
        await m.reconcile()
        assert m.on("m") == ["a"]
    finally:
        await m.close()


def test_ttl_rules() -> None:
    assert ttl_ms(ModelSpec("m", "file:///m"), 0.0) == 0
    assert ttl_ms(ModelSpec("m", "file:///m"), 30.0) == 30_000
    assert ttl_ms(ModelSpec("m", "file:///m", idle_unload_s=5), 30.0) == 5_000
    assert ttl_ms(ModelSpec("m", "file:///m", idle_unload_s=5, min_copies=1), 30.0) == 0


def test_idle_models_is_pure_and_ordered() -> None:
    specs = {m: ModelSpec(m, "file:///m") for m in ("b", "a", "c")}
    assigned = {"b": ["p"], "a": ["p"], "c": ["p"]}
    from mesh.types import CopyRecord
    copies = {m: {"p": CopyRecord(m, "p", "x", CopyState.LOADED, updated_unix_ms=0)} for m in specs}
    used = {"c": 95_000}
    out = idle_models(specs, assigned, copies, lambda m: used.get(m, 0), 100_000, 10.0)
    assert out == ["a", "b"]
