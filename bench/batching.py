"""Dynamic batching on vs off at several concurrencies, against the runtime pod directly,
interleaved `--repeat` times.

    python bench/batching.py [--duration 3] [--delay-us 500] [--repeat 3] [--model mlp|linear]
                             [--concurrency 1,8,32]

Two models from the same file: one registered plain, one with max_batch_size 32. "linear" is
1x4 -> 1x3 (onnxruntime's run is negligible); "mlp" is 3 x (MatMul + Relu), 512 -> 1024 ->
1024 -> 512, where the run cost matters and batching amortises it.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--delay-us", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", choices=("linear", "mlp"), default="mlp")
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    width = common.input_width(args.model)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        path = common.model_file(folder, args.model)
        mesh = common.start_mesh(folder / "mesh")
        try:
            common.register(mesh, "plain", path)
            common.register(mesh, "batched", path, max_batch_size=32, max_queue_delay_us=args.delay_us)
            for m in ("plain", "batched"):
                common.load("warm", mesh.router_address, m, 1, 1.0, [], width=width)
            pod, pid = f"127.0.0.1:{mesh.ports['pod-0']}", mesh.procs["pod-0"].pid
            d = args.duration
            for c in levels:
                runs = common.interleaved({
                    "off": lambda c=c: common.load(f"off c={c}", pod, "plain", c, d, [pid], width=width),
                    "on": lambda c=c: common.load(f"on  c={c}", pod, "batched", c, d, [pid], width=width),
                }, args.repeat)
                rows.append((c, runs["off"], runs["on"]))
        finally:
            mesh.stop()
    print(f"model {args.model}, max_batch_size 32, max_queue_delay_us {args.delay_us}, {d:.0f} s per run, "
          f"{args.repeat} interleaved rounds")
    for c, off, on in rows:
        print(common.summary(f"off c={c}", off))
        print(common.summary(f"on  c={c}", on))
        print(f"     c={c}: on/off throughput {common.spread(common.ratios(on, off))}x   "
              f"CPU/req {common.spread(common.ratios(on, off, 'cpu_ms_per_req'))}x")


if __name__ == "__main__":
    main()
