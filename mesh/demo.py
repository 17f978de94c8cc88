"""Small generated ONNX models: the demo models `mesh up` registers and the test fixtures.

IR version is pinned (onnx writes a newer one than onnxruntime reads by default).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def linear_model(seed: int, in_features: int = 4, out_features: int = 3, weight_bytes: int = 0) -> onnx.ModelProto:
    """output = input @ W + b (+ a row-sum through a big weight of about `weight_bytes`).

    input: FP32 [batch, in_features]; output: FP32 [batch, out_features]. The big weight makes
    models of chosen sizes that onnxruntime cannot constant-fold away.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_features, out_features)).astype(np.float32)
    b = rng.standard_normal((out_features,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["output" if not weight_bytes else "lin"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if weight_bytes:
        cols = max(1, weight_bytes // (4 * in_features))
        big = (rng.standard_normal((in_features, cols)) / cols).astype(np.float32)
        inits += [
            numpy_helper.from_array(big, "Big"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "Axis"),
        ]
        nodes += [
            helper.make_node("MatMul", ["input", "Big"], ["xbig"]),
            helper.make_node("ReduceSum", ["xbig", "Axis"], ["aux"], keepdims=1),
            helper.make_node("Add", ["lin", "aux"], ["output"]),
        ]
    graph = helper.make_graph(
        nodes,
        f"linear{seed}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", out_features])],
        inits,
    )
    return _finish(graph)


def identity_model(elem_type: int, width: int = 2) -> onnx.ModelProto:
    """output = input, for any ONNX element type (datatype round-trip tests)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        f"identity{elem_type}",
        [helper.make_tensor_value_info("input", elem_type, ["batch", width])],
        [helper.make_tensor_value_info("output", elem_type, ["batch", width])],
    )
    return _finish(graph)


def save(model: onnx.ModelProto, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


DEMO_MODELS = {
    "demo-linear-a": lambda: linear_model(1),
    "demo-linear-b": lambda: linear_model(2, in_features=8, out_features=2),
    "demo-wide": lambda: linear_model(3, weight_bytes=4 * 1024 * 1024),
    "demo-identity-int64": lambda: identity_model(TensorProto.INT64),
}


def write_demo_models(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes the demo models (idempotently) and returns model id -> file."""
    out = {}
    for model_id, build in DEMO_MODELS.items():
        path = folder / f"{model_id}.onnx"
        if not path.exists():
            save(build(), path)
        out[model_id] = path
    return out
