"""bench/livesim.py with every live effect off IS bench/trace.py's policy replay (its table's
first row is the offline figure), and its old-controller mode (windowed counts) differs."""

from __future__ import annotations

from bench.livesim import Live, replay_live
from bench.trace import mixed_sizes, replay, zipf_trace
from placement.policy import Rules

MiB = 1 << 20


def _setup() -> tuple[list[int], list[int], list[int], list[int]]:
    trace = zipf_trace(60, 600, 0.9, 3)
    sizes = mixed_sizes(60, 3, 64 << 10, 2 * MiB)
    cost = [max(1, s // MiB) for s in sizes]
    return trace, sizes, cost, [max(int(sum(sizes) * 0.05), int(1.2 * max(sizes)))] * 2


def test_no_live_effects_is_the_offline_replay() -> None:
    trace, sizes, cost, caps = _setup()
    offline = replay("policy", trace, sizes, cost, caps, Rules(probation_hits=1))
    sim = replay_live("sim", trace, sizes, cost, caps, Live())
    assert (sim.hits, sim.misses, sim.evictions) == (offline.hits, offline.misses, offline.evictions)


def test_churn_guard_changes_the_replay_in_wall_clock_time() -> None:
    trace, sizes, cost, caps = _setup()
    base = replay_live("wall", trace, sizes, cost, caps, Live(hit_ms=3, miss_ms=70))
    guard = replay_live("guard", trace, sizes, cost, caps, Live(hit_ms=3, miss_ms=70, rules=Rules(
        probation_hits=1, min_residency_ms=30_000)))
    assert (guard.hits, guard.evictions) != (base.hits, base.evictions)
