"""Value-aware eviction bookkeeping and the policy's tunables: PURE (no I/O, no clock).

GreedyDual-Size-Frequency (Cherkasova 1998): a model's value is

    H = L + frequency × cost / size

with cost = the model's measured load time (ModelStats.load_ms) plus the fixed cost of any miss
(MISS_OVERHEAD_MS), size = its measured bytes and
L the "inflation" value: the H of the last model evicted. L only grows, so a model that stops
being used is overtaken by models touched later and ages out, while a small, slow-to-load,
frequently used model keeps a high H for long.

Frequencies outlive evictions (a ghost count), which is what lets a model that comes back
often win its place back: the count of a model seen once stays 1, and `Rules.probation_hits`
separates such one-off models from the established ones (see planner.plan). Every
`aging_period` touches all counts are halved, so yesterday's hot set does not stay protected
for ever.

The book is mutated only through `touch` and `evicted`, in the order events are fed in: the
same events give the same values (tests/properties checks that). Live, `touch` is fed the
uses router telemetry counted since placement's previous read (controller.refresh_activity),
so a frequency is a count over the model's history, as in the offline replay (bench/trace.py).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rules:
    """What the planner needs of the settings (times in milliseconds, to stay clock-free)."""

    probation_hits: int = 1  # a model used at most this often is "on probation"
    min_residency_ms: int = 0  # churn guard: copies loaded more recently are evicted last
    in_use_ms: int = 0  # a model used this recently counts as "in use" for probation


@dataclasses.dataclass
class _Entry:
    freq: float = 0.0
    h: float = 0.0


class GdsfBook:
    """GDSF values and ghost frequencies per model, fed with uses and evictions."""

    def __init__(self, aging_period: int = 0, max_entries: int = 100_000) -> None:
        self.inflation = 0.0  # L
        self.aging_period = aging_period  # touches between halvings; 0: never age
        self.max_entries = max_entries
        self._touches = 0
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self, model_id: str, size_bytes: int, load_ms: int, count: float = 1.0) -> float:
        """Records `count` uses of the model; returns its new value H."""
        entry = self._entries.get(model_id)
        if entry is None:
            entry = self._entries[model_id] = _Entry()
        entry.freq += count
        entry.h = self.inflation + entry.freq * cost(load_ms) / max(size_bytes, 1)
        self._touches += 1
        if self.aging_period and self._touches % self.aging_period == 0:
            self._age()
        if len(self._entries) > self.max_entries:
            self._forget_coldest()
        return entry.h

    def evicted(self, model_id: str) -> None:
        """The model left memory: L rises to its value (never falls)."""
        entry = self._entries.get(model_id)
        if entry is not None:
            self.inflation = max(self.inflation, entry.h)

    def value(self, model_id: str) -> float:
        entry = self._entries.get(model_id)
        return entry.h if entry else 0.0

    def frequency(self, model_id: str) -> float:
        entry = self._entries.get(model_id)
        return entry.freq if entry else 0.0

    def forget(self, model_id: str) -> None:
        """The model was unregistered."""
        self._entries.pop(model_id, None)

    def _age(self) -> None:
        for entry in self._entries.values():
            entry.freq /= 2

    def _forget_coldest(self) -> None:
        coldest = min(self._entries.items(), key=lambda kv: (kv[1].freq, kv[1].h, kv[0]))[0]
        del self._entries[coldest]


# What every miss costs besides onnxruntime's own load: the pull from the pod's disk cache, the
# etcd round trips (assignment -> LOADING -> LOADED) and the router's wait (docs/BENCHMARKS.md,
# "Cache miss": ~13-30 ms). Without it a model's cost was its load time alone: for small models
# a few ms, mostly noise from whatever else the CPU ran, which scrambled the values; the density
# replay with the pods' measured load times lost ~1 point of hit ratio to it (bench/livesim.py).
MISS_OVERHEAD_MS = 20


def cost(load_ms: int) -> float:
    """Cost of a model's miss: its measured load time (never measured: 0) plus the miss path's
    fixed overhead, so slow loads (large GPU models: seconds) still weigh most."""
    return float(MISS_OVERHEAD_MS + max(load_ms, 0))
