"""KServe V2 tensors <-> numpy, with Triton-style validation. Pure: no grpc imports.

Requests are read by attribute (`.inputs`, `.raw_input_contents`, each input's `.name`,
`.datatype`, `.shape`, `.contents.<field>_contents`), so any message with the V2 field names
works: ours in the server, tritonclient's in unit tests. Every rejection is an
InvalidArgument saying what was wrong and what was expected. Raw contents are decoded with
np.frombuffer (a view of the request bytes, no copy). Outputs always go in
raw_output_contents, whatever the request used, as Triton answers (clients index that list).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, quote_id
from puller.datatypes import CONTENT_FIELDS, V2, TensorSpec, v2_of_numpy

# Far beyond any message size; stops int64 overflow in byte counts, and keeps numpy's own
# size check (which multiplies every dimension, zeros aside, by the item size) from raising.
_MAX_ELEMENTS = 2**58
MAX_RANK = 32  # numpy's limit is 64; no V2 model has more than a handful of dimensions
_SHOWN_DIMS = 8  # dimensions of a shape an error message shows
_SHOWN_NAMES = 16  # names of a model's inputs / outputs an error message lists
_LEN = struct.Struct("<I")


def _shape(shape: Sequence[int]) -> str:
    """A shape as an error message shows it: bounded however many dimensions were sent."""
    dims = [str(d) for d in shape[:_SHOWN_DIMS]]
    return "[" + ", ".join(dims) + (", …]" if len(shape) > _SHOWN_DIMS else "]")


def _names(names: Any) -> str:
    listed = sorted(names)
    shown = ", ".join(quote_id(n) for n in listed[:_SHOWN_NAMES])
    return f"[{shown}{', …' if len(listed) > _SHOWN_NAMES else ''}]"


@dataclasses.dataclass(frozen=True)
class Decoded:
    feeds: dict[str, np.ndarray]
    raw: bool  # the request used raw_input_contents (the response always does)


@dataclasses.dataclass(frozen=True)
class EncodedOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes  # the tensor's raw_output_contents entry


def element_count(name: str, shape: Sequence[int]) -> int:
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"input {quote_id(name)} has {len(shape)} dimensions; at most {MAX_RANK}")
    count = nonzero = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"input {quote_id(name)} has a negative dimension in shape {_shape(shape)}")
        count *= dim
        nonzero *= dim or 1  # numpy refuses a shape whose non-zero dims overflow, even when one is 0
        if nonzero > _MAX_ELEMENTS:
            raise InvalidArgument(f"input {quote_id(name)} shape {_shape(shape)} has too many elements")
    return count


def _check_shape(spec: TensorSpec, shape: Sequence[int]) -> None:
    if spec.shape and len(shape) != len(spec.shape):
        raise InvalidArgument(
            f"input {quote_id(spec.name)} has rank {len(shape)} (shape {_shape(shape)}) but the model "
            f"expects rank {len(spec.shape)} (shape {_shape(spec.shape)}, -1 = any size)"
        )
    for got, want in zip(shape, spec.shape, strict=False):
        if want >= 0 and got != want:
            raise InvalidArgument(
                f"input {quote_id(spec.name)} has shape {_shape(shape)} but the model expects "
                f"{_shape(spec.shape)} (-1 = any size)"
            )


def split_bytes(name: str, buf: bytes, count: int) -> list[bytes]:
    """Raw BYTES: each element is a 4-byte little-endian length followed by that many bytes."""
    view = memoryview(buf)
    out: list[bytes] = []
    offset, end = 0, len(buf)
    while offset < end:
        if len(out) >= count:
            raise InvalidArgument(f"input {quote_id(name)}: raw BYTES holds more than the {count} elements its shape says")
        if offset + 4 > end:
            raise InvalidArgument(f"input {quote_id(name)}: raw BYTES ends inside a 4-byte length prefix")
        (length,) = _LEN.unpack_from(buf, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument(
                f"input {quote_id(name)}: raw BYTES element {len(out)} claims {length} bytes but only "
                f"{end - offset} remain"
            )
        out.append(bytes(view[offset : offset + length]))
        offset += length
    if len(out) != count:
        raise InvalidArgument(f"input {quote_id(name)}: raw BYTES holds {len(out)} elements, shape says {count}")
    return out


def _object_array(items: list[bytes], shape: Sequence[int]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(tuple(shape))


def _from_raw(spec: TensorSpec, buf: bytes, shape: Sequence[int], count: int) -> np.ndarray:
    dtype = V2[spec.datatype][0]
    if spec.datatype == "BYTES":
        return _object_array(split_bytes(spec.name, buf, count), shape)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise InvalidArgument(
            f"input {quote_id(spec.name)}: raw contents are {len(buf)} bytes but shape {_shape(shape)} of "
            f"{spec.datatype} needs exactly {expected}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(shape))


def _from_typed(spec: TensorSpec, contents: Any, shape: Sequence[int], count: int) -> np.ndarray:
    dtype, field = V2[spec.datatype]
    if field is None:
        raise InvalidArgument(f"input {quote_id(spec.name)}: {spec.datatype} must be sent in raw_input_contents")
    for other in CONTENT_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(f"input {quote_id(spec.name)}: {spec.datatype} data goes in {field}, not {other}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {quote_id(spec.name)}: {field} has {len(values)} elements but shape {_shape(shape)} needs {count}"
        )
    if spec.datatype == "BYTES":
        return _object_array(list(values), shape)
    try:
        arr = np.array(values, dtype=dtype)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"input {quote_id(spec.name)}: values do not fit {spec.datatype}") from None
    if dtype.kind in "iu" and dtype.itemsize < 4 and count:
        # int_contents / uint_contents carry 32-bit values; numpy would wrap the narrow ones.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(
                f"input {quote_id(spec.name)}: values do not fit {spec.datatype} (range {info.min}..{info.max})"
            )
    return arr.reshape(tuple(shape))


def _has_typed(tensor: Any) -> bool:
    return tensor.HasField("contents") and any(len(getattr(tensor.contents, f)) for f in CONTENT_FIELDS)


def _check_contents(request: Any) -> None:
    """Raw and typed contents in one request are refused, as Triton does (and with its words:
    "contents field must not be specified when using raw_input_contents for 'x' for model 'm'")."""
    for tensor in request.inputs:
        if _has_typed(tensor):
            raise InvalidArgument(
                f"contents field must not be specified when using raw_input_contents for "
                f"{quote_id(tensor.name)} for model {quote_id(request.model_name)}"
            )


def decode_inputs(request: Any, specs: Mapping[str, TensorSpec]) -> Decoded:
    """Validates a ModelInferRequest against the model's inputs and returns numpy feeds."""
    raw_contents = request.raw_input_contents
    raw = len(raw_contents) > 0
    if raw:
        _check_contents(request)
    if raw and len(raw_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries but the request has "
            f"{len(request.inputs)} inputs; send one per input, in order"
        )
    feeds: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"unknown input {quote_id(tensor.name)}; the model's inputs are {_names(specs)}")
        if tensor.name in feeds:
            raise InvalidArgument(f"input {quote_id(tensor.name)} appears more than once")
        if tensor.datatype != spec.datatype:
            # A known datatype as is; anything else quoted and cut (the caller's free text).
            given = tensor.datatype if tensor.datatype in V2 else quote_id(tensor.datatype, 16) if tensor.datatype else "(none)"
            raise InvalidArgument(
                f"input {quote_id(tensor.name)} has datatype {given} but the model expects {spec.datatype}"
            )
        shape = list(tensor.shape)
        count = element_count(tensor.name, shape)
        _check_shape(spec, shape)
        if raw:
            feeds[tensor.name] = _from_raw(spec, raw_contents[index], shape, count)
        else:
            feeds[tensor.name] = _from_typed(spec, tensor.contents, shape, count)
    missing = sorted(specs.keys() - feeds.keys())
    if missing:
        raise InvalidArgument(f"missing inputs {_names(missing)}; the model needs {_names(specs)}")
    return Decoded(feeds, raw)


def requested_outputs(request: Any, specs: Mapping[str, TensorSpec]) -> list[str]:
    """Output names to compute: the requested ones (validated), else all of the model's."""
    names = [out.name for out in request.outputs]
    if not names:
        return list(specs)
    for name in names:
        if name not in specs:
            raise InvalidArgument(f"unknown output {quote_id(name)} requested; the model's outputs are {_names(specs)}")
    return list(dict.fromkeys(names))


def join_bytes(items: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in items.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_outputs(names: Sequence[str], arrays: Sequence[np.ndarray],
                   specs: Mapping[str, TensorSpec] | None = None) -> list[EncodedOutput]:
    """numpy outputs -> V2 tensors, always raw (Triton's answer to raw and typed requests alike):
    BYTES as 4-byte-length-prefixed elements, the rest as little-endian bytes (BF16 travels as
    its 16-bit patterns, puller/datatypes.py). The datatype is the array's, except where the
    model's output `specs` say BF16: numpy cannot tell those uint16 arrays from UINT16."""
    out: list[EncodedOutput] = []
    for name, arr in zip(names, arrays, strict=True):
        spec = specs.get(name) if specs is not None else None
        if spec is not None and spec.datatype == "BF16" and arr.dtype == V2["BF16"][0]:
            datatype = "BF16"
        else:
            datatype = v2_of_numpy(arr.dtype)
        shape = tuple(int(d) for d in arr.shape)
        data = join_bytes(arr) if datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
        out.append(EncodedOutput(name, datatype, shape, raw=data))
    return out
