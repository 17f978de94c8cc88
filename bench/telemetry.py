"""Usage telemetry cost: `Telemetry.record` on the request path against a bare Counter
increment (baseline, same run), and the cost of one pipelined flush to a real redis-server on
127.0.0.1 (started and stopped here), for N distinct models, with Redis up and killed.

    python bench/telemetry.py --records 200000 --models 1000 --flushes 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.cli import procs  # noqa: E402
from mesh.cli.local import start_redis  # noqa: E402
from mesh.metrics import Metrics  # noqa: E402
from mesh.telemetry import TelemetryKeys, client  # noqa: E402
from router.telemetry import Telemetry  # noqa: E402


def per_op_ns(fn, ids: list[str]) -> float:
    start = time.perf_counter_ns()
    for m in ids:
        fn(m)
    return (time.perf_counter_ns() - start) / len(ids)


async def flush_ms(t: Telemetry, models: int, flushes: int) -> list[float]:
    out = []
    for _ in range(flushes):
        for i in range(models):
            t.record(f"model-{i}")
        start = time.perf_counter()
        await t.flush()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--flushes", type=int, default=20)
    args = ap.parse_args()
    ids = [f"model-{i % args.models}" for i in range(args.records)]

    baseline: collections.Counter[str] = collections.Counter()

    def bare(m: str) -> None:
        baseline[m] += 1

    tel = Telemetry(None, TelemetryKeys("/bench"), Metrics())
    base_ns = per_op_ns(bare, ids)
    rec_ns = per_op_ns(tel.record, ids)
    print(f"record(): {rec_ns:.0f} ns/op; bare Counter increment: {base_ns:.0f} ns/op; "
          f"ratio {rec_ns / base_ns:.2f}x")

    port = procs.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_redis(port, pathlib.Path(tmp) / "redis.log")
        try:
            async def run() -> tuple[list[float], list[float], float]:
                metrics = Metrics()
                t = Telemetry(client(f"redis://127.0.0.1:{port}/0", 0.5), TelemetryKeys("/bench"), metrics)
                up = await flush_ms(t, args.models, args.flushes)
                procs.stop(proc)
                down = await flush_ms(t, args.models, min(args.flushes, 5))
                dropped = metrics.registry.get_sample_value("mesh_telemetry_samples_total", {"result": "dropped"})
                await t.redis.aclose()
                return up, down, dropped or 0.0

            up, down, dropped = asyncio.run(run())
        finally:
            procs.stop(proc)
    print(f"flush of {args.models} models, Redis up:   median {statistics.median(up):.2f} ms, "
          f"max {max(up):.2f} ms ({args.flushes} flushes)")
    print(f"flush of {args.models} models, Redis down: median {statistics.median(down):.2f} ms, "
          f"max {max(down):.2f} ms; {dropped:.0f} samples dropped and counted")


if __name__ == "__main__":
    main()
