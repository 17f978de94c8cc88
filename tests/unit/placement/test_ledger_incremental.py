"""The incremental ledger books exactly what a rebuild from scratch books.

Regression (issue 8, fleet run): the ledger rebuilt every pod's view from all assignments and
copies on every decision, O(resident copies) per miss, so the 10,000-model fleet run slowed
to ~4 placements/s past ~5,500 copies. Now per-pod sums are kept up to date on each change;
this checks, over random sequences of changes (assignments put and deleted, copy reports in
every state, pods coming, going and reporting their use, own writes recorded and then shown
or not by the view, specs (tenants included) and stats changing, models unregistered), that after every step the views, sums and
lookups equal the scanning algorithm the ledger had before (`reference_view` below, kept
verbatim in its logic), and that the prior's incremental lists equal a fresh Prior's.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import types
from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.types import Assignment, CopyState
from placement import planner
from placement.controller import Controller
from placement.ledger import Ledger
from placement.prior import Prior
from placement.usage import Usage
from tests.unit.placement.fakes import FakeLeader, FakeUsage, World

PODS = ("a", "b", "c")
MODELS = ("m1", "m2", "m3", "m4")
USAGE = {"m2": Usage(last_used_ms=5, in_flight=1), "m3": Usage(last_used_ms=9, in_flight=0)}


# -- the ledger's algorithm before it was incremental (scan everything, every time) -------------

def _assignments(ledger: Ledger, instance_id: str) -> dict[str, Assignment]:
    out = dict(ledger.state.assignments.get(instance_id, {}))
    for own in ledger._own.values():
        if own.instance_id == instance_id:
            if own.record is None:
                out.pop(own.model_id, None)
            else:
                out[own.model_id] = own.record
    return out


def _assigned(ledger: Ledger, model_id: str) -> list[str]:
    out = set(ledger.state.assigned_instances(model_id))
    for own in ledger._own.values():
        if own.model_id == model_id:
            if own.record is None:
                out.discard(own.instance_id)
            else:
                out.add(own.instance_id)
    return sorted(out)


def _live(ledger: Ledger, model_id: str) -> list[str]:
    return [i for i in _assigned(ledger, model_id) if i in ledger.state.instances]


def reference_view(ledger: Ledger, instance_id: str, usage: dict[str, Usage] | None) -> planner.PodView:
    ctl, st_, keys = ledger.ctl, ledger.state, ledger.keys
    inst = st_.instances[instance_id]
    models = []
    measured = 0
    for model_id, assignment in sorted(_assignments(ledger, instance_id).items()):
        akey = keys.assignment(instance_id, model_id)
        copy = None if akey in ledger._own else st_.copies.get(model_id, {}).get(instance_id)
        state = copy.state if copy is not None else None
        if copy is not None and state in (CopyState.LOADED, CopyState.UNLOADING):
            size, loaded = copy.size_bytes or assignment.predicted_bytes or ledger.size(model_id).bytes, True
            measured += copy.size_bytes
        elif (copy is not None and state is CopyState.FAILED
              and st_.mod_revision(keys.copy(model_id, instance_id)) > st_.mod_revision(akey)):
            size, loaded = 0, True
        else:
            size, loaded = assignment.predicted_bytes or ledger.size(model_id).bytes, False
        used = (usage or {}).get(model_id)
        fallback_ms = copy.updated_unix_ms if copy else assignment.assigned_unix_ms
        act = (ctl.last_activity or {}).get(model_id)
        last_used = max(used.last_used_ms if used else fallback_ms, act.last_used_ms if act else 0)
        spec = st_.models.get(model_id)
        models.append(planner.PodModel(
            model_id, size, last_used_ms=last_used, in_flight=used.in_flight if used else 0, loaded=loaded,
            loaded_unix_ms=copy.updated_unix_ms if copy else assignment.assigned_unix_ms,
            value=ctl.book.value(model_id) if ctl.last_activity is not None else 0.0,
            frequency=ctl.frequency(model_id),
            pinned=(spec is not None and spec.min_copies > 0 and 0 < len(_live(ledger, model_id)) <= spec.min_copies),
            tenant=spec.tenant if spec is not None else "",
        ))
    held = max(0, inst.used_bytes - measured)
    return planner.PodView(instance_id, inst.capacity_bytes, tuple(models), held_bytes=held)


# -- random changes -----------------------------------------------------------------------------

pod = st.sampled_from(PODS)
model = st.sampled_from(MODELS)
step = st.one_of(
    st.tuples(st.just("assign"), pod, model, st.sampled_from([0, 10, 40])),
    st.tuples(st.just("unassign"), pod, model),
    st.tuples(st.just("copy"), pod, model, st.sampled_from(list(CopyState)), st.sampled_from([0, 7, 30])),
    st.tuples(st.just("uncopy"), pod, model),
    st.tuples(st.just("pod"), pod, st.sampled_from([50, 100]), st.sampled_from([0, 20, 90, 200]),
              st.sampled_from(["cpu", "gpu"])),
    st.tuples(st.just("kill"), pod),
    st.tuples(st.just("own_put"), pod, model, st.sampled_from([0, 15])),
    st.tuples(st.just("own_delete"), pod, model),
    st.tuples(st.just("expire")),
    st.tuples(st.just("spec"), model, st.sampled_from([0, 1]), st.sampled_from([0, 5, 12]), st.sampled_from(["", "t"])),
    st.tuples(st.just("unregister"), model),
    st.tuples(st.just("stats"), model, st.sampled_from([0, 25])),
    st.tuples(st.just("book"), model),
)


def _apply(world: World, ctl: Controller, s: tuple) -> None:
    keys, kind = world.keys, s[0]
    if kind == "assign":
        world.put(keys.assignment(s[1], s[2]), Assignment(s[2], s[1], "file:///x", predicted_bytes=s[3],
                                                          assigned_unix_ms=3))
    elif kind == "unassign":
        world.view.apply([(keys.assignment(s[1], s[2]), None)])
    elif kind == "copy":
        world.put(keys.copy(s[2], s[1]), types.CopyRecord(s[2], s[1], "addr", s[3], s[4], updated_unix_ms=4))
    elif kind == "uncopy":
        world.view.apply([(keys.copy(s[2], s[1]), None)])
    elif kind == "pod":
        world.put(keys.instance(s[1]), types.InstanceRecord(s[1], f"addr-{s[1]}", s[2], used_bytes=s[3],
                                                            device=s[4]))
    elif kind == "kill":
        world.kill(s[1])
    elif kind == "own_put":
        record = Assignment(s[2], s[1], "file:///x", predicted_bytes=s[3], assigned_unix_ms=7)
        ctl.ledger.record([(s[1], s[2], record)], world.view.revision)
    elif kind == "own_delete":
        ctl.ledger.record([(s[1], s[2], None)], world.view.revision)
    elif kind == "expire":
        ctl.ledger.expire()
    elif kind == "spec":
        world.put(keys.model(s[1]), types.ModelSpec(s[1], "file:///x", min_copies=s[2], artifact_bytes=s[3],
                                                    tenant=s[4]))
    elif kind == "unregister":
        world.view.apply([(keys.model(s[1]), None)])
    elif kind == "stats":
        world.put(keys.stats(s[1]), types.ModelStats(s[1], size_bytes=s[2], artifact_bytes=4))
    elif kind == "book":
        ctl.book.touch(s[1], 10, 1)
        ctl.last_activity = {}


def _check(ctl: Controller) -> None:
    ledger, state = ctl.ledger, ctl.state
    for instance_id in sorted(state.instances):
        for usage in (None, USAGE):
            want = reference_view(ledger, instance_id, usage)
            got = ledger.pod_view(instance_id, usage)
            assert (got.capacity_bytes, got.held_bytes, got.used_bytes) == \
                (want.capacity_bytes, want.held_bytes, want.used_bytes), instance_id
            assert tuple(got.models) == want.models, instance_id
            assert all(got.holds(m) == want.holds(m) for m in MODELS)
        assert ledger.measured_use(instance_id) == want.held_bytes + sum(m.bytes for m in want.models if m.loaded)
    assert ledger.in_flight() == sum(1 for i in state.instances for m in reference_view(ledger, i, None).models
                                     if not m.loaded)
    for tenant in ("", "t"):  # a model unregistered counts for no tenant
        assert ledger.tenant_bytes(tenant) == sum(
            m.bytes for i in state.instances for m in reference_view(ledger, i, None).models
            if m.model_id in state.models and state.models[m.model_id].tenant == tenant)
    for model_id in MODELS:
        assert ledger.assigned_instances(model_id) == _assigned(ledger, model_id)
        assert ledger.live_copies(model_id) == _live(ledger, model_id)
    for instance_id in PODS:
        assert ledger.assignments(instance_id) == _assignments(ledger, instance_id)
    fresh = Prior(state, ctl.settings)
    assert fresh._samples == ledger.prior._samples
    for kind in ("cpu", "gpu"):
        assert ledger.prior.overhead(kind) == fresh.overhead(kind)
        assert ledger.prior._learned(kind) == fresh._learned(kind)
        for model_id in MODELS:
            assert ledger.prior.size(model_id, {kind}) == fresh.size(model_id, {kind})


async def _run(steps: list[tuple]) -> None:
    world = World()
    for instance_id in PODS[:2]:
        world.pod(instance_id, 100)
    for model_id in MODELS:
        world.model(model_id)
    ctl = Controller(world.state, FakeLeader(world.view), PlacementSettings(prior_min_samples=2),
                     Metrics(), FakeUsage(), clock=FakeClock())
    try:
        _check(ctl)
        for s in steps:
            _apply(world, ctl, s)
            _check(ctl)
        ctl.ledger.expire()
        _check(ctl)
        before = {i: tuple(ctl.ledger.pod_view(i).models) for i in world.state.instances}
        ctl.ledger.rebuild()
        assert before == {i: tuple(ctl.ledger.pod_view(i).models) for i in world.state.instances}
    finally:
        await ctl.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=40))
def test_incremental_views_equal_a_rebuild(steps: list[tuple]) -> None:
    asyncio.run(_run(steps))


def test_a_view_walked_after_a_change_is_refused() -> None:
    """Views' models are built on demand; walking one after the pod changed would mix two
    states (the sums are from before, the models from after), so it raises instead."""
    async def check() -> None:
        world = World()
        world.pod("a", 100)
        world.model("m")
        ctl = Controller(world.state, FakeLeader(world.view), PlacementSettings(), Metrics(), FakeUsage(),
                         clock=FakeClock())
        view = ctl.ledger.pod_view("a")
        world.put(world.keys.assignment("a", "m"), Assignment("m", "a", "file:///x", predicted_bytes=5))
        try:
            try:
                tuple(view.models)
            except RuntimeError as exc:
                assert "after the ledger changed" in str(exc)
            else:
                raise AssertionError("a stale view was walked")
            assert tuple(m.model_id for m in ctl.ledger.pod_view("a").models) == ("m",)
        finally:
            await ctl.close()

    asyncio.run(check())
