"""Density benchmark: many models, pods holding ~10% of their bytes, a seeded Zipf trace.

    python bench/density.py [--quick] [--models N] [--requests R] [--alpha A] [--offline-only]
                            [--dump sizes.json]

Generates N ONNX models of mixed sizes (mesh.demo.linear_model, log-uniform weight bytes),
starts a LocalMesh on 127.0.0.1 with roomy pods, loads every model the trace uses once to
measure its size (calibration), then replaces the pods by pods whose total capacity is
`--fraction` (10%) of the measured bytes and replays the trace through the router with
tritonclient. Reports the router's hit ratio (mesh_cache_hits_total / misses), miss latency
p50/p99 (client side), loads, evictions and failed requests — beside the same trace replayed
offline, with the sizes the live planner booked last (bench/trace.py) through plain LRU, our policy (the same planner code) and Belady,
and through bench/livesim.py's replay of what the live planner sees (the live rules, router
telemetry's flush and buckets, wall-clock time at the hit and miss latencies just measured), so
a gap between the live mesh and its offline replay shows. Models resident at once per pod are
sampled from the pods' mesh_models_loaded every 250 requests. `--dump` writes the measured
sizes, load times and pod capacity for `python bench/livesim.py --sizes`.

Placement runs with its default settings (the eviction churn guard is off by default since
this benchmark showed what it cost: docs/PLACEMENT.md, "Why the live mesh trailed its replay").
Bounded: every request has a deadline, the trace has a fixed length.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.livesim import Live, live_rules, replay_live  # noqa: E402
from bench.trace import belady, mixed_sizes, replay, zipf_trace  # noqa: E402
from placement.policy import Rules  # noqa: E402

MiB = 1 << 20


def offline(trace: list[int], sizes: list[int], load_ms: list[int], capacities: list[int],
            as_live: Live | None = None) -> None:
    lru = replay("lru", trace, sizes, load_ms, capacities, None)
    ours = replay("policy", trace, sizes, load_ms, capacities, Rules(probation_hits=1))
    opt = belady(trace, sizes, capacities)
    rows = [lru, ours, opt]
    if as_live is not None:
        rows.append(replay_live("as-live", trace, sizes, load_ms, capacities, as_live))
    for r in rows:
        print(f"  offline {r.name:7s} hit ratio {r.hit_ratio:.4f}  ({r.hit_ratio / lru.hit_ratio:.2f}x LRU)"
              f"  misses {r.misses}  evictions {r.evictions}")
    gap = opt.hit_ratio - lru.hit_ratio
    print(f"  half the LRU-Belady gap: {lru.hit_ratio + gap / 2:.4f}")


def live(args: argparse.Namespace, trace: list[int], weights: list[int]) -> list[int]:
    import numpy as np
    import tritonclient.grpc as triton

    from mesh import demo
    from mesh.cli.local import LocalMesh

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="density-"))
    used = sorted(set(trace))
    t0 = time.monotonic()
    files = {i: demo.save(demo.linear_model(i, weight_bytes=w), tmp / f"d{i}.onnx") for i, w in enumerate(weights)}
    print(f"generated {len(files)} models in {time.monotonic() - t0:.1f}s ({len(used)} of them in the trace)")
    telemetry = shutil.which("redis-server") is not None  # routers -> Redis -> placement, as deployed
    env: dict[str, str] = {}
    mesh = LocalMesh(state_dir=tmp / "mesh", pods=args.pods, capacity="8GiB", lease_ttl_s=3,
                     redis=telemetry, env=env, allow_anonymous=True).start(timeout=90)
    try:
        t0 = time.monotonic()
        for i, path in files.items():
            mesh.register(f"d{i}", path)
        print(f"registered {len(files)} models in {time.monotonic() - t0:.1f}s; telemetry {'on' if telemetry else 'off'}")
        client = triton.InferenceServerClient(mesh.router_address)

        errors: collections.Counter[str] = collections.Counter()
        samples: list[str] = []

        def infer(i: int) -> tuple[bool, float]:
            inp = triton.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
            start = time.monotonic()
            try:
                client.infer(f"d{i}", [inp], client_timeout=60)
                return True, time.monotonic() - start
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                status = getattr(exc, "status", lambda: None)() or type(exc).__name__
                errors[str(status)] += 1
                if len(samples) < 5:
                    samples.append(f"d{i}: {str(exc)[:300]}")
                return False, time.monotonic() - start

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(infer, used))  # calibration: measured sizes
        measured = {i: mesh.get_model(f"d{i}").size_bytes for i in used}
        total = sum(measured.values())
        # at least room for the largest model, else it could never load
        per_pod = max(int(total * args.fraction / args.pods), int(1.2 * max(measured.values())))
        for p in range(args.pods):
            mesh.stop_process(f"pod-{p}")
        for p in range(args.pods):
            mesh.pod_env[args.pods + p] = {"MESH_RUNTIME_CAPACITY": str(per_pod)}
            mesh.start_pod(args.pods + p)
        mesh.wait_instances({f"pod-{args.pods + p}" for p in range(args.pods)}, timeout=60)
        print(f"calibrated: {total / MiB:.1f} MiB measured, {args.pods} pods x {per_pod / MiB:.1f} MiB; "
              f"placement settings {env or 'defaults'}")
        pods = [f"pod-{args.pods + p}" for p in range(args.pods)]
        resident: dict[str, list[float]] = {p: [] for p in pods}

        def sample() -> None:
            for p in pods:
                loaded = [v for k, v in mesh.scrape(p).items() if k.startswith("mesh_models_loaded")]
                resident[p].append(loaded[0] if loaded else 0.0)

        before = mesh.scrape("router")
        pbefore = mesh.scrape("placement")
        t0 = time.monotonic()
        results = []
        for n, i in enumerate(trace):
            results.append(infer(i))
            if n % 250 == 249:
                sample()
        secs = time.monotonic() - t0
        after = mesh.scrape("router")
        pafter = mesh.scrape("placement")

        def delta(a: dict, b: dict, key: str) -> float:
            return a.get(key, 0.0) - b.get(key, 0.0)

        hits = delta(after, before, 'mesh_cache_hits_total{service="router"}')
        misses = delta(after, before, 'mesh_cache_misses_total{service="router"}')
        evictions = sum(v - pbefore.get(k, 0.0) for k, v in pafter.items() if k.startswith("mesh_evictions_total"))
        loads = delta(pafter, pbefore, 'mesh_placements_total{result="ok"}')
        failed = sum(1 for ok, _ in results if not ok)
        lat = sorted(d for _, d in results)
        slow = lat[int(len(lat) * (hits / max(hits + misses, 1))):]  # the slowest requests ~ the misses
        p50 = statistics.median(slow) if slow else 0.0
        p99 = slow[min(len(slow) - 1, int(len(slow) * 0.99))] if slow else 0.0
        fast = lat[: len(lat) - len(slow)]
        hit_ms = 1000 * statistics.fmean(fast) if fast else 1.0
        miss_ms = 1000 * statistics.fmean(slow) if slow else 1.0
        print(f"  live    hit ratio {hits / max(hits + misses, 1):.4f}  misses {misses:.0f}  loads {loads:.0f}  "
              f"evictions {evictions:.0f}  failed {failed}  miss latency p50 {p50 * 1000:.1f} ms "
              f"p99 {p99 * 1000:.1f} ms  ({len(trace)} requests in {secs:.0f}s: hits ~{hit_ms:.1f} ms, "
              f"misses ~{miss_ms:.1f} ms on average)")
        if errors:
            print(f"  failed requests by code: {dict(errors)} (calibration included); e.g. {samples}")
        for p in pods:
            r = resident[p]
            if r:
                print(f"  {p}: models resident at once: mean {statistics.fmean(r):.0f}, min {min(r):.0f}, "
                      f"max {max(r):.0f} ({len(r)} samples)")
        client.close()
        # The offline replays get the sizes the live planner booked last (each load measures
        # its copy again; under churn a model reuses freed heap and measures less than at its
        # first load, in calibration), so both sides pack the same bytes.
        status = {i: mesh.get_model(f"d{i}") for i in used}
        sizes = [(status[i].size_bytes or measured[i]) if i in status else 0 for i in range(len(weights))]
        load_ms = [status[i].load_ms if i in status else 0 for i in range(len(weights))]
        print(f"  sizes booked at the end: {sum(sizes) / MiB:.1f} MiB (calibration measured {total / MiB:.1f} MiB)")
        if args.dump:
            args.dump.write_text(json.dumps({"sizes": sizes, "load_ms": load_ms, "per_pod": per_pod}))
        as_live = Live(hit_ms=hit_ms, miss_ms=miss_ms, rules=live_rules(min_residency_s=0.0),
                       telemetry=telemetry, book="delta", frequency="book")
        print(f"offline replays with the sizes booked ({args.pods} pods x {per_pod / MiB:.1f} MiB; "
              f"as-live: bench/livesim.py with the live rules and latencies):")
        offline(trace, sizes, [max(1, s // MiB) for s in sizes], [per_pod] * args.pods, as_live)
        return sizes
    finally:
        mesh.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--quick", action="store_true", help="100 models, 1000 requests")
    ap.add_argument("--offline-only", action="store_true", help="skip the live mesh")
    ap.add_argument("--dump", type=pathlib.Path, help="write measured sizes / load times / capacity as JSON")
    args = ap.parse_args()
    if args.quick:
        args.models, args.requests = 100, 1000
    trace = zipf_trace(args.models, args.requests, args.alpha, args.seed)
    weights = mixed_sizes(args.models, args.seed, 64 << 10, 2 * MiB)
    print(f"density: {args.models} models, {args.requests} requests, Zipf alpha {args.alpha}, seed {args.seed}")
    if args.offline_only:
        per_pod = max(int(sum(weights) * args.fraction / args.pods), int(1.2 * max(weights)))
        print(f"offline replays with the nominal sizes ({args.pods} pods x {per_pod / MiB:.1f} MiB):")
        offline(trace, weights, [max(1, w // MiB) for w in weights], [per_pod] * args.pods)
        return
    live(args, trace, weights)


if __name__ == "__main__":
    main()
