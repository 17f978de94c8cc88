"""Overload: a runtime pod (directly, then through the router) offered 1x, 2x and 3x its measured
peak, open loop: goodput vs peak, how fast excess is shed, admitted latency vs baseline, RSS.

    python bench/overload.py [--duration 5] [--rows 128] [--concurrency 16] [--deadline 2] [--threads 1]

The model is a 1 MB MLP (bench/common.mlp_model 256 wide, 4 layers), FP32 [rows, 256]. Per path:
a closed loop at `--concurrency` measures the peak (ok/s) and the baseline latency; then each
level offers k x peak requests/s at fixed intervals from 2 client processes, each request with
a `--deadline` s deadline, never retried (open loop: every arrival is new demand). Every answer
is checked against onnxruntime's. Reports per level: offered and sent rate, goodput (ok/s and %
of peak), errors by code, shed latency p50/p99 (RESOURCE_EXHAUSTED answers) and how many carried
grpc-retry-pushback-ms, admitted (ok) p50/p99 and p99 / baseline p99, and the pod's and router's
RSS before / peak / after. 127.0.0.1 only; every phase bounded by `--duration`, every request
by its deadline, outstanding requests per client bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import pathlib
import tempfile
import threading
import time

import common
import numpy as np

WIDTH, HIDDEN, LAYERS = 256, 256, 4  # 262k FP32 weights: a 1 MB model
METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_OUTSTANDING = 4000  # per client process; beyond it an arrival is counted as client_overflow
PUSHBACK = "grpc-retry-pushback-ms"


def _client(address: str, model: str, x: np.ndarray, expected: np.ndarray, mode: str, load: float,
            duration: float, deadline: float, queue: mp.Queue) -> None:
    """One load process. mode "closed": `load` tasks in a loop; "open": `load` requests/s at
    fixed intervals. Puts (records, sent, send_window_s); a record is (code, seconds, pushback)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    body = request.SerializeToString()

    def check(response: bytes) -> str:
        out = pb.ModelInferResponse.FromString(response)
        got = np.frombuffer(out.raw_output_contents[0], np.float32).reshape(expected.shape)
        return "OK" if np.allclose(got, expected, rtol=1e-4, atol=1e-4) else "WRONG_ANSWER"

    async def main() -> tuple[list[tuple[str, float, str | None]], int, float]:
        # Several connections: one HTTP/2 connection caps streams in flight (100 on the router).
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(4)]
        calls = [c.unary_unary(METHOD) for c in channels]
        for call in calls:  # connect and warm (the pod may still be draining the last phase)
            for _ in range(100):
                try:
                    await call(body, timeout=60)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    await asyncio.sleep(0.2)
        records: list[tuple[str, float, str | None]] = []

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                response = await calls[i % len(calls)](body, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                hint = dict(exc.trailing_metadata() or ()).get(PUSHBACK)
                records.append((exc.code().name, time.perf_counter() - start, hint))
                return
            records.append((check(response), time.perf_counter() - start, None))

        t0 = time.perf_counter()
        end = t0 + duration
        sent = 0
        if mode == "closed":
            async def loop(k: int) -> None:
                nonlocal sent
                i = k
                while time.perf_counter() < end:
                    sent += 1
                    await one(i)
                    i += int(load)

            await asyncio.gather(*(loop(k) for k in range(int(load))))
            window = time.perf_counter() - t0
        else:
            tasks: set[asyncio.Task[None]] = set()
            n = int(duration * load)
            last = t0
            for i in range(n):
                delay = t0 + i / load - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                last = time.perf_counter()
                if len(tasks) >= MAX_OUTSTANDING:
                    records.append(("client_overflow", 0.0, None))
                    continue
                sent += 1
                task = asyncio.ensure_future(one(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            window = max(last - t0, 1e-9)
            await asyncio.gather(*tasks)
        for c in channels:
            await c.close()
        return records, sent, window

    queue.put(asyncio.run(main()))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssWatch:
    """Samples the RSS of some processes every 0.2 s; keeps the maxima."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = {name: rss_mib(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mib(pid))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.peak


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def run(address: str, x: np.ndarray, expected: np.ndarray, mode: str, load: float, args: argparse.Namespace,
        processes: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    share = load / processes
    workers = [ctx.Process(target=_client, args=(address, "mlp1m", x, expected, mode,
                                                 share if mode == "open" else max(1, round(share)),
                                                 args.duration, args.deadline, queue))
               for _ in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=args.duration + 120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    time.sleep(1.0)  # let the pod drain before the next phase
    records = [r for res in results for r in res[0]]
    window = max(res[2] for res in results)
    codes: dict[str, int] = {}
    for code, _, _ in records:
        codes[code] = codes.get(code, 0) + 1
    ok = [s for code, s, _ in records if code == "OK"]
    shed = [(s, hint) for code, s, hint in records if code == "RESOURCE_EXHAUSTED"]
    return {
        "sent_rps": sum(res[1] for res in results) / window,
        "goodput": len(ok) / window,
        "codes": codes,
        "ok_p50": pct(ok, 0.5), "ok_p99": pct(ok, 0.99),
        "shed_p50": pct([s for s, _ in shed], 0.5), "shed_p99": pct([s for s, _ in shed], 0.99),
        "shed_hinted": sum(1 for _, h in shed if h is not None), "shed": len(shed),
    }


def path(name: str, address: str, x: np.ndarray, expected: np.ndarray, args: argparse.Namespace,
         pids: dict[str, int]) -> list[str]:
    lines = [f"## {name} ({address})"]
    peak = run(address, x, expected, "closed", args.concurrency, args)
    lines.append(f"peak (closed loop, concurrency {args.concurrency}): {peak['goodput']:.0f} ok/s, "
                 f"p50 {peak['ok_p50']:.2f} ms, p99 {peak['ok_p99']:.2f} ms, codes {peak['codes']}")
    before = {n: rss_mib(p) for n, p in pids.items()}
    for k in (1, 2, 3):
        watch = RssWatch(pids)
        r = run(address, x, expected, "open", k * peak["goodput"], args)
        top = watch.stop()
        rss = ", ".join(f"{n} {before[n]:.0f}/{top[n]:.0f}/{rss_mib(p):.0f}" for n, p in pids.items())
        lines.append(
            f"{k}x: offered {k * peak['goodput']:.0f}/s, sent {r['sent_rps']:.0f}/s; goodput "
            f"{r['goodput']:.0f} ok/s = {100 * r['goodput'] / peak['goodput']:.0f}% of peak; codes {r['codes']}; "
            f"shed p50 {r['shed_p50']:.2f} ms p99 {r['shed_p99']:.2f} ms ({r['shed_hinted']}/{r['shed']} with "
            f"pushback); admitted p50 {r['ok_p50']:.2f} ms p99 {r['ok_p99']:.2f} ms = "
            f"{r['ok_p99'] / peak['ok_p99']:.1f}x baseline p99; RSS MiB before/peak/after: {rss}")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    ap.add_argument("--rows", type=int, default=128, help="rows per request")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop concurrency of the peak run")
    ap.add_argument("--deadline", type=float, default=2.0, help="deadline of every request, s")
    ap.add_argument("--queue-per-model", type=int, default=0, help="MESH_RUNTIME_MAX_QUEUE_PER_MODEL (0: default)")
    ap.add_argument("--threads", type=int, default=1, help="MESH_RUNTIME_EXECUTOR_THREADS of the pod")
    args = ap.parse_args()
    import onnxruntime as ort

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        model_path = common.demo.save(common.mlp_model(WIDTH, HIDDEN, LAYERS), folder / "mlp1m.onnx")
        x = np.random.default_rng(0).standard_normal((args.rows, WIDTH)).astype(np.float32)
        expected = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        env = {"MESH_RUNTIME_MAX_QUEUE_PER_MODEL": str(args.queue_per_model),
               "MESH_RUNTIME_EXECUTOR_THREADS": str(args.threads)}
        mesh = common.start_mesh(folder / "mesh", env)
        try:
            common.register(mesh, "mlp1m", model_path)
            run(mesh.router_address, x, expected, "closed", 1, argparse.Namespace(**{**vars(args), "duration": 1.0}), 1)
            pod = f"127.0.0.1:{mesh.ports['pod-0']}"
            pids = {"pod": mesh.procs["pod-0"].pid, "router": mesh.procs["router"].pid}
            lines = [f"model 1 MB MLP, [{args.rows}, {WIDTH}] FP32 per request, {args.duration:.0f} s per phase, "
                     f"deadline {args.deadline:.1f} s, {args.threads} executor thread(s), queue per model "
                     f"{args.queue_per_model or 'default'}; "
                     f"load average at start {load0:.2f} on {os.cpu_count()} CPUs"]
            print(lines[0], flush=True)
            lines += path("direct to the pod", pod, x, expected, args, pids)
            lines += path("through the router", mesh.router_address, x, expected, args, pids)
        finally:
            mesh.stop()
    lines.append(f"load average at end {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
