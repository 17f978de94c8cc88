"""Runtime: meshserve's runtime pod vs a minimal grpc.aio V2 server (bench/minimal_server.py)
running the same onnxruntime session, same load, same run, interleaved `--repeat` times.

    python bench/runtime.py [--duration 4] [--concurrency 8] [--repeat 3] [--model linear|mlp]

Prints each round, then medians with [min-max] and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import common

from mesh.cli import procs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", choices=("linear", "mlp"), default="linear")
    args = ap.parse_args()
    width = common.input_width(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        path = common.model_file(folder, args.model)
        mesh = common.start_mesh(folder / "mesh")
        minimal = None
        try:
            common.register(mesh, "bench", path)
            common.load("warm", mesh.router_address, "bench", 1, 1.0, [], width=width)
            pod = f"127.0.0.1:{mesh.ports['pod-0']}"
            port = common.free_port()
            minimal = common.start_script("minimal_server.py", [str(port), str(path)], folder / "min.log", port)
            c, d = args.concurrency, args.duration
            runs = common.interleaved({
                "minimal server": lambda: common.load("minimal server", f"127.0.0.1:{port}", "bench", c, d,
                                                      [minimal.pid], width=width),
                "meshserve runtime": lambda: common.load("meshserve runtime", pod, "bench", c, d,
                                                         [mesh.procs["pod-0"].pid], width=width),
            }, args.repeat)
        finally:
            if minimal is not None:
                procs.stop(minimal)
            mesh.stop()
    base, ours = runs["minimal server"], runs["meshserve runtime"]
    print(f"concurrency {c}, {d:.0f} s per run, {args.repeat} interleaved rounds, model {args.model}")
    print(common.summary("minimal server", base))
    print(common.summary("meshserve runtime", ours))
    print(f"runtime/minimal throughput {common.spread(common.ratios(ours, base))}x   "
          f"CPU per request {common.spread(common.ratios(ours, base, 'cpu_ms_per_req'))}x")


if __name__ == "__main__":
    main()
