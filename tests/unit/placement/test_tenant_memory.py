"""Tenants' memory shares in the decider (issue 10 item 2, placement part; placement/tenancy.py):
another tenant's load never evicts a tenant below its reserved share, and a load that would put
its tenant over its cap evicts that tenant's own least valuable copies first, or fails with
RESOURCE_EXHAUSTED naming the cap. Through the real View and MeshState over a MemoryStore.
Without the feature each of these tests fails: plain eviction takes the cheapest copy whoever
owns it, and a cap is never looked at."""

from __future__ import annotations

import asyncio

import pytest

from mesh.errors import Kind, NoCapacity
from mesh.types import TenantSpec
from placement.tenancy import TenantCapReached
from placement.usage import Usage
from tests.unit.placement.fakes import StoreWorld
from tests.unit.placement.test_decider import WAIT, Pods, make

MiB = 1 << 20


def recency(ctl, address: str, **last_used_ms: int) -> None:  # type: ignore[no-untyped-def]
    """The pod's GetUsage answer: model -> last use (older goes first among equals)."""
    ctl.usage.answers[address] = {m: Usage(last_used_ms=t, in_flight=0) for m, t in last_used_ms.items()}


async def test_another_tenants_load_never_evicts_below_a_reserved_share() -> None:
    """Tenant A (reserved 60) holds 90 bytes; B's 60-byte model needs room on the full pod.
    A's idle copies are the cheapest victims (used longest ago), but only 30 of A's bytes are
    above its reserve: one of A's copies goes and B's own idle copy makes up the rest."""
    world = StoreWorld()
    world.pod("p", 120)
    world.put(world.keys.tenant("A"), TenantSpec("A", memory_reserved_bytes=60))
    for m in ("a1", "a2", "a3"):
        world.model(m, size=30, tenant="A")  # type: ignore[arg-type]
    world.model("b1", size=30, tenant="B")  # type: ignore[arg-type]
    world.model("b2", size=60, tenant="B")  # type: ignore[arg-type]
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("a1", "a2", "a3", "b1"):
            await ctl.ensure_loaded(m, WAIT)
        await world.settle()
        recency(ctl, "addr-p", a1=1, a2=2, a3=3, b1=9)
        await ctl.ensure_loaded("b2", WAIT)
        left = sorted(world.assignments()["p"])
        assert left == ["a2", "a3", "b2"], left  # a1 (above the reserve) and b1 went; A keeps 60
    finally:
        await ctl.close()
        await world.close()


async def test_a_tenant_at_its_reserve_is_not_evicted_and_the_load_fails_instead() -> None:
    """A holds exactly its reserved 60 bytes on the only pod; B's load finds nothing it may
    evict: RESOURCE_EXHAUSTED (no other tenant's name in the message), A untouched."""
    world = StoreWorld()
    world.pod("p", 100)
    world.put(world.keys.tenant("A"), TenantSpec("A", memory_reserved_bytes=60))
    for m in ("a1", "a2"):
        world.model(m, size=30, tenant="A")  # type: ignore[arg-type]
    world.model("b1", size=50, tenant="B")  # type: ignore[arg-type]
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("a1", "a2"):
            await ctl.ensure_loaded(m, WAIT)
        await world.settle()
        with pytest.raises(NoCapacity) as err:
            await ctl.ensure_loaded("b1", WAIT)
        assert err.value.kind is Kind.RESOURCE_EXHAUSTED
        assert "'A'" not in err.value.message, err.value.message
        assert sorted(world.assignments()["p"]) == ["a1", "a2"]
    finally:
        await ctl.close()
        await world.close()


async def test_a_load_over_the_tenants_cap_evicts_its_own_least_valuable_copies_first() -> None:
    """Tenant A's cap is 2 MiB; A holds two 1 MiB copies on roomy pods and a third misses. The
    pods have room, yet A's copy used longest ago goes (on whichever pod it is), not B's."""
    world = StoreWorld()
    world.pod("p", 64 * MiB)
    world.pod("q", 64 * MiB)
    world.put(world.keys.tenant("A"), TenantSpec("A", memory_cap_bytes=2 * MiB))
    for m in ("a1", "a2", "a3"):
        world.model(m, size=MiB, tenant="A")  # type: ignore[arg-type]
    world.model("b1", size=MiB, tenant="B")  # type: ignore[arg-type]
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        for m in ("b1", "a1", "a2"):
            await ctl.ensure_loaded(m, WAIT)
        await world.settle()
        where = {m: i for i, ms in world.assignments().items() for m in ms}
        recency(ctl, f"addr-{where['a1']}", **{m: 1 if m == "a2" else 5 for m, i in where.items() if i == where["a1"]})
        recency(ctl, f"addr-{where['a2']}", **{m: 1 if m == "a2" else 5 for m, i in where.items() if i == where["a2"]})
        await ctl.ensure_loaded("a3", WAIT)
        await world.settle()
        placed = {m for ms in world.assignments().values() for m in ms}
        assert placed == {"a1", "a3", "b1"}, placed
        assert world.state.decisions["a2"].action == "evicted"
        assert "memory cap" in world.state.decisions["a2"].reason
        assert ctl.ledger.tenant_bytes("A") <= 2 * MiB
    finally:
        await ctl.close()
        await world.close()


async def test_a_model_that_cannot_fit_under_its_tenants_cap_fails_with_the_cap_named() -> None:
    """A model larger than its tenant's whole cap, and one whose room is held by the tenant's
    copies in use, fail with RESOURCE_EXHAUSTED "tenant 'A' memory cap of N MiB reached"."""
    world = StoreWorld()
    world.pod("p", 64 * MiB)
    world.put(world.keys.tenant("A"), TenantSpec("A", memory_cap_bytes=3 * MiB))
    world.model("huge", size=4 * MiB, tenant="A")  # type: ignore[arg-type]
    world.model("busy", size=2 * MiB, tenant="A")  # type: ignore[arg-type]
    world.model("next", size=2 * MiB, tenant="A")  # type: ignore[arg-type]
    ctl = await make(world)
    Pods(world)
    try:
        await world.settle()
        with pytest.raises(TenantCapReached) as err:
            await ctl.ensure_loaded("huge", WAIT)
        assert err.value.kind is Kind.RESOURCE_EXHAUSTED
        assert "tenant 'A' memory cap of 3 MiB reached" in err.value.message, err.value.message
        await ctl.ensure_loaded("busy", WAIT)
        await world.settle()
        recency(ctl, "addr-p", busy=1)
        ctl.usage.answers["addr-p"]["busy"] = Usage(last_used_ms=1, in_flight=2)  # type: ignore[attr-defined]
        with pytest.raises(TenantCapReached, match="tenant 'A' memory cap of 3 MiB reached"):
            await ctl.ensure_loaded("next", WAIT)
        assert sorted(world.assignments()["p"]) == ["busy"]
    finally:
        await ctl.close()
        await world.close()


async def test_a_cap_counts_loads_in_flight_so_a_burst_cannot_overshoot_it() -> None:
    """Concurrent misses of one tenant: reservations count towards its cap, so the burst never
    books more than the cap (the ones that cannot fit wait for room, then fail or evict)."""
    world = StoreWorld(lag=0.001)
    world.pod("p", 64 * MiB)
    world.put(world.keys.tenant("A"), TenantSpec("A", memory_cap_bytes=3 * MiB))
    for i in range(6):
        world.model(f"a{i}", size=MiB, tenant="A")  # type: ignore[arg-type]
    ctl = await make(world)
    Pods(world, delay=0.01)
    try:
        await world.settle()
        results = await asyncio.gather(*(ctl.ensure_loaded(f"a{i}", WAIT) for i in range(6)),
                                       return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results), results
        await world.settle()
        assert sum(world.booked().values()) <= 3 * MiB, world.booked()
    finally:
        await ctl.close()
        await world.close()
