"""Hostile ONNX models for the load-safety tests (puller/onnxcheck.py, puller/sandbox.py).

Each builder returns a ModelProto (not checked by onnx.checker: several are invalid on
purpose). Shared by tests/unit/puller and tests/integration/puller.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mesh import demo

CRASH_PRODUCER = "meshserve-test-crash"  # puller/sandbox.py TEST_CRASH_ENV's value in the tests


def _model(graph: onnx.GraphProto, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", demo.OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = demo.IR_VERSION
    return model


def _io(name: str, shape: list[object], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def expand_model(elements: int) -> onnx.ModelProto:
    """Warm-up allocates `elements` floats: Expand of the [1] input to a constant shape (the
    declared tensors stay tiny, so only running it finds the size)."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Expand", ["input", "shape"], ["big"]),
        helper.make_node("ReduceSum", ["big", "axes"], ["output"], keepdims=1),
    ]
    graph = helper.make_graph(nodes, "expand", [_io("input", [1])], [_io("output", [1])], [shape, axes])
    return _model(graph)


def endless_model(trips: int = 1 << 40) -> onnx.ModelProto:
    """Warm-up runs a Loop of `trips` iterations: it never finishes in any sane limit."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [_io("i", [], TensorProto.INT64), _io("cond_in", [], TensorProto.BOOL), _io("v_in", [1])],
        [_io("cond_out", [], TensorProto.BOOL), _io("v_out", [1])],
        [numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")],
    )
    inits = [numpy_helper.from_array(np.array(trips, dtype=np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "cond")]
    loop = helper.make_node("Loop", ["trips", "cond", "input"], ["output"], body=body)
    graph = helper.make_graph([loop], "endless", [_io("input", [1])], [_io("output", [1])], inits)
    return _model(graph)


def custom_op_model(domain: str = "com.evil", in_subgraph: bool = False) -> onnx.ModelProto:
    """A node in a custom-op domain (top level, or inside an If branch)."""
    boom = helper.make_node("Boom", ["input"], ["output"], domain=domain)
    if not in_subgraph:
        graph = helper.make_graph([boom], "custom", [_io("input", [1])], [_io("output", [1])])
        return _model(graph, (domain,))
    branch = helper.make_graph([helper.make_node("Boom", ["input"], ["b"], domain=domain)], "then",
                               [], [_io("b", [1])])
    other = helper.make_graph([helper.make_node("Identity", ["input"], ["c"])], "else", [], [_io("c", [1])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["output"], then_branch=branch, else_branch=other)
    graph = helper.make_graph([node], "nested", [_io("input", [1])], [_io("output", [1])], [cond])
    return _model(graph, (domain,))


def external_model(location: str, length: int = 4, offset: int = 0) -> onnx.ModelProto:
    """output = input + W, W's 4 bytes (one float) in external data at `location`."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["input", "W"], ["output"])], "external",
                              [_io("input", [1])], [_io("output", [1])], [weight])
    return _model(graph)


def huge_declared_model(elements: int = 10 << 30) -> onnx.ModelProto:
    """An initializer that declares `elements` floats (40 GiB by default) and holds none."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[elements])
    graph = helper.make_graph([helper.make_node("Add", ["input", "W"], ["output"])], "huge",
                              [_io("input", [1])], [_io("output", [1])], [weight])
    return _model(graph)


def crash_model() -> onnx.ModelProto:
    """A valid linear model whose producer_name is CRASH_PRODUCER: with TEST_CRASH_ENV set to
    it, the sandbox child calls os.abort() on it. A test hook, not an onnxruntime bug."""
    model = demo.linear_model(7)
    model.producer_name = CRASH_PRODUCER
    return model
