"""Router overhead: the same closed-loop load against the runtime pod directly, through a bare
byte-forwarding grpc.aio proxy (bench/bare_proxy.py), and through the router, interleaved
`--repeat` times in one run.

    python bench/router_overhead.py [--duration 4] [--concurrency 8] [--repeat 3]

Server CPU per request counts the pod plus the hop in front of it (proxy or router); "hop CPU"
is that minus the same round's direct run.
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        path = common.model_file(folder)
        mesh = common.start_mesh(folder / "mesh")
        proxy = None
        try:
            common.register(mesh, "bench", path)
            pod = f"127.0.0.1:{mesh.ports['pod-0']}"
            pod_pid, router_pid = mesh.procs["pod-0"].pid, mesh.procs["router"].pid
            common.load("warm", mesh.router_address, "bench", 1, 1.0, [])  # cold load through the router
            port = common.free_port()
            proxy = common.start_script("bare_proxy.py", [str(port), pod], folder / "proxy.log", port)
            c, d = args.concurrency, args.duration
            runs = common.interleaved({
                "direct": lambda: common.load("direct", pod, "bench", c, d, [pod_pid]),
                "bare proxy": lambda: common.load("bare proxy", f"127.0.0.1:{port}", "bench", c, d,
                                                  [pod_pid, proxy.pid]),
                "router": lambda: common.load("router", mesh.router_address, "bench", c, d, [pod_pid, router_pid]),
            }, args.repeat)
        finally:
            if proxy is not None:
                procs.stop(proxy)
            mesh.stop()
    direct, bare, router = runs["direct"], runs["bare proxy"], runs["router"]
    print(f"concurrency {c}, {d:.0f} s per run, {args.repeat} interleaved rounds, 1x4 FP32 linear model")
    for name, results in runs.items():
        print(common.summary(name, results))
    hop_bare = [b.cpu_ms_per_req - x.cpu_ms_per_req for b, x in zip(bare, direct, strict=True)]
    hop_router = [r.cpu_ms_per_req - x.cpu_ms_per_req for r, x in zip(router, direct, strict=True)]
    print(f"router/proxy throughput {common.spread(common.ratios(router, bare))}x   "
          f"router/direct {common.spread(common.ratios(router, direct))}x")
    print(f"hop CPU per request (ms): proxy {common.spread(hop_bare, '{:.3f}')}, "
          f"router {common.spread(hop_router, '{:.3f}')}; router/proxy total CPU per request "
          f"{common.spread(common.ratios(router, bare, 'cpu_ms_per_req'))}x")


if __name__ == "__main__":
    main()
