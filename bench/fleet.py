"""Fleet density: thousands of small registered models served from 2 pods, and what each
resident model costs in memory next to onnxruntime alone.

    python bench/fleet.py [--models 10000] [--weight-kib 100] [--pods 2] [--concurrency 8]
                          [--zipf-requests 10000] [--baseline-sessions 400]

Generates `--models` small models (mesh.demo.linear_model with ~`--weight-kib` KiB of
weights, each with its own random weights), starts a LocalMesh (router, 2 placements, pods,
etcd, Redis) on 127.0.0.1 with pods roomy enough to hold them all (`--capacity` per pod), and
registers them all through the registration API. Then every model is requested once in a
shuffled order (each request a cold miss) and a seeded Zipf trace of `--zipf-requests`
follows, all through the router with tritonclient at `--concurrency` requests at a time, each
with a deadline. Reports failed requests by gRPC code, the models resident at the end, the
pods' resident memory growth per resident model (VmRSS of the pod processes, before and
after), the bytes placement booked per model (the pods' measured footprints), and the same
per-session figure for onnxruntime ALONE: a fresh child process that creates
`--baseline-sessions` sessions of the same files (with one warm-up run each) and measures its
own VmRSS growth. Bounded: fixed counts, every request has a deadline.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.trace import zipf_trace  # noqa: E402

MiB = 1 << 20

_BASELINE = r"""
import json, sys, numpy as np, onnxruntime as ort
paths = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
x = np.ones((1, 4), np.float32)
def session(path):
    o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
    s = ort.InferenceSession(path, sess_options=o, providers=["CPUExecutionProvider"])
    s.run(None, {"input": x})
    return s
keep = [session(paths[0])]  # onnxruntime's one-time process costs, not charged to the models
before = rss()
keep += [session(p) for p in paths[1:]]
print(json.dumps({"sessions": len(paths) - 1, "rss_delta": rss() - before}))
"""


def baseline_per_session(paths: list[pathlib.Path]) -> float:
    """Resident bytes one more session adds in a process running onnxruntime alone."""
    out = subprocess.run([sys.executable, "-c", _BASELINE, json.dumps([str(p) for p in paths])],
                         capture_output=True, text=True, timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["rss_delta"] / res["sessions"]


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def register_all(address: str, files: dict[str, pathlib.Path], concurrency: int) -> float:
    import grpc

    from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

    channel = grpc.insecure_channel(address)
    stub = registry_pb2_grpc.ModelRegistryStub(channel)

    def one(item: tuple[str, pathlib.Path]) -> None:
        model_id, path = item
        for attempt in range(5):
            try:
                stub.RegisterModel(registry_pb2.RegisterModelRequest(
                    spec=types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri())), timeout=30)
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return
                if attempt == 4 or exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                time.sleep(0.2 * (attempt + 1))

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, files.items()))
    channel.close()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--weight-kib", type=int, default=100)
    ap.add_argument("--pods", type=int, default=2)
    ap.add_argument("--capacity", default="6GiB", help="per pod")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--zipf-requests", type=int, default=10_000)
    ap.add_argument("--baseline-sessions", type=int, default=400)
    ap.add_argument("--deadline-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lease-ttl-s", type=int, default=15)
    args = ap.parse_args()

    import numpy as np
    import tritonclient.grpc as triton

    from mesh import demo
    from mesh.cli.local import LocalMesh
    from mesh.pb.v1 import types_pb2

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fleet-"))
    t0 = time.monotonic()
    files = {f"f{i}": demo.save(demo.linear_model(i, weight_bytes=args.weight_kib * 1024), tmp / "models" / f"f{i}.onnx")
             for i in range(args.models)}
    file_bytes = sum(p.stat().st_size for p in files.values()) / len(files)
    print(f"fleet: {args.models} models of {file_bytes / 1024:.0f} KiB generated in {time.monotonic() - t0:.1f}s")

    per_session = baseline_per_session(list(files.values())[: args.baseline_sessions + 1])
    print(f"onnxruntime alone: {per_session / MiB:.3f} MiB resident per session "
          f"({args.baseline_sessions} sessions in a fresh process)")

    roots = str((tmp / "models").resolve())  # file:// is refused outside configured roots
    # Lease TTL 15 s, not 5: on the shared 2-core box (load average ~13 at 10,000 models) the
    # processes' lease renewals were starved past 5 s, placement stepped down as leader four
    # times and 4 requests got UNAVAILABLE; nothing here tests failover.
    mesh = LocalMesh(state_dir=tmp / "mesh", pods=args.pods, capacity=args.capacity, lease_ttl_s=args.lease_ttl_s,
                     redis=True, allow_anonymous=True,
                     env={"MESH_ROUTER_FILE_ROOTS": roots, "MESH_RUNTIME_FILE_ROOTS": roots}).start(timeout=120)
    try:
        secs = register_all(mesh.router_address, files, 16)
        print(f"registered {len(files)} models in {secs:.1f}s ({len(files) / secs:.0f}/s)")
        pods = [f"pod-{p}" for p in range(args.pods)]
        rss_before = {p: vm_rss(mesh.procs[p].pid) for p in pods}
        client = triton.InferenceServerClient(mesh.router_address)
        codes: collections.Counter[str] = collections.Counter()
        x = np.ones((1, 4), dtype=np.float32)

        def infer(model_id: str) -> None:
            inp = triton.InferInput("input", [1, 4], "FP32")
            inp.set_data_from_numpy(x)
            try:
                client.infer(model_id, [inp], client_timeout=args.deadline_s)
                codes["OK"] += 1
            except Exception as exc:  # noqa: BLE001 - counted by status, not fatal
                status = getattr(exc, "status", lambda: None)() or type(exc).__name__
                codes[str(status)] += 1

        order = list(files)
        random.Random(args.seed).shuffle(order)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            last = t0
            for n, _ in enumerate(pool.map(infer, order), 1):
                if n % 500 == 0:  # progress: placements per second as copies accumulate
                    now = time.monotonic()
                    print(f"  cold pass: {n} done, {500 / (now - last):.1f}/s over the last 500, "
                          f"{dict(codes)}", flush=True)
                    last = now
        cold_s = time.monotonic() - t0
        print(f"cold pass: {len(order)} first requests in {cold_s:.1f}s; {dict(codes)}")
        trace = zipf_trace(args.models, args.zipf_requests, 0.9, args.seed)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(infer, [f"f{i}" for i in trace]))
        print(f"zipf pass: {len(trace)} requests in {time.monotonic() - t0:.1f}s; totals {dict(codes)}")
        client.close()

        resident, booked = 0, 0
        with mesh.router_channel() as channel:  # one channel, pages of 500 (not one call per model)
            from mesh.pb.v1 import registry_pb2, registry_pb2_grpc

            stub, token = registry_pb2_grpc.ModelRegistryStub(channel), ""
            while True:
                page = stub.ListModels(registry_pb2.ListModelsRequest(page_size=500, page_token=token),
                                       timeout=60, metadata=mesh.auth_metadata)
                for status in page.models:
                    loaded = [c for c in status.copies if c.state == types_pb2.LOADED]
                    resident += len(loaded)
                    booked += sum(c.size_bytes for c in loaded)
                token = page.next_page_token
                if not token:
                    break
        grown = sum(vm_rss(mesh.procs[p].pid) - rss_before[p] for p in pods)
        failed = sum(n for code, n in codes.items() if code != "OK")
        print(f"resident copies at the end: {resident}; failed requests: {failed} of {sum(codes.values())}")
        if resident:
            print(f"pods' RSS growth per resident model {grown / resident / MiB:.3f} MiB "
                  f"({grown / resident / per_session:.2f}x onnxruntime alone); "
                  f"booked per model {booked / resident / MiB:.3f} MiB "
                  f"({booked / max(grown, 1):.2f}x the RSS growth)")
    finally:
        mesh.stop()


if __name__ == "__main__":
    main()
