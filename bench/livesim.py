"""The offline replay with what the LIVE planner sees, one effect at a time: why the live mesh
trails bench/trace.py's replay of the same trace, and by how much each cause costs.

    python bench/livesim.py [--quick] [--sizes density-sizes.json] [--hit-ms 3] [--miss-ms 70]

bench/trace.py replays in virtual time (TICK_MS per request), counts each model's uses over the
whole trace at the moment of the request, and runs the planner with Rules(probation_hits=1)
only. The live placement differs (placement/controller.py, placement/telemetry.py,
router/telemetry.py):
- time: the wall clock, a hit taking ~`hit_ms` and a miss ~`miss_ms` (bench/density.py sends
  one request at a time), so the live rules' times (min_residency_s, in_use_s) span many
  requests;
- rules: probation_hits, the churn guard (min_residency_s) and in_use_s from the settings;
- telemetry: a router counts each request and flushes every `flush_s` into Redis buckets of
  `bucket_s`; placement reads the buckets of the last `window_s` (placement/telemetry.py) when
  it plans; `book="set"` is refresh_activity until 2026-12 (the book's frequency SET to the
  WINDOWED count, probation judged by it: `frequency="window"`), `book="delta"` what it does
  now (each read's new uses added up: a count over the history, like the offline book);
- cost: GDSF's cost is the pods' measured load time (noisy; `--sizes` shows both), offline
  it is size // MiB (policy.cost adds the miss's fixed overhead to either).
`replay_live` switches each on alone; `main` prints the table docs/BENCHMARKS.md quotes.
Pure: no mesh, no I/O, no clock — same inputs, same result.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.trace import Result, belady, mixed_sizes, replay, zipf_trace  # noqa: E402
from placement import planner  # noqa: E402
from placement.policy import GdsfBook, Rules  # noqa: E402

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Live:
    """Which live effects a replay has (all off: bench/trace.py's "policy" replay)."""

    hit_ms: float = 0.0  # > 0: wall-clock-like time, a hit taking this long ...
    miss_ms: float = 0.0  # ... and a miss this long; 0: TICK_MS per request (offline)
    rules: Rules = Rules(probation_hits=1)
    telemetry: bool = False  # counts reach the book through router flushes and Redis buckets
    flush_s: float = 1.0
    bucket_s: int = 10
    window_s: float = 60.0
    book: str = "set"  # with telemetry: "set" the windowed count (the controller), "delta" add new uses
    frequency: str = "window"  # with telemetry, the count probation judges by: "window" | "book"


class _WindowedBook(GdsfBook):
    """The book as controller.refresh_activity fed it before (2026-12): each read SET a model's
    frequency to its count in the telemetry window and re-valued it at the current L."""

    def set(self, model_id: str, size_bytes: int, load_ms: int, frequency: float) -> None:
        self.touch(model_id, size_bytes, load_ms, frequency - self.frequency(model_id))


class _Telemetry:
    """Router -> Redis -> placement, in virtual time (router/telemetry.py, mesh/telemetry.py)."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.pending: list[tuple[float, str]] = []
        self.next_flush = live.flush_s * 1000
        self.buckets: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.last: dict[str, float] = {}
        self.total: collections.Counter[str] = collections.Counter()  # all flushed uses

    def record(self, now: float, model_id: str) -> None:
        self._flush(now)
        self.pending.append((now, model_id))

    def _flush(self, now: float) -> None:
        while now >= self.next_flush:
            due = [(t, m) for t, m in self.pending if t < self.next_flush]
            self.pending = [(t, m) for t, m in self.pending if t >= self.next_flush]
            for t, m in due:
                self.buckets[int(t // (self.live.bucket_s * 1000))][m] += 1
                self.last[m] = max(self.last.get(m, 0.0), t)
                self.total[m] += 1
            self.next_flush += self.live.flush_s * 1000

    def snapshot(self, now: float) -> dict[str, tuple[float, int]]:
        """model -> (last use, requests in the window), as placement/telemetry.py reads it."""
        self._flush(now)
        newest = int(now // (self.live.bucket_s * 1000))
        count = max(1, math.ceil(self.live.window_s / self.live.bucket_s))
        counts: collections.Counter[str] = collections.Counter()
        for b in range(newest - count + 1, newest + 1):
            counts.update(self.buckets.get(b, {}))
        return {m: (self.last.get(m, 0.0), counts.get(m, 0)) for m in set(counts) | set(self.last)}


def replay_live(name: str, trace: Sequence[int], sizes: Sequence[int], load_ms: Sequence[int],
                capacities: Sequence[int], live: Live) -> Result:
    """The policy replay of bench/trace.py with the live effects `live` switches on."""
    res = Result(name)
    book = _WindowedBook()
    pods: dict[str, dict[str, planner.PodModel]] = {f"pod-{i}": {} for i in range(len(capacities))}
    caps = {f"pod-{i}": c for i, c in enumerate(capacities)}
    where: dict[str, str] = {}
    tel = _Telemetry(live) if live.telemetry else None
    seen_use: dict[str, float] = {}
    fed: collections.Counter[str] = collections.Counter()
    snap: dict[str, tuple[float, int]] = {}
    now = 0.0
    for t, idx in enumerate(trace):
        if not live.hit_ms:
            now = float(t * 10)
        mid = f"m{idx}"
        if tel is None:
            book.touch(mid, sizes[idx], load_ms[idx])
        else:
            tel.record(now, mid)
        hit = mid in where
        if hit:
            res.hits += 1
            pod = pods[where[mid]]
            pod[mid] = dataclasses.replace(pod[mid], last_used_ms=int(now))
        else:
            res.misses += 1
            if tel is not None:  # controller.refresh_activity, before the plan
                snap = tel.snapshot(now)
                for m, (last, requests) in sorted(snap.items()):
                    if last > seen_use.get(m, -1.0):
                        seen_use[m] = last
                        i = int(m[1:])
                        if live.book == "set":
                            book.set(m, sizes[i], load_ms[i], max(requests, 1))
                        else:
                            book.touch(m, sizes[i], load_ms[i], tel.total[m] - fed[m])
                            fed[m] = tel.total[m]

            def freq(m: str, snap: dict[str, tuple[float, int]] = snap) -> float:
                if tel is None or live.frequency == "book" or m not in snap:
                    return book.frequency(m)
                return float(snap[m][1])

            views = [planner.PodView(p, caps[p], tuple(
                dataclasses.replace(m, value=book.value(m.model_id), frequency=freq(m.model_id))
                for m in ms.values())) for p, ms in pods.items()]
            p = planner.plan(mid, sizes[idx], views, now_ms=int(now), rules=live.rules, frequency=freq(mid))
            for v in p.victims:
                del pods[p.instance_id][v]
                del where[v]
                book.evicted(v)
                res.evictions += 1
            loaded = int(now + (live.miss_ms or 0))
            pods[p.instance_id][mid] = planner.PodModel(mid, sizes[idx], last_used_ms=int(now), loaded_unix_ms=loaded)
            where[mid] = p.instance_id
        if live.hit_ms:
            now += live.hit_ms if hit else live.miss_ms
    return res


def live_rules(probation_hits: int = 1, min_residency_s: float = 30.0, in_use_s: float = 60.0) -> Rules:
    """The planner's rules as placement builds them from its settings (controller.rules)."""
    return Rules(probation_hits=probation_hits, min_residency_ms=int(min_residency_s * 1000),
                 in_use_ms=int(in_use_s * 1000))


def scenarios(hit_ms: float, miss_ms: float, window_s: float) -> list[tuple[str, Live]]:
    """Each live effect alone, then together (the defaults of mesh/settings.py), then fixes."""
    wall = dict(hit_ms=hit_ms, miss_ms=miss_ms)
    tel = dict(telemetry=True, window_s=window_s)
    live = live_rules()
    return [
        ("offline policy (trace.py)", Live()),
        ("+ wall-clock time only", Live(**wall)),
        ("+ churn guard min_residency_s 30", Live(**wall, rules=live_rules(in_use_s=0))),
        ("+ in_use_s 60", Live(**wall, rules=live_rules(min_residency_s=0))),
        ("+ both live rules", Live(**wall, rules=live)),
        ("+ telemetry lag, all-time counts", Live(**wall, **tel, book="delta", frequency="book")),
        ("+ telemetry, windowed value only", Live(**wall, **tel, book="set", frequency="book")),
        ("+ telemetry, windowed probation only", Live(**wall, **tel, book="delta", frequency="window")),
        ("+ telemetry, windowed (controller)", Live(**wall, **tel)),
        ("LIVE today: rules + windowed telemetry", Live(**wall, **tel, rules=live)),
        ("fix: all-time counts, live rules", Live(**wall, **tel, rules=live, book="delta", frequency="book")),
        ("fix: all-time counts, no churn guard", Live(**wall, **tel, rules=live_rules(min_residency_s=0),
                                                      book="delta", frequency="book")),
        ("fix: all-time counts, probation only", Live(**wall, **tel, book="delta", frequency="book")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--quick", action="store_true", help="100 models, 1000 requests")
    ap.add_argument("--sizes", type=pathlib.Path, help="JSON written by bench/density.py --dump "
                    "(measured sizes, load times, pod capacity); default: sizes modelled from the weights")
    ap.add_argument("--hit-ms", type=float, default=3.0)
    ap.add_argument("--miss-ms", type=float, default=70.0)
    ap.add_argument("--window-s", type=float, default=60.0)
    args = ap.parse_args()
    if args.quick:
        args.models, args.requests = 100, 1000
    trace = zipf_trace(args.models, args.requests, args.alpha, args.seed)
    if args.sizes:
        dump = json.loads(args.sizes.read_text())
        sizes, load_ms, per_pod = dump["sizes"], dump["load_ms"], dump["per_pod"]
    else:
        weights = mixed_sizes(args.models, args.seed, 64 << 10, 2 * MiB)
        # true resident footprints measure ~0.1 MiB + 1.7 x the weights (docs/BENCHMARKS.md, Footprints)
        sizes = [int(0.105 * MiB + 1.69 * w) for w in weights]
        per_pod = max(int(sum(sizes[i] for i in set(trace)) * args.fraction / args.pods), int(1.2 * max(sizes)))
        load_ms = [max(1, s // MiB) for s in sizes]
    caps = [per_pod] * args.pods
    cost = [max(1, s // MiB) for s in sizes]  # bench/trace.py's cost, whatever the pods measured
    lru = replay("lru", trace, sizes, cost, caps, None)
    opt = belady(trace, sizes, caps)
    print(f"livesim: {args.models} models, {args.requests} requests, {args.pods} pods x {per_pod / MiB:.1f} MiB; "
          f"hit {args.hit_ms} ms, miss {args.miss_ms} ms")
    print(f"  {'LRU':44s} {lru.hit_ratio:.4f}\n  {'Belady':44s} {opt.hit_ratio:.4f}")
    for name, live in scenarios(args.hit_ms, args.miss_ms, args.window_s):
        r = replay_live(name, trace, sizes, cost, caps, live)
        line = f"  {name:44s} {r.hit_ratio:.4f}"
        if args.sizes:
            m = replay_live(name, trace, sizes, load_ms, caps, live)
            line += f"   with the pods' measured load times as cost: {m.hit_ratio:.4f}"
        print(line)


if __name__ == "__main__":
    main()
