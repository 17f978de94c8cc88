"""The data plane, measured (issue 14 item 5): the same closed-loop tritonclient load sent
straight to the runtime pod, through the Python router, and through Envoy (router/envoy.py),
interleaved `--repeat` times in one run, at several concurrencies, for one model and for many
(uniform and Zipf), with server CPU per request.

    python bench/dataplane.py [--duration 4] [--repeat 2] [--concurrency 1,8,32] [--models 200]
    python bench/dataplane.py --tls ...   # the public port over TLS (certificates made with openssl)

One mesh (etcd, placement, one runtime pod, one router with Envoy in front on free ports);
the Python router is measured on its own internal port (it is a complete router there). The
model: a 1 MB MLP (256 wide, 4 x MatMul+Relu, bench/common.mlp_model), [1, 256] FP32 requests;
the many-model runs spread over `--models` registrations of the same file (each its own
session on the pod). Server CPU counts the pod plus the hop in front of it (the Python router;
Envoy and the Python router for the Envoy path, since the router reads Envoy's access log).

`--tls`: the clients speak TLS to the router (MESH_ROUTER_TLS_CERT/KEY; the pods' hop stays
plaintext): "envoy" is a router whose Envoy terminates it, "python router" a second router with
MESH_ROUTER_ENVOY=off serving TLS itself (grpc's), "direct" the pod in plaintext.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import tempfile

import common
import grpc

from mesh import demo
from mesh.cli.local import LocalMesh

WIDTH, HIDDEN, LAYERS = 256, 256, 4


def _envoy_pid(config_dir: pathlib.Path) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"envoy") and str(config_dir).encode() in b" ".join(cmdline):
            return int(pid)
    raise RuntimeError(f"no Envoy process reading {config_dir}")


def internal_port(config_dir: pathlib.Path) -> int:
    """The Python router's own port behind Envoy (the router cluster of Envoy's bootstrap)."""
    boot = json.loads((config_dir / "bootstrap.json").read_text())
    (router,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "router"]
    return int(router["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
               ["socket_address"]["port_value"])


def _tls_mesh(folder: pathlib.Path, config_dir: pathlib.Path) -> tuple[LocalMesh, str]:
    """Two routers with TLS on the public port: "router" behind Envoy, "router-1" without."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from tests.pki import CA

    ca = CA.create(folder / "pki", "bench-ca")
    leaf = ca.issue("router")
    tls = {"MESH_ROUTER_TLS_CERT": str(leaf.cert), "MESH_ROUTER_TLS_KEY": str(leaf.key)}
    mesh = LocalMesh(state_dir=folder / "mesh", pods=1, routers=2, capacity="1GiB", allow_anonymous=True,
                     process_env={"router": {**tls, "MESH_ROUTER_ENVOY": "on",
                                             "MESH_ROUTER_ENVOY_CONFIG_DIR": str(config_dir)},
                                  "router-1": {**tls, "MESH_ROUTER_ENVOY": "off"}},
                     router_credentials=grpc.ssl_channel_credentials(ca.cert.read_bytes()))
    return mesh.start(timeout=90), str(ca.cert)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--models", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--tls", action="store_true", help="TLS from the clients to the routers")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        path = demo.save(common.mlp_model(WIDTH, HIDDEN, LAYERS), folder / "mlp-1mb.onnx")
        config_dir = folder / "envoy"
        ca = ""
        if args.tls:
            mesh, ca = _tls_mesh(folder, config_dir)
        else:
            mesh = common.start_mesh(folder / "mesh", env={
                "MESH_ROUTER_ENVOY": "on", "MESH_ROUTER_ENVOY_CONFIG_DIR": str(config_dir)}, capacity="1GiB")
        try:
            names = [f"m{i:03d}" for i in range(args.models)]
            for name in ["bench", *names]:
                common.register(mesh, name, path)
            pod = f"127.0.0.1:{mesh.ports['pod-0']}"
            pod_pid, router_pid = mesh.procs["pod-0"].pid, mesh.procs["router"].pid
            envoy_pid = _envoy_pid(config_dir)
            # The Python router: its own port behind Envoy, or (TLS) the second router, serving TLS itself.
            python, python_pid, python_ca = ((mesh.router_addresses[1], mesh.procs["router-1"].pid, ca) if args.tls
                                             else (f"127.0.0.1:{internal_port(config_dir)}", router_pid, ""))
            for name in ["bench", *names]:  # every model loaded (misses through Python) before measuring
                common.load("warm", python, name, 1, 0.05, [], processes=1, width=WIDTH, ca=python_ca)
            common.load("warm", mesh.router_address, "bench", 1, 1.0, [], processes=1, width=WIDTH, ca=ca)
            targets = {"direct": (pod, [pod_pid], ""), "python router": (python, [pod_pid, python_pid], python_ca),
                       "envoy": (mesh.router_address, [pod_pid, envoy_pid, router_pid], ca)}
            workloads = {"1 model": ("bench", 0.0), f"{args.models} uniform": (names, 0.0),
                         f"{args.models} zipf {args.zipf:g}": (names, args.zipf)}
            table = []
            for workload, (models, zipf) in workloads.items():
                for c in levels:
                    print(f"{workload}, c={c}:", flush=True)
                    runs = common.interleaved({
                        target: functools.partial(common.load, target, address, models, c, args.duration, pids,
                                                  processes=min(2, c), width=WIDTH, zipf=zipf, ca=cafile)
                        for target, (address, pids, cafile) in targets.items()}, args.repeat)
                    table.append((workload, c, runs))
        finally:
            mesh.stop()
    print("\n| workload | c | direct req/s | Python router req/s | Envoy req/s | Envoy ÷ Python (per round) "
          "| p99 ms direct / Python / Envoy | server CPU ms/req direct / Python / Envoy | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload, c, runs in table:
        d, p, e = runs["direct"], runs["python router"], runs["envoy"]
        ratio = common.ratios(e, p)
        med = common.median
        print(f"| {workload} | {c} | {med([r.rps for r in d]):.0f} | {med([r.rps for r in p]):.0f} | "
              f"{med([r.rps for r in e]):.0f} | {common.spread(ratio)} | "
              f"{med([r.p99_ms for r in d]):.2f} / {med([r.p99_ms for r in p]):.2f} / {med([r.p99_ms for r in e]):.2f} | "
              f"{med([r.cpu_ms_per_req for r in d]):.3f} / {med([r.cpu_ms_per_req for r in p]):.3f} / "
              f"{med([r.cpu_ms_per_req for r in e]):.3f} | {sum(r.errors for r in d + p + e)} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
