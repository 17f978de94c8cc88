"""Footprint figures: what a pod books per model against what onnxruntime alone adds, over the
size ladder, and what measuring costs a load.

    python bench/footprint.py [--layers 6] [--loads 60]

Ladder: tests/unit/puller/ladder.py (fresh interpreters, the means over several process layouts;
the 100 MB rung of the test has two 50 MB layers, `--layers 6` adds the six-layer 100 MB model
whose onnxruntime-alone figure depends on the heap layout). Load cost: one Executor loads 12
models of 8 MiB weights (bench/miss.py's) in turn with room for 3 (older ones dropped, as a
full pod evicts), rotating per load between the current measurement (rss+heap+peak), the
previous one (glibc in-use heap delta) and none, so all three see the same heap history.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import statistics
import tempfile
import time

import common  # noqa: F401 - puts the repository on sys.path

from mesh import demo  # noqa: E402
from puller import footprint  # noqa: E402
from puller.executor import Executor  # noqa: E402
from puller.footprint import Footprint, HostProbe, Measured  # noqa: E402
from tests.unit.puller import ladder  # noqa: E402

MiB = 1 << 20


class HeapOnly:
    """The measurement before issue 8: glibc's in-use heap (mallinfo2) delta."""

    def __init__(self) -> None:
        self._heap = footprint._heap_in_use()

    def sample(self) -> int:
        chunks, mapped, _ = self._heap()  # type: ignore[misc]
        return chunks + mapped

    def mark_peak(self) -> None:
        pass

    def measured(self, before: int, after: int, *, new_session: bool) -> Measured:
        return Measured(max(after - before, 0), "heap")


class NoMeasure(HeapOnly):
    def sample(self) -> int:
        return 0

    def measured(self, before: int, after: int, *, new_session: bool) -> Measured:
        return Measured(1, "none")


_BEFORE = ladder._POD.replace("executor = Executor(1, 1, cuda=False)", """from puller import footprint
    from puller.footprint import Footprint, Measured
    class HeapOnly:
        def __init__(self):
            self.heap = footprint._heap_in_use()
        def sample(self):
            return sum(self.heap()[:2])
        def mark_peak(self):
            pass
        def measured(self, before, after, *, new_session):
            return Measured(max(after - before, 0), "heap")
    executor = Executor(1, 1, cuda=False, footprint=Footprint(HeapOnly()))""")


def run_ladder(folder: pathlib.Path, layers: int | None) -> None:
    models = ladder.models(folder)
    if layers:
        path = demo.save(ladder.mlp_model(100_000_000, layers), folder / f"mlp-100MB-{layers}layers.onnx")
        models[f"100MB ({layers} layers)"] = (path, 2, 4)
    print("| model | file | n × layouts | onnxruntime alone (per session) | booked: mean (min–max) | methods "
          "| pod grew (per model) | booked vs alone | before (heap delta) vs alone |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (path, n, layouts) in models.items():
        r = ladder.rung(path, n, layouts)
        old = ladder._child(_BEFORE, path, n)["booked"]
        old_mean = sum(old) / len(old)
        print(f"| {name} | {r['file'] / MiB:.3f} MiB | {n} × {layouts} | {r['alone'] / MiB:.3f} MiB "
              f"({', '.join(f'{a / MiB:.3f}' for a in r['alone_each'])}) | {r['booked_mean'] / MiB:.3f} "
              f"({r['booked_min'] / MiB:.3f}–{r['booked_max'] / MiB:.3f}) MiB | {', '.join(r['methods'])} | "
              f"{r['pod_per_session'] / MiB:.3f} MiB | {(r['booked_mean'] / r['alone'] - 1) * 100:+.1f} % | "
              f"{old_mean / MiB:.3f} MiB ({(old_mean / r['alone'] - 1) * 100:+.1f} %) |", flush=True)


class Timed:
    """Times a probe's own calls (a figure the box's load cannot blur the way it blurs loads)."""

    def __init__(self, probe: object) -> None:
        self.probe, self.seconds, self.loads = probe, 0.0, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.probe, name)

    def _timed(self, name: str, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return getattr(self.probe, name)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def sample(self) -> object:
        return self._timed("sample")

    def mark_peak(self) -> None:
        self._timed("mark_peak")

    def measured(self, before: object, after: object, *, new_session: bool) -> Measured:
        self.loads += new_session
        return self._timed("measured", before, after, new_session=new_session)  # type: ignore[return-value]


async def load_cost(folder: pathlib.Path, loads: int) -> None:
    logging.getLogger("puller.executor").setLevel(logging.ERROR)  # NoMeasure's file-size warnings
    paths = [demo.save(demo.linear_model(i, weight_bytes=8 * MiB), folder / f"m{i}.onnx") for i in range(12)]
    probes = {"current (rss+heap+peak)": Timed(HostProbe()), "before (heap delta)": Timed(HeapOnly()), "none": NoMeasure()}
    ex = Executor(1, 1, cuda=False)
    times: dict[str, list[float]] = {k: [] for k in probes}
    live: list[object] = []
    for i in range(loads + 12):
        name = list(probes)[i % len(probes)]
        ex.footprint = Footprint(probes[name])
        start = time.perf_counter()
        live.append(await ex.load(f"m{i}", str(paths[i % len(paths)])))
        if i >= 12:  # the first round fills the page cache and primes
            times[name].append((time.perf_counter() - start) * 1000)
        if len(live) > 3:
            live.pop(0)
    ex.close()
    print("\n| measurement | loads | load p50 | load p90 | time in the probe per load |\n|---|---|---|---|---|")
    for name, t in times.items():
        t.sort()
        probe = probes[name]
        spent = f"{probe.seconds / probe.loads * 1e6:.0f} µs" if isinstance(probe, Timed) and probe.loads else "-"
        print(f"| {name} | {len(t)} | {statistics.median(t):.1f} ms | {t[int(len(t) * 0.9)]:.1f} ms | {spent} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=0, help="also a 100 MB model of this many layers")
    parser.add_argument("--loads", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        run_ladder(folder, args.layers)
        asyncio.run(load_cost(folder, args.loads))


if __name__ == "__main__":
    main()
