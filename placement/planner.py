"""Where a model goes and what leaves to make room: a PURE function of the pods' state.

No I/O and no clock reads: the controller gathers each pod's capacity, the bytes of the models
assigned to it and their recency / in-flight work (times come in as unix milliseconds), and
asks `plan`. Every choice is deterministic — ties are broken by id — so the same inputs always
give the same plan, whatever order they arrive in; tests/unit/placement checks that with
Hypothesis.

The rule (docs/PLACEMENT.md tells it in plain words):
1. the pod with the most free bytes (capacity − bytes of its models) that fits the model;
2. else, on each pod, the cheapest victims needed to make room — never a model with requests
   in flight, never a copy still loading, never a copy that keeps its model at its pinned
   min_copies, never more of a tenant's bytes than its `budgets` entry (other tenants'
   reserved shares, placement/tenancy.py). Victims come in tiers, and a lower tier always goes first:
     0 models on probation (used at most `Rules.probation_hits` times: one-off requests),
     1 established models not in use (not used within `Rules.in_use_ms`),
     2 established models in use,
     3 copies loaded less than `Rules.min_residency_ms` ago (the churn guard);
   within a tier the lowest GDSF value (policy.GdsfBook) goes first, then the least recently
   used, then the id. With no values and no rules this is plain LRU. The pod whose victims
   reach the lowest worst tier wins, then the lowest summed value, the fewest evicted bytes,
   the victims used longest ago, the pod id;
3. else NoCapacity, naming the model's size and the largest pod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence, Set

from mesh.errors import NoCapacity, Unavailable
from mesh.units import format_bytes
from placement.policy import Rules


@dataclasses.dataclass(frozen=True)
class PodModel:
    """One model assigned to a pod, as placement sees it."""

    model_id: str
    bytes: int
    last_used_ms: int = 0
    in_flight: int = 0
    loaded: bool = True  # False while the copy is still loading: it cannot be evicted
    loaded_unix_ms: int = 0  # when the copy became LOADED (overcommit keeps the newest)
    value: float = 0.0  # GDSF value H (policy.GdsfBook); 0 when unknown
    frequency: float = 0.0  # uses counted by the book (probation when <= Rules.probation_hits)
    pinned: bool = False  # evicting it would take the model below its min_copies
    tenant: str = ""  # whose model it is (ModelSpec.tenant): reserved shares are per tenant

    @property
    def evictable(self) -> bool:
        return self.loaded and self.in_flight <= 0 and not self.pinned


@dataclasses.dataclass(frozen=True)
class PodView:
    """A live runtime pod: its capacity, the models assigned to it, and memory it holds that
    no assigned model accounts for (`held_bytes`: copies still unloading, or the pod's own
    measured use above the sum of its copies' sizes); held bytes are never evictable."""

    instance_id: str
    capacity_bytes: int
    models: Sequence[PodModel] = ()
    held_bytes: int = 0
    # Kept by a caller that maintains them incrementally (placement/ledger.py), so a plan that
    # needs no victims never walks `models` (which the ledger then builds only on demand):
    booked_bytes: int | None = None  # sum of the models' bytes
    model_ids: Set[str] | None = None  # the models' ids

    @property
    def used_bytes(self) -> int:
        booked = self.booked_bytes if self.booked_bytes is not None else sum(m.bytes for m in self.models)
        return self.held_bytes + booked

    def holds(self, model_id: str) -> bool:
        if self.model_ids is not None:
            return model_id in self.model_ids
        return any(m.model_id == model_id for m in self.models)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Put the model on `instance_id` after evicting `victims` (in eviction order)."""

    instance_id: str
    victims: tuple[str, ...] = ()
    evicted_bytes: int = 0
    reason: str = ""
    victim_reasons: tuple[str, ...] = ()  # one per victim, same order


NO_RULES = Rules()  # plain LRU: no probation, no churn guard
TIER_NAMES = ("on probation", "established, idle", "established, in use", "loaded moments ago")


def tier(model: PodModel, now_ms: int, rules: Rules, probation: bool = True) -> int:
    """The victim tier of a resident model (lower goes first; see the module docstring).

    `probation` False (the incoming model is itself established) merges tiers 0 and 1: only a
    one-off newcomer is confined to displacing one-offs first.
    """
    if rules.min_residency_ms and now_ms - model.loaded_unix_ms < rules.min_residency_ms:
        return 3
    if probation and model.frequency <= rules.probation_hits:
        return 0
    if rules.in_use_ms and now_ms - model.last_used_ms < rules.in_use_ms:
        return 2
    return 1


def victim_order(models: Iterable[PodModel], now_ms: int = 0, rules: Rules = NO_RULES,
                 probation: bool = True) -> list[PodModel]:
    """The evictable models, cheapest first."""
    return sorted(
        (m for m in models if m.evictable),
        key=lambda m: (tier(m, now_ms, rules, probation), m.value, m.last_used_ms, m.model_id),
    )


def _make_room(pod: PodView, needed: int, now_ms: int, rules: Rules, probation: bool,
               budgets: Mapping[str, int] | None = None) -> list[PodModel] | None:
    """The cheapest evictable models whose removal frees `needed` bytes; None if impossible.
    `budgets`: tenant -> bytes of its copies this load may evict at most (its resident bytes
    above its reserved share); a victim that would exceed its tenant's budget is skipped."""
    free = pod.free_bytes
    victims: list[PodModel] = []
    taken: dict[str, int] = {}
    for model in victim_order(pod.models, now_ms, rules, probation):
        if free >= needed:
            break
        if budgets is not None and model.tenant in budgets:
            if taken.get(model.tenant, 0) + model.bytes > budgets[model.tenant]:
                continue  # would take its tenant below its reserved share
            taken[model.tenant] = taken.get(model.tenant, 0) + model.bytes
        victims.append(model)
        free += model.bytes
    return victims if free >= needed else None


def _why(model: PodModel, now_ms: int, rules: Rules, probation: bool) -> str:
    return (f"{TIER_NAMES[tier(model, now_ms, rules, probation)]}, value {model.value:.4g}, "
            f"used {model.frequency:g} times, last used at {model.last_used_ms}")


def plan(
    model_id: str,
    predicted_bytes: int,
    pods: Iterable[PodView],
    exclude: Collection[str] = frozenset(),
    *,
    now_ms: int = 0,
    rules: Rules = NO_RULES,
    evict: bool = True,
    frequency: float = 0.0,
    size_note: str = "",
    budgets: Mapping[str, int] | None = None,
) -> Plan:
    """Chooses the pod for `model_id` (predicted to need `predicted_bytes`) and its victims.

    Pods in `exclude` (e.g. one where the load just failed) and pods already holding the model
    are not considered (so two copies never share a pod). `evict=False` only uses free room
    (extra copies, re-placing a dead pod's models). `frequency`: the incoming model's use
    count; at most `rules.probation_hits` puts it on probation (it displaces one-offs first).
    `size_note` says where `predicted_bytes` comes from (a measurement or a prior) in the
    plan's reason. `budgets`: tenant -> bytes of that tenant's copies this load may evict
    (reserved shares of other tenants; tenants not named: no limit). Raises Unavailable when no pod is left to consider, NoCapacity when no pod
    can make room.
    """
    note = f" ({size_note})" if size_note else ""
    candidates = sorted(
        (p for p in pods if p.instance_id not in exclude and not p.holds(model_id)),
        key=lambda p: p.instance_id,
    )
    if not candidates:
        raise Unavailable(
            f"no runtime pod can take model '{model_id}' (none live, or all excluded after failed loads); "
            "start runtime pods or retry later"
        )
    fitting = [p for p in candidates if p.free_bytes >= predicted_bytes]
    if fitting:
        best = min(fitting, key=lambda p: (-p.free_bytes, p.instance_id))
        needs = f"model needs {format_bytes(predicted_bytes)}{note}"
        return Plan(
            best.instance_id,
            reason=f"most free capacity ({format_bytes(best.free_bytes)} of {format_bytes(best.capacity_bytes)} free, {needs})",
        )

    if not evict:
        raise NoCapacity(f"no runtime pod has {predicted_bytes} bytes free for model '{model_id}'{note} "
                         "without evicting")

    probation = frequency <= rules.probation_hits
    options: list[tuple[int, float, int, int, str, list[PodModel]]] = []
    for pod in candidates:
        victims = _make_room(pod, predicted_bytes, now_ms, rules, probation, budgets)
        if victims is None:
            continue
        worst = max((tier(v, now_ms, rules, probation) for v in victims), default=0)
        evicted = sum(v.bytes for v in victims)
        newest_victim = max((v.last_used_ms for v in victims), default=0)
        options.append((worst, sum(v.value for v in victims), evicted, newest_victim, pod.instance_id, victims))
    if not options:
        largest = max(p.capacity_bytes for p in candidates)
        raise NoCapacity(
            f"model '{model_id}' needs {predicted_bytes} bytes{note} and no runtime pod can make room: "
            f"the largest pod offers {largest} bytes, and models in use, still loading or within "
            "another tenant's reserved memory cannot be evicted; add pods or raise MESH_RUNTIME_CAPACITY"
        )
    worst, _, evicted, _, instance_id, victims = min(options, key=lambda o: o[:5])
    return Plan(
        instance_id,
        victims=tuple(v.model_id for v in victims),
        evicted_bytes=evicted,
        reason=f"no pod had {predicted_bytes} bytes free{note}; evicting the cheapest models "
        f"(worst: {TIER_NAMES[worst]}) frees {evicted} bytes, the cheapest choice of any pod",
        victim_reasons=tuple(f"evicted for model '{model_id}': {_why(v, now_ms, rules, probation)}"
                             for v in victims),
    )


def overcommit_victims(pod: PodView, now_ms: int = 0, rules: Rules = NO_RULES) -> tuple[str, ...]:
    """When a pod's measured use exceeds its capacity: the cheapest models to evict until it fits.

    Never the most recently loaded model (it is what pushed the pod over, and evicting it would
    make the miss that loaded it pointless), never models with requests in flight or still
    loading. Best effort: may not get back under capacity if too little is evictable.
    """
    if pod.used_bytes <= pod.capacity_bytes:
        return ()
    loaded = [m for m in pod.models if m.loaded]
    newest = max(loaded, key=lambda m: (m.loaded_unix_ms, m.model_id), default=None)
    excess = pod.used_bytes - pod.capacity_bytes
    victims: list[str] = []
    for model in victim_order((m for m in pod.models if m is not newest), now_ms, rules):
        if excess <= 0:
            break
        victims.append(model.model_id)
        excess -= model.bytes
    return tuple(victims)
