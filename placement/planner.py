"""Where a model goes and what leaves to make room: a PURE function of the pods' state.

No I/O and no clock reads: the controller gathers each pod's capacity, the bytes of the models
assigned to it and their recency / in-flight work (times come in as unix milliseconds), and
asks `plan`. Every choice is deterministic — ties are broken by id — so the same inputs always
give the same plan, whatever order they arrive in; tests/unit/placement checks that with
Hypothesis.

The rule (issue #2 scope):
1. the pod with the most free bytes (capacity − bytes of its models) that fits the model;
2. else, on each pod, the least recently used models needed to make room — never a model with
   requests in flight, never a copy still loading — and the pod needing the fewest evicted
   bytes wins (tie: the pod whose victims were used longest ago, then the pod id);
3. else NoCapacity, naming the model's size and the largest pod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable

from mesh.errors import NoCapacity, Unavailable


@dataclasses.dataclass(frozen=True)
class PodModel:
    """One model assigned to a pod, as placement sees it."""

    model_id: str
    bytes: int
    last_used_ms: int = 0
    in_flight: int = 0
    loaded: bool = True  # False while the copy is still loading: it cannot be evicted
    loaded_unix_ms: int = 0  # when the copy became LOADED (overcommit keeps the newest)

    @property
    def evictable(self) -> bool:
        return self.loaded and self.in_flight <= 0


@dataclasses.dataclass(frozen=True)
class PodView:
    """A live runtime pod: its capacity and the models assigned to it."""

    instance_id: str
    capacity_bytes: int
    models: tuple[PodModel, ...] = ()

    @property
    def used_bytes(self) -> int:
        return sum(m.bytes for m in self.models)

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


def _lru(models: Iterable[PodModel]) -> list[PodModel]:
    return sorted((m for m in models if m.evictable), key=lambda m: (m.last_used_ms, m.model_id))


def _make_room(pod: PodView, needed: int) -> list[PodModel] | None:
    """The LRU evictable models whose removal frees `needed` bytes on `pod`; None if impossible."""
    free = pod.free_bytes
    victims: list[PodModel] = []
    for model in _lru(pod.models):
        if free >= needed:
            break
        victims.append(model)
        free += model.bytes
    return victims if free >= needed else None


def plan(
    model_id: str,
    predicted_bytes: int,
    pods: Iterable[PodView],
    exclude: Collection[str] = frozenset(),
) -> Plan:
    """Chooses the pod for `model_id` (predicted to need `predicted_bytes`) and its victims.

    Pods in `exclude` (e.g. one where the load just failed) and pods already holding the model
    are not considered. Raises Unavailable when no pod is left to consider, NoCapacity when no
    pod can make room.
    """
    candidates = sorted(
        (p for p in pods if p.instance_id not in exclude and all(m.model_id != model_id for m in p.models)),
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
        return Plan(
            best.instance_id,
            reason=f"most free capacity ({best.free_bytes} of {best.capacity_bytes} bytes free, "
            f"model needs {predicted_bytes})",
        )

    options: list[tuple[int, int, str, list[PodModel]]] = []
    for pod in candidates:
        victims = _make_room(pod, predicted_bytes)
        if victims is None:
            continue
        evicted = sum(v.bytes for v in victims)
        newest_victim = max((v.last_used_ms for v in victims), default=0)
        options.append((evicted, newest_victim, pod.instance_id, victims))
    if not options:
        largest = max(p.capacity_bytes for p in candidates)
        raise NoCapacity(
            f"model '{model_id}' needs {predicted_bytes} bytes and no runtime pod can make room: "
            f"the largest pod offers {largest} bytes, and models in use or still loading cannot "
            "be evicted; add pods or raise MESH_RUNTIME_CAPACITY"
        )
    evicted, _, instance_id, victims = min(options, key=lambda o: (o[0], o[1], o[2]))
    return Plan(
        instance_id,
        victims=tuple(v.model_id for v in victims),
        evicted_bytes=evicted,
        reason=f"no pod had {predicted_bytes} bytes free; evicting the least recently used "
        f"models frees {evicted} bytes, the fewest of any pod",
    )


def overcommit_victims(pod: PodView) -> tuple[str, ...]:
    """When a pod's measured use exceeds its capacity: the LRU models to evict until it fits.

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
    for model in _lru(m for m in pod.models if m is not newest):
        if excess <= 0:
            break
        victims.append(model.model_id)
        excess -= model.bytes
    return tuple(victims)
