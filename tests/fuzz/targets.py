"""In-process fuzz targets: bytes straight into what the router and the pod parse, and the
rules every answer must keep. Shared by the CI tests (tests/fuzz/), the long Hypothesis runner
(bench/fuzz/hypo.py) and the atheris target (bench/fuzz/atheris_target.py).

A target returns normally for a request it accepted or refused with InvalidArgument (whose
message it checks); any other exception is a finding.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import ModuleType
from typing import Any

from mesh.errors import InvalidArgument, MeshError
from mesh.rpc.status import Malformed, tolerant
from puller import codec
from router import modelid, v2
from tests.fuzz import strategies

MAX_DETAILS = 1024  # no error a client sees is longer (ids are quoted to 64 characters)
LEAKS = ("/tmp", "/work", "/home", "/proc", "/usr", "cache", "Traceback", 'File "', "site-packages")


class Finding(AssertionError):
    """A rule broken: an unexpected exception type, a bad message, router and pod disagreeing."""


def check_details(details: str, where: str, request: bytes = b"") -> None:
    """What every error message a client sees must satisfy. A leak word the request itself
    carries may come back in an echo of the caller's own id or URI (Hypothesis draws ids
    like "fz-cache" and URIs like file:///proc/self/environ): only then is it allowed."""
    if len(details) > MAX_DETAILS:
        raise Finding(f"{where}: {len(details)}-character error message: {details[:120]!r}…")
    sent = request.decode("utf-8", "replace") if request else ""
    for leak in LEAKS:
        if leak in details and leak not in sent:
            raise Finding(f"{where}: error message contains {leak!r}: {details[:300]!r}")


@dataclasses.dataclass
class Tally:
    """What the targets saw, for the runners' reports."""

    outcomes: Counter = dataclasses.field(default_factory=Counter)

    def add(self, key: str) -> None:
        self.outcomes[key] += 1


def router_infer(data: bytes, pb: ModuleType | None = None, tally: Tally | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> str | None:
    """The router's parse of a ModelInfer request (model id from the wire, metadata first).

    With `pb` (a generated module), differential: bytes the router accepts and protobuf
    parses name the same model on both (the router routes by what the pod will serve)."""
    try:
        model_id, forwarded = modelid.resolve(metadata, data)
    except InvalidArgument as exc:
        check_details(exc.message, "router ModelInfer", data)
        if tally:
            tally.add("router:INVALID_ARGUMENT")
        return None
    if pb is not None:
        parsed = tolerant(pb.ModelInferRequest.FromString)(forwarded)  # type: ignore[misc]
        if not isinstance(parsed, Malformed) and parsed.model_name != model_id:
            raise Finding(f"router routes to {model_id[:64]!r}, the pod would serve {parsed.model_name[:64]!r}")
    if tally:
        tally.add("router:OK")
    return model_id


def router_control(data: bytes, tally: Tally | None = None) -> None:
    """The router's parse of ModelReady / ModelMetadata requests (answered by the router)."""
    try:
        v2.name_of(data)
    except InvalidArgument as exc:
        check_details(exc.message, "router ModelReady", data)
        if tally:
            tally.add("control:INVALID_ARGUMENT")
        return
    if tally:
        tally.add("control:OK")


_SPECS = strategies.specs()
_OUTPUTS = {"fuzz-types": {s.name.replace("in_", "out_"): s for s in _SPECS["fuzz-types"].values()},
            "fuzz-linear": {"output": strategies.TensorSpec("output", "FP32", (-1, 3))},
            "fuzz-any": {"y": strategies.TensorSpec("y", "FP32", ())}}


def pod_infer(data: bytes, pb: ModuleType, tally: Tally | None = None) -> None:
    """The pod's parse (the tolerant deserializer its server uses) and codec decode of a
    ModelInfer request, against the fuzz models' inputs and outputs."""
    request: Any = tolerant(pb.ModelInferRequest.FromString)(data)  # type: ignore[misc]
    try:
        if isinstance(request, Malformed):
            raise request.error()
        model = request.model_name if request.model_name in _SPECS else "fuzz-types"
        decoded = codec.decode_inputs(request, _SPECS[model])
        codec.requested_outputs(request, _OUTPUTS[model])
    except InvalidArgument as exc:
        check_details(exc.message, "pod ModelInfer", data)
        if tally:
            tally.add("pod:INVALID_ARGUMENT")
        return
    except MeshError as exc:
        raise Finding(f"pod: {exc.kind.value} for a request: {exc.message[:200]!r}") from exc
    for name, arr in decoded.feeds.items():  # what decode hands onnxruntime is what was asked
        if arr.ndim > codec.MAX_RANK:
            raise Finding(f"pod: input {name[:40]!r} decoded with rank {arr.ndim}")
    if tally:
        tally.add("pod:OK")


def everything(data: bytes, pb: ModuleType, tally: Tally | None = None) -> None:
    """One input through every in-process target (what atheris and the runner call)."""
    router_infer(data, pb, tally)
    router_control(data, tally)
    pod_infer(data, pb, tally)
