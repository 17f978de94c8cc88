"""Tenants' memory shares in placement: a reserved share other tenants' loads never evict, and a
cap on what one tenant's copies may hold (issue 10 item 2; TenantSpec at tenants/<tenant>).

Both are counted in the ledger's bytes (placement/ledger.py `tenant_bytes`: measured sizes of
loaded copies, predicted bytes of loads in flight, on live pods):
- reserved (TenantSpec.memory_reserved_bytes): a load of ANOTHER tenant may evict a tenant's
  copies only as far as that tenant keeps at least its reserved bytes — `budgets` gives the
  planner, per tenant with a reserve, the bytes above it (planner.plan skips a victim past
  its tenant's budget). A tenant's own loads may evict its own copies freely;
- cap (TenantSpec.memory_cap_bytes): a load that would put its tenant above the cap first
  evicts that tenant's own least valuable copies, on any pod (`cap_victims`, the planner's own
  victim order: tiers, GDSF value, recency, id); when those cannot make room — the model
  alone exceeds the cap, or the rest is in use or still loading — the load fails with
  RESOURCE_EXHAUSTED naming the tenant's own cap only.
0 means no limit for both; a tenant without a TenantSpec has neither. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from mesh.errors import NoCapacity
from mesh.types import TenantSpec
from mesh.units import format_bytes
from placement import planner
from placement.policy import Rules

MiB = 1 << 20


class TenantCapReached(NoCapacity):
    """RESOURCE_EXHAUSTED: the tenant's memory cap leaves no room for the model."""


def tenant_label(tenant: str) -> str:
    return tenant or "(default)"


def cap_error(tenant: str, cap: int, model_id: str, needed: int, detail: str) -> TenantCapReached:
    mib = cap / MiB
    amount = f"{mib:.0f}" if mib >= 10 or mib == int(mib) else f"{mib:.2f}"
    return TenantCapReached(
        f"tenant '{tenant_label(tenant)}' memory cap of {amount} MiB reached: model '{model_id}' needs "
        f"{format_bytes(needed)} and {detail}; unload or unregister some of its models, or ask the "
        "operator to raise the tenant's memory cap")


def budgets(tenants: Mapping[str, TenantSpec], incoming: str, resident: Callable[[str], int]) -> dict[str, int]:
    """tenant -> bytes of its copies a load of `incoming`'s model may evict (other tenants with
    a reserved share only)."""
    return {t: max(0, resident(t) - spec.memory_reserved_bytes)
            for t, spec in tenants.items() if t != incoming and spec.memory_reserved_bytes > 0}


def cap_victims(tenant: str, cap: int, resident: int, model_id: str, predicted: int,
                pods: Iterable[planner.PodView], now_ms: int, rules: Rules,
                probation: bool) -> list[tuple[str, planner.PodModel]]:
    """[(pod, victim)] of the tenant's own copies to evict so that the new model fits under its
    cap, cheapest first across all pods; [] when it already fits. Raises TenantCapReached."""
    over = resident + predicted - cap
    if over <= 0:
        return []
    if predicted > cap:
        raise cap_error(tenant, cap, model_id, predicted, "that alone exceeds the cap")
    mine = [(pod.instance_id, m) for pod in pods for m in pod.models
            if m.tenant == tenant and m.model_id != model_id]  # never a copy of the model itself
    order = planner.victim_order((m for _, m in mine), now_ms, rules, probation)
    where = {id(m): instance_id for instance_id, m in mine}
    out: list[tuple[str, planner.PodModel]] = []
    for model in order:
        if over <= 0:
            break
        out.append((where[id(model)], model))
        over -= model.bytes
    if over > 0:
        raise cap_error(tenant, cap, model_id, predicted,
                        f"its copies hold {format_bytes(resident)}, of which the ones in use or still "
                        "loading cannot be evicted")
    return out


def without(pods: list[planner.PodView], victims: Iterable[tuple[str, planner.PodModel]]) -> list[planner.PodView]:
    """The pods as they will be once `victims` are evicted (models listed, sums recomputed)."""
    gone: dict[str, set[str]] = {}
    for instance_id, model in victims:
        gone.setdefault(instance_id, set()).add(model.model_id)
    return [planner.PodView(p.instance_id, p.capacity_bytes,
                            tuple(m for m in p.models if m.model_id not in gone[p.instance_id]),
                            held_bytes=p.held_bytes)
            if p.instance_id in gone else p for p in pods]
