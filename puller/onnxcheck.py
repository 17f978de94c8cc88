"""meshserve's own checks of an ONNX file, before onnxruntime sees it (S6, S7, A4).

`check_model` parses the ModelProto with the `onnx` protobuf classes, never loading external
data, and walks every tensor and node the model holds: the main graph, every subgraph in node
attributes (If / Loop / Scan, at any depth), model-local functions and training graphs. It
refuses, with a reason a user can act on (no pod path in it):

- external data whose `location` is absolute, contains a `..` component, resolves (after
  symlinks) outside the artifact's own folder, goes through a symlink, is not a regular file,
  has more than one hard link, is missing, or whose offset/length lie outside the file;
- a node in a domain onnxruntime does not implement itself (a custom-op domain, which would
  need a library registered through `register_custom_ops_library`; meshserve never registers
  one), unless the model defines that op as a local function; and the `EPContext` op, whose
  `ep_cache_context` attribute names a file an execution provider would open;
- a tensor whose declared size (product of its dims times the element size) is negative or
  over `max_tensor_bytes`, and models whose tensors together declare more than that.

`check_locations` repeats only the file-system part for locations found earlier: a load whose
verdict is cached (puller/sandbox.py) re-checks the folder, which the sha256 does not cover.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import stat

from google.protobuf.message import DecodeError

from mesh.errors import LoadFailed

_PROTOBUF_LIMIT = (2 << 30) - 1  # protobuf cannot parse a message of 2 GiB or more
_MAX_DEPTH = 64  # nested subgraphs; protobuf itself stops at 100 levels of messages
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_SHOWN = 80  # characters of a model-supplied name or location echoed in a reason
# Bytes per element by TensorProto.DataType; strings count as their std::string header.
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 32, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
               14: 8, 15: 16, 16: 2}
_FILE_OPS = {("com.microsoft", "EPContext")}
MAX_EXTERNAL_FILES = 256  # the sandbox reports at most this many back to the pod
MAX_LOCATION_CHARS = 1024  # ops that make onnxruntime open a named file


@functools.cache
def builtin_domains() -> frozenset[str]:
    """The operator domains this onnxruntime build implements itself: those of its registered
    schemas ("", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", ...), plus "ai.onnx",
    the ONNX domain's alias."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return frozenset({x.domain for x in ort_state.get_all_operator_schema()} | {"", "ai.onnx"})


@dataclasses.dataclass(frozen=True)
class Checked:
    locations: tuple[str, ...]  # external data files, relative to the artifact's folder
    declared_bytes: int  # what its tensors declare, in all
    producer: str  # ModelProto.producer_name (the sandbox's test hook reads it)


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def check_model(path: pathlib.Path, max_tensor_bytes: int) -> Checked:
    """Raises LoadFailed when the model must not reach onnxruntime (see the module docstring)."""
    import onnx  # only where a check runs: the sandbox child, or the pod with the sandbox off

    size = path.stat().st_size
    if size > _PROTOBUF_LIMIT:
        raise LoadFailed("the ONNX file is 2 GiB or larger, beyond protobuf's limit; keep the weights "
                         "in external data files next to it")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except (DecodeError, RecursionError, ValueError) as exc:
        raise LoadFailed(f"the artifact is not a valid ONNX model (protobuf: {type(exc).__name__})") from None
    walk = _Walk(path.parent, max_tensor_bytes, {(f.domain, f.name) for f in model.functions})
    walk.graph(model.graph, 0)
    for function in model.functions:
        walk.nodes(function.node, 1)
    for info in model.training_info:
        walk.graph(info.initialization, 1)
        walk.graph(info.algorithm, 1)
    return Checked(tuple(walk.locations), walk.declared, model.producer_name)


def check_locations(folder: pathlib.Path, locations: tuple[str, ...] | list[str]) -> None:
    for location in locations:
        _check_file(folder, location, 0, -1)


class _Walk:
    def __init__(self, folder: pathlib.Path, max_tensor_bytes: int, functions: set[tuple[str, str]]) -> None:
        self.folder = folder
        self.limit = max_tensor_bytes
        self.functions = functions
        self.builtin = builtin_domains()
        self.declared = 0
        self.locations: list[str] = []

    def graph(self, graph: object, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise LoadFailed(f"the model nests subgraphs more than {_MAX_DEPTH} deep")
        for tensor in graph.initializer:  # type: ignore[attr-defined]
            self.tensor(tensor)
        for sparse in graph.sparse_initializer:  # type: ignore[attr-defined]
            self.tensor(sparse.values)
            self.tensor(sparse.indices)
        self.nodes(graph.node, depth)  # type: ignore[attr-defined]

    def nodes(self, nodes: object, depth: int) -> None:
        for node in nodes:  # type: ignore[attr-defined]
            self.node(node, depth)

    def node(self, node: object, depth: int) -> None:
        domain, op = node.domain, node.op_type  # type: ignore[attr-defined]
        if (domain, op) in _FILE_OPS:
            raise LoadFailed(f"operator {domain}.{op} loads a file named in the model; meshserve refuses it")
        if domain not in self.builtin and (domain, op) not in self.functions:
            raise LoadFailed(
                f"operator {_shown(op)} is in custom-op domain {_shown(domain)}, which would need a custom-op "
                f"library; meshserve never loads one (onnxruntime's own domains: "
                f"{', '.join(repr(d) for d in sorted(self.builtin))})"
            )
        for attr in node.attribute:  # type: ignore[attr-defined]
            if attr.HasField("t"):
                self.tensor(attr.t)
            for tensor in attr.tensors:
                self.tensor(tensor)
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                self.tensor(sparse.values)
                self.tensor(sparse.indices)
            if attr.HasField("g"):
                self.graph(attr.g, depth + 1)
            for sub in attr.graphs:
                self.graph(sub, depth + 1)

    def tensor(self, tensor: object) -> None:
        name = tensor.name  # type: ignore[attr-defined]
        elements = 1
        for dim in tensor.dims:  # type: ignore[attr-defined]
            if dim < 0:
                raise LoadFailed(f"tensor {_shown(name)} declares a negative dimension ({dim})")
            elements *= dim  # Python ints: no overflow, the limit below decides
        size = elements * _ITEM_BYTES.get(tensor.data_type, 1)  # type: ignore[attr-defined]
        if size > self.limit:
            raise LoadFailed(
                f"tensor {_shown(name)} declares {size} bytes, more than a load may use "
                f"({self.limit} bytes, MESH_RUNTIME_SANDBOX_MEMORY_BYTES)"
            )
        self.declared += size
        if self.declared > self.limit:
            raise LoadFailed(
                f"the model's tensors declare more than a load may use in all "
                f"({self.limit} bytes, MESH_RUNTIME_SANDBOX_MEMORY_BYTES)"
            )
        entries = {e.key: e.value for e in tensor.external_data}  # type: ignore[attr-defined]
        if tensor.data_location != _EXTERNAL and not entries:  # type: ignore[attr-defined]
            return
        location = entries.get("location", "")
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries.get("length", str(size)))
        except ValueError:
            raise LoadFailed(f"tensor {_shown(name)}: external data offset/length are not integers") from None
        if offset < 0 or length < 0:
            raise LoadFailed(f"tensor {_shown(name)}: external data offset/length are negative")
        if len(location) > MAX_LOCATION_CHARS:
            raise LoadFailed(f"tensor {_shown(name)}: external data location longer than {MAX_LOCATION_CHARS} characters")
        _check_file(self.folder, location, offset, length, name)
        if location not in self.locations:
            if len(self.locations) >= MAX_EXTERNAL_FILES:
                raise LoadFailed(f"the model keeps its data in more than {MAX_EXTERNAL_FILES} external files")
            self.locations.append(location)


def _check_file(folder: pathlib.Path, location: str, offset: int, length: int, tensor: str = "") -> None:
    """Containment by canonicalisation (S4, S6): never a blocklist of names."""
    what = f"external data {_shown(location)}" + (f" of tensor {_shown(tensor)}" if tensor else "")
    parts = location.replace("\\", "/").split("/")
    if not location or "\0" in location:
        raise LoadFailed(f"{what}: the location is empty or not a file name")
    if location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise LoadFailed(f"{what}: the location is absolute; it must be a file in the model's own folder")
    if ".." in parts:
        raise LoadFailed(f"{what}: the location contains '..'; it must be a file in the model's own folder")
    base = os.path.realpath(folder)
    joined = os.path.normpath(os.path.join(base, location))
    real = os.path.realpath(joined)
    if os.path.commonpath([base, real]) != base or real == base:
        raise LoadFailed(f"{what}: the location resolves outside the model's own folder")
    if real != joined:
        raise LoadFailed(f"{what}: the location goes through a symbolic link; meshserve refuses links")
    try:
        info = os.lstat(joined)
    except FileNotFoundError:
        raise LoadFailed(f"{what}: the file is not in the model's folder") from None
    if not stat.S_ISREG(info.st_mode):
        raise LoadFailed(f"{what}: not a regular file")
    if info.st_nlink != 1:
        raise LoadFailed(f"{what}: the file has {info.st_nlink} hard links; meshserve refuses linked files")
    if length >= 0 and offset + length > info.st_size:
        raise LoadFailed(f"{what}: offset {offset} + length {length} lie beyond the file's {info.st_size} bytes")
