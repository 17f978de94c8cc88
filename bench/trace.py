"""Seeded Zipf request traces and their offline replay through LRU, GDSF (our planner) and
Belady's size-aware optimum — no mesh, no I/O: bench/density.py compares these with the live
mesh, and they are quick enough to tune the policy on.

Offline replays use the same placement.planner.plan as placement: LRU is the planner fed no
values and no rules; "policy" is the planner fed policy.GdsfBook values with the rules
placement uses. Belady evicts, on the pod chosen, the models whose next use is farthest in
the future (for models of different sizes that is a heuristic, not the exact optimum).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from placement import planner
from placement.policy import GdsfBook, Rules

TICK_MS = 10  # virtual time between two requests of a trace


def zipf_trace(models: int, requests: int, alpha: float, seed: int) -> list[int]:
    """`requests` model indexes drawn from Zipf(alpha) over `models`, ranks shuffled (seeded),
    so popularity is unrelated to size."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** alpha for r in range(models)]
    ranks = list(range(models))
    rng.shuffle(ranks)
    return [ranks[i] for i in rng.choices(range(models), weights=weights, k=requests)]


def mixed_sizes(models: int, seed: int, small: int, large: int) -> list[int]:
    """Log-uniform sizes between `small` and `large` bytes (seeded)."""
    rng = random.Random(seed + 1)
    return [int(small * (large / small) ** rng.random()) for _ in range(models)]


@dataclasses.dataclass
class Result:
    name: str
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def replay(name: str, trace: Sequence[int], sizes: Sequence[int], load_ms: Sequence[int],
           capacities: Sequence[int], rules: Rules | None, aging_period: int = 0) -> Result:
    """Replays through the planner: `rules` None is plain LRU, else the GDSF policy."""
    res = Result(name)
    book = GdsfBook(aging_period=aging_period)
    pods: dict[str, dict[str, planner.PodModel]] = {f"pod-{i}": {} for i in range(len(capacities))}
    caps = {f"pod-{i}": c for i, c in enumerate(capacities)}
    where: dict[str, str] = {}
    for t, idx in enumerate(trace):
        now = t * TICK_MS
        mid = f"m{idx}"
        if rules is not None:
            book.touch(mid, sizes[idx], load_ms[idx])
        if mid in where:
            res.hits += 1
            pod = pods[where[mid]]
            pod[mid] = dataclasses.replace(pod[mid], last_used_ms=now)
        else:
            res.misses += 1
            views = [planner.PodView(p, caps[p], tuple(_valued(m, book, rules) for m in ms.values()))
                     for p, ms in pods.items()]
            p = planner.plan(mid, sizes[idx], views, now_ms=now, rules=rules or Rules(),
                             frequency=book.frequency(mid))
            for v in p.victims:
                del pods[p.instance_id][v]
                del where[v]
                book.evicted(v)
                res.evictions += 1
            pods[p.instance_id][mid] = planner.PodModel(mid, sizes[idx], last_used_ms=now, loaded_unix_ms=now)
            where[mid] = p.instance_id
    return res


def _valued(m: planner.PodModel, book: GdsfBook, rules: Rules | None) -> planner.PodModel:
    if rules is None:
        return m
    return dataclasses.replace(m, value=book.value(m.model_id), frequency=book.frequency(m.model_id))


def belady(trace: Sequence[int], sizes: Sequence[int], capacities: Sequence[int]) -> Result:
    """Size-aware Belady: on a miss, the pod with most free room if it fits, else the pod whose
    farthest-next-use victims are needed latest; victims by farthest next use first."""
    res = Result("belady")
    n = len(trace)
    next_use = [n] * n
    last: dict[int, int] = {}
    for t in range(n - 1, -1, -1):
        next_use[t] = last.get(trace[t], n)
        last[trace[t]] = t
    pods: list[dict[int, int]] = [{} for _ in capacities]  # model -> its next use
    free = list(capacities)
    where: dict[int, int] = {}
    for t, idx in enumerate(trace):
        if idx in where:
            res.hits += 1
            pods[where[idx]][idx] = next_use[t]
            continue
        res.misses += 1
        if next_use[t] == n and max(free) < sizes[idx]:
            continue  # never used again: serve it without keeping it (bypass)
        best: tuple[int, int, list[int]] | None = None
        for p, models in enumerate(pods):
            room, victims = free[p], []
            for m in sorted(models, key=lambda m: (-models[m], m)):
                if room >= sizes[idx]:
                    break
                victims.append(m)
                room += sizes[m]
            if room < sizes[idx]:
                continue
            soonest = min((models[v] for v in victims), default=n + 1)
            if best is None or soonest > best[0]:
                best = (soonest, p, victims)
        if best is None:
            continue
        _, p, victims = best
        for v in victims:
            del pods[p][v]
            del where[v]
            free[p] += sizes[v]
            res.evictions += 1
        pods[p][idx] = next_use[t]
        free[p] -= sizes[idx]
        where[idx] = p
    return res
