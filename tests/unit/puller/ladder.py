"""The footprint ladder: models of ~0.1, 1, 10 and 100 MB, each loaded n times in a fresh
interpreter through the pod's Executor (what it books) and n times through onnxruntime alone
(what it really adds), so the two can be compared. Used by test_footprint_ladder.py and
bench/footprint.py.

"onnxruntime alone" is `ort.InferenceSession(path)` + one warm-up run per session, with the
pod's session options, created on a worker thread as the pod's executor does (glibc gives a
worker thread its own malloc arena, whose fragmentation differs: a 100 MB model adds ~190 MiB
there, ~150 MiB from the main thread), after one throwaway session of the same model; the
figure is the growth of RssAnon over the n sessions divided by n.

Where glibc's heaps land (address randomisation, even the length of the model's path) decides
how a load's freed buffers fragment: a 100 MB model's onnxruntime-alone figure is ~150 MiB in
one process layout and ~185 MiB in another, the same each time for a given layout, and a 1 MB
model's between ~1.4 and ~1.8 MiB. So each rung runs both children over several paths of
different lengths (links to the same file: other layouts) and compares the means.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mesh import demo

ROOT = pathlib.Path(__file__).resolve().parents[3]
MiB = 1 << 20
# name: (weight bytes, layers, n, layouts). The 100 MB rung has two 50 MB layers: glibc always
# mmaps chunks over 32 MiB, so its figure is the same in every layout; with six 16.7 MB layers
# onnxruntime alone adds 150-185 MiB by layout (bench/footprint.py --layers 6 shows it).
SIZES = {
    "0.1MB": (100_000, 6, 100, 2),
    "1MB": (1_000_000, 6, 20, 6),
    "10MB": (10_000_000, 6, 6, 8),
    "100MB": (100_000_000, 2, 2, 1),
}


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", demo.OPSET)])
    model.ir_version = demo.IR_VERSION  # onnx writes IR 14 by default; onnxruntime reads <= 13
    onnx.checker.check_model(model)
    return model


def mlp_model(weight_bytes: int, layers: int = 6, seed: int = 0) -> onnx.ModelProto:
    """An MLP of `layers` square FP32 layers (MatMul + Add, Relu between) holding about
    `weight_bytes` of real, random initializers. input / output: FP32 [batch, width]."""
    width = max(8, int(math.sqrt(weight_bytes / 4 / layers)))
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / width).astype(np.float32)
        b = rng.standard_normal((width,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        out = "output" if i == layers - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"])]
        if i == layers - 1:
            nodes += [helper.make_node("Add", [f"m{i}", f"B{i}"], [out])]
        else:
            nodes += [helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]), helper.make_node("Relu", [f"a{i}"], [out])]
        x = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return _finish(graph)


def big_tensor_model(columns: int) -> onnx.ModelProto:
    """~200 bytes that build a [batch, columns] FP32 tensor on every run (Expand of the input,
    then ReduceSum): 4 * columns bytes per row of the batch. input / output: FP32 [batch, 1]."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["input", "Shape"], ["big"]),
         helper.make_node("ReduceSum", ["big", "Axis"], ["output"], keepdims=1)],
        "big_tensor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1, columns], dtype=np.int64), "Shape"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "Axis")],
    )
    return _finish(graph)


_COMMON = """
import concurrent.futures, json, sys
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
path, n = sys.argv[1], int(sys.argv[2])
"""

_ALONE = _COMMON + """
import numpy as np, onnxruntime as ort
def create():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    width = session.get_inputs()[0].shape[1]
    session.run(None, {"input": np.ones((1, width), np.float32)})
    return session
def body():
    create()  # the throwaway session: onnxruntime's one-time costs
    before = anon()
    sessions = [create() for _ in range(n)]
    return (anon() - before) / n
print(json.dumps({"per_session": concurrent.futures.ThreadPoolExecutor(1).submit(body).result()}))
"""

_POD = _COMMON + """
import asyncio, gc
from puller.executor import Executor
async def main():
    executor = Executor(1, 1, cuda=False)
    throwaway = await executor.load("throwaway", path)  # primes and calibrates, as a pod's first load does
    del throwaway
    # asyncio / concurrent futures may still hold the throwaway: drop them before the baseline.
    await asyncio.get_running_loop().run_in_executor(executor.pool, gc.collect)
    before = anon()
    models = [await executor.load(f"m{i}", path) for i in range(n)]
    grown = anon() - before
    return {"booked": [m.size_bytes for m in models], "methods": sorted({m.measure_method for m in models}),
            "load_ms": [m.load_ms for m in models], "per_session": grown / n}
print(json.dumps(asyncio.run(main())))
"""


def _child(script: str, path: pathlib.Path, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", script, str(path), str(n)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"ladder child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rung(path: pathlib.Path, n: int, layouts: int) -> dict:
    """One model: onnxruntime alone's per-session growth and what the pod booked, n each, the
    means over `layouts` process layouts."""
    alone, grown, booked, methods, load_ms = [], [], [], set(), []
    for i in range(layouts):
        link = path.with_name(f"{path.stem}-{'x' * (11 * i)}.onnx")
        if not link.exists():
            link.symlink_to(path.name)
        alone.append(_child(_ALONE, link, n)["per_session"])
        pod = _child(_POD, link, n)
        booked += pod["booked"]
        grown.append(pod["per_session"])
        methods |= set(pod["methods"])
        load_ms += pod["load_ms"]
    return {
        "file": path.stat().st_size, "n": n, "alone": sum(alone) / len(alone), "alone_each": alone,
        "booked_mean": sum(booked) / len(booked), "booked_min": min(booked), "booked_max": max(booked),
        "methods": sorted(methods), "pod_per_session": sum(grown) / len(grown),
        "load_ms": sorted(load_ms)[len(load_ms) // 2],
    }


def models(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, int, int]]:
    """{size name: (model file, n, layouts)}, written once into `folder`."""
    out = {}
    for name, (weight_bytes, layers, n, layouts) in SIZES.items():
        path = folder / f"mlp-{name}.onnx"
        if not path.exists():
            demo.save(mlp_model(weight_bytes, layers), path)
        out[name] = (path, n, layouts)
    return out
