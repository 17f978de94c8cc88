"""KServe V2 messages the router answers itself, encoded by hand (see wire.py for why).

Field numbers are those of proto/mesh/pb/inference/grpc_predict_v2.proto; the unit tests
decode every encoder's output with tritonclient's generated classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from mesh.errors import redact_paths
from router import modelid, wire


def name_of(request: bytes) -> str:
    """`name` (field 1) of a ModelReadyRequest or ModelMetadataRequest (both: name = 1,
    version = 2, strings); malformed bytes and over-long names raise InvalidArgument."""
    return modelid.check_length(wire.check_message(request, wire.NAMED, "request"))


def version_of(request: bytes) -> str:
    """`version` (field 2) of a ModelReadyRequest or ModelMetadataRequest ("" when absent)."""
    return wire.string_field(request, 2)[:64]


def live_response(live: bool) -> bytes:
    """ServerLiveResponse / ServerReadyResponse / ModelReadyResponse: one bool, field 1."""
    return wire.boolean(1, live)


def server_metadata_response(name: str, version: str, extensions: Sequence[str] = ()) -> bytes:
    return (
        wire.string(1, name)
        + wire.string(2, version)
        + b"".join(wire.length_delimited(3, e.encode()) for e in extensions)
    )


def _tensor(meta: Mapping[str, object]) -> bytes:
    shape = meta.get("shape") or ()
    return (
        wire.string(1, str(meta.get("name", "")))
        + wire.string(2, str(meta.get("datatype", "")))
        + wire.packed_int64(3, shape if isinstance(shape, Iterable) else ())  # type: ignore[arg-type]
    )


def model_metadata_response(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Iterable[Mapping[str, object]],
    outputs: Iterable[Mapping[str, object]],
) -> bytes:
    return (
        wire.string(1, name)
        + b"".join(wire.length_delimited(2, v.encode()) for v in versions)
        + wire.string(3, platform)
        + b"".join(wire.length_delimited(4, _tensor(t)) for t in inputs)
        + b"".join(wire.length_delimited(5, _tensor(t)) for t in outputs)
    )


def stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse carrying a ModelInferResponse (field 2), bytes untouched."""
    return wire.length_delimited(2, infer_response)


def stream_error(message: str) -> bytes:
    """ModelStreamInferResponse carrying only error_message (field 1); bare paths redacted, as
    the status mapping does for unary errors (mesh/rpc/status.py)."""
    return wire.length_delimited(1, redact_paths(message).encode("utf-8"))
