"""Shared bench machinery: closed-loop multi-process load on tritonclient.grpc.aio, server CPU
per request from /proc, and starting a one-pod mesh on free loopback ports.

Load processes are started with multiprocessing's spawn context (a fresh interpreter, so the
tritonclient protobuf classes never meet mesh.pb.inference). Every run is bounded by its
duration; nothing here targets anything but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import os
import pathlib
import sys
import time
from collections.abc import Callable

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mesh import demo  # noqa: E402
from mesh.cli import procs  # noqa: E402
from mesh.cli.local import LocalMesh  # noqa: E402
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclasses.dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_req: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def line(self) -> str:
        return (f"{self.name:<28} {self.rps:9.0f} req/s  p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms  "
                f"server CPU {self.cpu_ms_per_req:5.3f} ms/req  errors {self.errors}")


def _client(address: str, model: str | list[str], tasks: int, duration: float, rows: int, width: int,
            queue: mp.Queue, zipf: float = 0.0, ca: str = "") -> None:
    import numpy as np
    import tritonclient.grpc.aio as tc

    models = [model] if isinstance(model, str) else model
    rng = np.random.default_rng(os.getpid())
    weights = 1.0 / np.arange(1, len(models) + 1) ** zipf  # zipf 0: uniform
    picks = iter(rng.choice(len(models), size=1_000_000, p=weights / weights.sum()).tolist())

    async def main() -> tuple[list[float], int]:
        client = tc.InferenceServerClient(address, ssl=True, root_certificates=ca) if ca else \
            tc.InferenceServerClient(address)
        x = rng.standard_normal((rows, width)).astype(np.float32)
        inp = tc.InferInput("input", [rows, width], "FP32")
        inp.set_data_from_numpy(x)
        await client.infer(models[0], [inp], client_timeout=60)  # connect + warm
        lat: list[float] = []
        errors = 0
        end = time.perf_counter() + duration

        async def loop() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < end:
                try:
                    await client.infer(models[next(picks)], [inp], client_timeout=30)
                except Exception:
                    errors += 1
                    continue
                lat.append(time.perf_counter() - start)

        await asyncio.gather(*(loop() for _ in range(tasks)))
        await client.close()
        return lat, errors

    queue.put(asyncio.run(main()))


def load(name: str, address: str, model: str | list[str], concurrency: int, duration: float,
         server_pids: list[int], processes: int = 2, rows: int = 1, width: int = 4, zipf: float = 0.0,
         ca: str = "") -> Result:
    """Closed loop: `concurrency` requests in flight over `processes` client processes; each
    request names one of `model` (a list: picked uniformly, or by Zipf(`zipf`) over its order).
    `ca`: TLS to `address`, trusting that CA file."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    processes = max(1, min(processes, concurrency))
    per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    workers = [ctx.Process(target=_client, args=(address, model, n, duration, rows, width, queue, zipf, ca))
               for n in per]
    for w in workers:
        w.start()
    time.sleep(min(1.0, duration / 5))  # let clients connect and warm before measuring CPU
    cpu0 = sum(cpu_seconds(p) for p in server_pids)
    t0 = time.perf_counter()
    results = [queue.get(timeout=duration + 120) for _ in workers]
    t1 = time.perf_counter()
    cpu1 = sum(cpu_seconds(p) for p in server_pids)
    for w in workers:
        w.join(timeout=30)
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    n = len(lat)
    seconds = max(duration, 1e-9)
    del t0, t1
    cpu_per = (cpu1 - cpu0) / n * 1000 if n else 0.0  # CPU window ~ the clients' measured window
    return Result(name, n, errors, seconds, lat[n // 2] * 1000 if n else 0.0,
                  lat[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0, cpu_per)


def model_file(folder: pathlib.Path, kind: str = "linear") -> pathlib.Path:
    """The bench model: "linear" (1x4 -> 1x3, run cost negligible) or "mlp" (MLP_WIDTH wide)."""
    model = demo.linear_model(0) if kind == "linear" else mlp_model(MLP_WIDTH, MLP_HIDDEN, MLP_LAYERS)
    return demo.save(model, folder / f"bench-{kind}.onnx")


MLP_WIDTH, MLP_HIDDEN, MLP_LAYERS = 512, 1024, 3


def input_width(kind: str) -> int:
    return 4 if kind == "linear" else MLP_WIDTH


def mlp_model(width: int, hidden: int, layers: int):  # noqa: ANN201
    """A compute-heavier model: `layers` x (MatMul + Relu), FP32 [batch, width] -> [batch, width],
    so onnxruntime's run is a visible part of a request's cost."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev, dims = [], [], "input", [width] + [hidden] * (layers - 1) + [width]
    for i in range(layers):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "output" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return demo._finish(graph)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def interleaved(runs: dict[str, Callable[[], Result]], repeat: int) -> dict[str, list[Result]]:
    """Runs every configuration `repeat` times, alternating the order each round (A B C, C B A,
    ...), so drift in the shared machine's load hits every configuration alike."""
    out: dict[str, list[Result]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeat):
        for name in names if r % 2 == 0 else reversed(names):
            result = runs[name]()
            out[name].append(result)
            print(f"  round {r + 1}: {result.line()}", flush=True)
    return out


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """median [min-max] of values."""
    return f"{fmt.format(median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def summary(name: str, results: list[Result]) -> str:
    return (f"{name:<22} req/s {spread([r.rps for r in results], '{:.0f}')}  "
            f"p50 {median([r.p50_ms for r in results]):.2f} ms  p99 {median([r.p99_ms for r in results]):.2f} ms  "
            f"CPU/req {spread([r.cpu_ms_per_req for r in results], '{:.3f}')} ms  "
            f"errors {sum(r.errors for r in results)}")


def ratios(a: list[Result], b: list[Result], attr: str = "rps") -> list[float]:
    """Per-round ratios a/b (the same round ran both, close in time)."""
    return [getattr(x, attr) / max(getattr(y, attr), 1e-9) for x, y in zip(a, b, strict=True)]


def start_mesh(folder: pathlib.Path, env: dict[str, str] | None = None, capacity: str = "256MiB") -> LocalMesh:
    """etcd + placement + one runtime pod + router, on free ports."""
    mesh = LocalMesh(state_dir=folder, pods=1, capacity=capacity, env=env or {}, allow_anonymous=True)
    return mesh.start(timeout=90)


def register(mesh: LocalMesh, model_id: str, path: pathlib.Path, **spec: int) -> None:
    with (grpc.secure_channel(mesh.router_address, mesh.router_credentials) if mesh.router_credentials
          else grpc.insecure_channel(mesh.router_address)) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).RegisterModel(
            registry_pb2.RegisterModelRequest(spec=types_pb2.ModelSpec(
                model_id=model_id, storage_uri=path.resolve().as_uri(), **spec)), timeout=30)


def start_script(script: str, args: list[str], log: pathlib.Path, port: int):  # noqa: ANN201
    """Starts bench/<script> as a child process and waits for its port."""
    import subprocess

    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), *args],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    procs.wait_port("127.0.0.1", port, 60, proc)
    return proc


def free_port() -> int:
    return procs.free_port()
