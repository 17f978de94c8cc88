"""First-load overhead of the load sandbox (puller/sandbox.py): `Executor.load` of a model the
pod has no verdict for, with the sandbox on and off, and with a cached verdict.

    python bench/sandbox.py [--rounds 7] [--sizes 0,4,64]

For each model size (MiB of weights; 0: the tiny linear model) every round writes a fresh file
(new bytes, so no verdict is cached: the child runs), then loads it in an Executor with the
sandbox on, then loads it again (the verdict is cached: no child), and loads another fresh
file with the sandbox off. Prints the median of each and the overhead. In one process, no
mesh: only the load path differs. The load average is printed: on a shared box it moves
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh import demo  # noqa: E402
from puller.executor import Executor  # noqa: E402
from puller.sandbox import Sandbox  # noqa: E402

MiB = 1 << 20


async def _timed(executor: Executor, name: str, path: pathlib.Path) -> float:
    start = time.perf_counter()
    await executor.load(name, str(path))
    return (time.perf_counter() - start) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="0,4,64")
    args = parser.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    on = Sandbox(4 << 30, 120, None, 1, ["CPUExecutionProvider"])
    off = Sandbox(4 << 30, 120, None, 1, ["CPUExecutionProvider"], enabled=False)
    with_box, without = Executor(1, 1, cuda=False, sandbox=on), Executor(1, 1, cuda=False, sandbox=off)
    await on.start()
    await on.started()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rounds} rounds; medians in ms")
    print(f"{'weights':>8} {'off':>8} {'on, first':>10} {'on, cached':>11} {'overhead':>9}")
    seed = 0
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            firsts, cached, offs = [], [], []
            for _ in range(args.rounds):
                seed += 1
                a = demo.save(demo.linear_model(seed, weight_bytes=size * MiB), folder / f"a{seed}" / "model.onnx")
                b = demo.save(demo.linear_model(seed + 10_000, weight_bytes=size * MiB), folder / f"b{seed}" / "model.onnx")
                firsts.append(await _timed(with_box, "m", a))
                cached.append(await _timed(with_box, "m", a))
                offs.append(await _timed(without, "m", b))
            f, c, o = (statistics.median(x) for x in (firsts, cached, offs))
            print(f"{size:>6}Mi {o:>8.1f} {f:>10.1f} {c:>11.1f} {f - o:>+9.1f}")
    finally:
        with_box.close()
        without.close()


if __name__ == "__main__":
    asyncio.run(main())
