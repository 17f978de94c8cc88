"""A real mesh to fuzz over gRPC: placement, one runtime pod and a router as child processes
(mesh.cli.local.LocalMesh), two loaded models, raw-bytes channels to the router and straight to
the pod (the pod is reachable inside the cluster too), and the codes each API may answer.

Used by tests/fuzz/test_grpc.py (a short CI run) and bench/fuzz/hypo.py --grpc (10,000+
examples per API). The test process holds tritonclient's protos, never mesh.pb.inference.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import uuid
from collections import Counter

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

from mesh import demo
from mesh.cli.local import LocalMesh
from tests.fuzz import strategies, targets

V2 = "/inference.GRPCInferenceService/"
REGISTRY = "/mesh.v1.ModelRegistry/"
REGISTRY_METHODS = ("RegisterModel", "GetModel", "UnregisterModel", "ListModels")
OK = grpc.StatusCode.OK
C = grpc.StatusCode
# What each API may answer a fuzzed request with; anything else (UNKNOWN, INTERNAL above all) fails.
EXPECTED: dict[str, frozenset[grpc.StatusCode]] = {
    "router:ModelInfer": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED}),
    "router:ModelReady": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
    "router:ModelMetadata": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
    # A pod answers a model it does not hold UNAVAILABLE: the router then tries another copy.
    "pod:ModelInfer": frozenset({OK, C.INVALID_ARGUMENT, C.UNAVAILABLE, C.RESOURCE_EXHAUSTED}),
    "pod:ModelMetadata": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
    "router:RegisterModel": frozenset({OK, C.INVALID_ARGUMENT, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED,
                                       C.PERMISSION_DENIED, C.FAILED_PRECONDITION}),
    "router:GetModel": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
    "router:UnregisterModel": frozenset({OK, C.INVALID_ARGUMENT, C.NOT_FOUND}),
    "router:ListModels": frozenset({OK, C.INVALID_ARGUMENT}),
}
TYPES_ONNX = {dt: getattr(TensorProto, name) for dt, name in {
    "BOOL": "BOOL", "UINT8": "UINT8", "UINT16": "UINT16", "UINT32": "UINT32", "UINT64": "UINT64",
    "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64", "FP16": "FLOAT16",
    "FP32": "FLOAT", "FP64": "DOUBLE", "BYTES": "STRING"}.items()}


def types_model() -> onnx.ModelProto:
    """in_<datatype> -> out_<datatype> (Identity), one of every V2 datatype, shape [batch, 2]."""
    nodes, inputs, outputs = [], [], []
    for dt, elem in TYPES_ONNX.items():
        name = dt.lower()
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 2]))
    return demo._finish(helper.make_graph(nodes, "fuzz_types", inputs, outputs))


def any_rank_model() -> onnx.ModelProto:
    """y = x for FP32 x of any rank (no shape in the graph: onnxruntime reports []); not
    through onnx's checker, which wants a shape on every graph input."""
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "fuzz_any",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", demo.OPSET)])
    model.ir_version = demo.IR_VERSION
    return model


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclasses.dataclass
class FuzzMesh:
    mesh: LocalMesh
    router: grpc.Channel
    pod: grpc.Channel
    codes: Counter = dataclasses.field(default_factory=Counter)
    rss_start: dict[str, int] = dataclasses.field(default_factory=dict)
    rss_max: dict[str, int] = dataclasses.field(default_factory=dict)
    good_uris: tuple[str, ...] = ()  # artifacts registrations may name and succeed

    def call(self, target: str, method: str, data: bytes, timeout: float = 20) -> tuple[grpc.StatusCode, str]:
        """One raw-bytes call; checks its code against EXPECTED and its details with
        targets.check_details. Returns (code, details)."""
        prefix = REGISTRY if method in REGISTRY_METHODS else V2
        channel = self.router if target == "router" else self.pod
        call = channel.unary_unary(prefix + method)
        metadata = self.mesh.auth_metadata if target == "router" else ()
        try:
            call(data, timeout=timeout, metadata=metadata)
            code, details = OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        key = f"{target}:{method}"
        self.codes[f"{key}:{code.name}"] += 1
        if code not in EXPECTED[key]:
            raise targets.Finding(f"{key} answered {code.name}: {details[:300]!r} (request {len(data)} bytes: "
                                  f"{data[:80]!r})")
        targets.check_details(details, key, data)
        return code, details

    def check_processes(self) -> None:
        """Every child still up; records RSS (the runner reports the max)."""
        for name in ("router", "pod-0", "placement"):
            proc = self.mesh.procs[name]
            if proc.poll() is not None:
                raise targets.Finding(f"{name} exited with {proc.returncode}; log {self.mesh.log(name)}")
            rss = rss_bytes(proc.pid)
            self.rss_start.setdefault(name, rss)
            self.rss_max[name] = max(self.rss_max.get(name, 0), rss)

    def close(self) -> None:
        self.router.close()
        self.pod.close()
        self.mesh.stop()


def start(base: pathlib.Path, etcd: str = "") -> FuzzMesh:
    """A mesh with the fuzz models (strategies.specs()) registered and loaded on its one pod."""
    models = base / "models"
    linear = demo.save(demo.linear_model(0), models / "fuzz-linear.onnx")
    typed = demo.save(types_model(), models / "fuzz-types.onnx")
    any_rank = demo.save(any_rank_model(), models / "fuzz-any.onnx")
    roots = {"MESH_ROUTER_FILE_ROOTS": str(models), "MESH_RUNTIME_FILE_ROOTS": str(models)}
    mesh = LocalMesh(state_dir=base / f"mesh-{uuid.uuid4().hex[:6]}", etcd=etcd, root=f"/fuzz-{uuid.uuid4().hex[:8]}",
                     pods=1, capacity="512MiB", lease_ttl_s=5, env=roots)
    mesh.start(timeout=90)
    try:
        mesh.register("fuzz-linear", linear)
        mesh.register("fuzz-types", typed)
        mesh.register("fuzz-any", any_rank)
        fm = FuzzMesh(mesh, mesh.router_channel(), grpc.insecure_channel(f"127.0.0.1:{mesh.ports['pod-0']}"),
                      good_uris=tuple(p.resolve().as_uri() for p in (linear, typed, any_rank)))
        _warm(fm)
        fm.check_processes()
        return fm
    except BaseException:
        mesh.stop()
        raise


def _warm(fm: FuzzMesh) -> None:
    """One valid request per model through the router, so both are loaded before fuzzing."""
    from tritonclient.grpc import service_pb2 as pb

    deadline = time.monotonic() + 120
    for model, spec in strategies.specs().items():
        req = pb.ModelInferRequest(model_name=model)
        for s in spec.values():
            shape = [1, *(d if d >= 0 else 2 for d in s.shape[1:])]
            req.inputs.add(name=s.name, datatype=s.datatype, shape=shape)
            count = int(np.prod(shape))
            raw = b"\x01\x00\x00\x00a" * count if s.datatype == "BYTES" else bytes(
                strategies.V2[s.datatype][0].itemsize * count)
            req.raw_input_contents.append(raw)
        while True:
            code, details = fm.call("router", "ModelInfer", req.SerializeToString(), timeout=60)
            if code == OK:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} did not load: {code.name} {details}")
            time.sleep(0.5)
