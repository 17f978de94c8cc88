"""KServe V2 / Triton HTTP bodies <-> the V2 protobuf messages the router forwards.

Pure: no I/O, no HTTP stack. An infer request body is a JSON object, optionally followed by
binary tensor data (Triton's binary-tensor extension: the `Inference-Header-Content-Length`
header says where the JSON ends, each binary input names its byte count in
`parameters.binary_data_size`). It becomes one serialized ModelInferRequest with every input in
`raw_input_contents` (JSON data encoded little-endian as the protocol's raw layout; BYTES as
4-byte length-prefixed elements), which the router forwards unparsed like any gRPC request.
The pod's ModelInferResponse becomes JSON `data`, or binary data appended after the JSON for
the outputs that asked for it (`parameters.binary_data`, or `binary_data_output` for all).
Both raw and typed output contents are read (pods answer raw, as Triton does; typed contents
from an older pod still decode). Every rejection is an InvalidArgument saying what to fix.

The messages are mesh.inference's wire-compatible copies (proto/mesh/pb/inference/
infer_messages.proto says why not package `inference`'s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mesh.errors import InvalidArgument, quote_id
from mesh.pb.inference import infer_messages_pb2 as pb

# V2 datatype -> numpy dtype (little-endian, the protocol's raw layout); BYTES and BF16 apart.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, "BYTES", "BF16")
_TYPED = {  # typed InferTensorContents field of each datatype that has one
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_INTS = frozenset(k for k in DTYPES if k.startswith(("INT", "UINT")))
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
_LEN = struct.Struct("<I")
MAX_RANK = 32
MAX_TENSORS = 1024  # inputs or outputs named in one request
BINARY_SIZE = "binary_data_size"
_INT64 = (-(2**63), 2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Request:
    """One REST infer request, ready to forward."""

    message: bytes  # a serialized ModelInferRequest
    binary_outputs: frozenset[str]  # outputs the request named that go as binary data
    named_outputs: frozenset[str]  # outputs the request named (empty: all of the model's)
    binary_default: bool  # outputs not named in the request: binary (binary_data_output)
    timeout_s: float | None  # Triton's `timeout` request parameter (microseconds), in seconds


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the parsed JSON object, the binary data after it) of an infer request body."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view):]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidArgument("Inference-Header-Content-Length must be a byte count") from None
        if n < 0 or n > len(view):
            raise InvalidArgument(f"Inference-Header-Content-Length {n} is outside the body's {len(view)} bytes")
        json_part, binary = view[:n], view[n:]
    return parse_json(json_part), binary


def parse_json(data: bytes | memoryview) -> Any:
    if not len(data):
        return {}
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"malformed JSON in the request body: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "not UTF-8"


# -- parameters -----------------------------------------------------------------------------------


def parameter(into: pb.InferParameter, name: str, value: Any) -> None:
    """One JSON parameter value as an InferParameter (bool, int64 / uint64, double, string)."""
    if isinstance(value, bool):
        into.bool_param = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            into.int64_param = value
        elif 0 <= value < 2**64:
            into.uint64_param = value
        else:
            raise InvalidArgument(f"parameter {quote_id(name)}: {value} does not fit 64 bits")
    elif isinstance(value, float):
        into.double_param = value
    elif isinstance(value, str):
        into.string_param = value
    else:
        raise InvalidArgument(f"parameter {quote_id(name)} must be a bool, number or string, "
                              f"not {type(value).__name__}")


def parameters_json(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be an object")
    return params


# -- requests -------------------------------------------------------------------------------------


def infer_request(header: Any, binary: memoryview, model_name: str, model_version: str) -> Request:
    """The ModelInferRequest a REST infer body means, for the model the URL names."""
    if not isinstance(header, dict):
        raise InvalidArgument("the infer request body must be a JSON object")
    message = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = header.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidArgument("'id' must be a string")
        message.id = request_id
    timeout_s = None
    binary_default = False
    for key, value in _params(header, "request").items():
        if key == "binary_data_output":
            binary_default = _flag(value, key)
            continue
        if key == "timeout":
            timeout_s = _timeout(value)
        parameter(message.parameters[key], key, value)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    if len(inputs) > MAX_TENSORS:
        raise InvalidArgument(f"{len(inputs)} inputs; at most {MAX_TENSORS}")
    offset = 0
    for index, tensor in enumerate(inputs):
        offset = _input(message, tensor, index, binary, offset)
    if offset != len(binary):
        raise InvalidArgument(f"the body has {len(binary) - offset} bytes of binary data no input claims "
                              "(binary_data_size of the inputs, in order)")
    binary_outputs: set[str] = set()
    named: set[str] = set()
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or len(outputs) > MAX_TENSORS:
            raise InvalidArgument(f"'outputs' must be a list of at most {MAX_TENSORS} tensors")
        for tensor in outputs:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise InvalidArgument("each of 'outputs' must be an object with a string 'name'")
            out = message.outputs.add(name=tensor["name"])
            named.add(tensor["name"])
            wants = binary_default
            for key, value in _params(tensor, f"output {quote_id(tensor['name'])}").items():
                if key == "binary_data":
                    wants = _flag(value, key)
                    continue
                parameter(out.parameters[key], key, value)
            if wants:
                binary_outputs.add(tensor["name"])
    return Request(message.SerializeToString(), frozenset(binary_outputs), frozenset(named), binary_default,
                   timeout_s)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameter {quote_id(name)} must be true or false")
    return value


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument("parameter 'timeout' is the request's deadline in microseconds: a positive integer")
    return value / 1e6


def _input(message: pb.ModelInferRequest, tensor: Any, index: int, binary: memoryview, offset: int) -> int:
    if not isinstance(tensor, dict):
        raise InvalidArgument(f"input {index} must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"input {index} needs a string 'name'")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidArgument(f"input {quote_id(name)}: datatype {quote_id(str(datatype), 16)} is not one of "
                              f"{', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 or d >= 2**62 for d in shape)):
        raise InvalidArgument(f"input {quote_id(name)}: 'shape' must be a list of at most {MAX_RANK} "
                              "non-negative integers")
    count = math.prod(shape)
    out = message.inputs.add(name=name, datatype=datatype, shape=shape)
    size = None
    for key, value in _params(tensor, f"input {quote_id(name)}").items():
        if key == BINARY_SIZE:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"input {quote_id(name)}: binary_data_size must be a byte count")
            size = value
            continue
        parameter(out.parameters[key], key, value)
    if size is not None:
        if "data" in tensor:
            raise InvalidArgument(f"input {quote_id(name)} has both 'data' and binary_data_size; send one")
        if offset + size > len(binary):
            raise InvalidArgument(f"input {quote_id(name)}: binary_data_size {size} runs past the body's "
                                  f"{len(binary) - offset} remaining bytes of binary data")
        raw = binary[offset:offset + size]
        if datatype != "BYTES":
            itemsize = 2 if datatype == "BF16" else DTYPES[datatype].itemsize
            if size != count * itemsize:
                raise InvalidArgument(f"input {quote_id(name)}: {size} bytes of binary data, but shape "
                                      f"{shape} of {datatype} needs {count * itemsize}")
        message.raw_input_contents.append(bytes(raw))
        return offset + size
    if "data" not in tensor:
        raise InvalidArgument(f"input {quote_id(name)} has no 'data' (nor binary_data_size)")
    message.raw_input_contents.append(encode_data(name, datatype, tensor["data"], count))
    return offset


def _flat(data: Any) -> list[Any]:
    """A (possibly nested) JSON array, flattened; a scalar counts as one element."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                if len(stack) > MAX_RANK:
                    raise InvalidArgument("tensor data nested deeper than the shape's rank allows")
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def encode_data(name: str, datatype: str, data: Any, count: int) -> bytes:
    """JSON `data` of one input as its raw_input_contents entry."""
    flat = _flat(data)
    if len(flat) != count:
        raise InvalidArgument(f"input {quote_id(name)}: {len(flat)} elements in 'data' but its shape holds {count}")
    if datatype == "BYTES":
        parts = []
        for x in flat:
            if not isinstance(x, str):
                raise InvalidArgument(f"input {quote_id(name)}: BYTES data must be strings")
            b = x.encode("utf-8", "surrogatepass")
            parts.append(_LEN.pack(len(b)))
            parts.append(b)
        return b"".join(parts)
    if datatype == "BF16":
        raise InvalidArgument(f"input {quote_id(name)}: BF16 has no JSON form; send it as binary data "
                              "(binary_data_size, 2 bytes per element)")
    if datatype == "BOOL":
        if not all(type(x) is bool for x in flat):
            raise InvalidArgument(f"input {quote_id(name)}: BOOL data must be true or false")
    elif datatype in _INTS:
        if not all(type(x) is int for x in flat):
            raise InvalidArgument(f"input {quote_id(name)}: {datatype} data must be integers")
    elif not all(type(x) in (int, float) for x in flat):
        raise InvalidArgument(f"input {quote_id(name)}: {datatype} data must be numbers")
    try:
        return np.asarray(flat, dtype=DTYPES[datatype]).tobytes()
    except OverflowError:
        raise InvalidArgument(f"input {quote_id(name)}: a value is out of range for {datatype}") from None


# -- responses ------------------------------------------------------------------------------------


def raw_of(tensor: Any, raw: bytes | None) -> bytes:
    """An output's raw bytes: its raw_output_contents entry, else its typed contents as raw."""
    if raw is not None:
        return raw
    datatype = tensor.datatype
    field = _TYPED.get(datatype)
    if field is None:
        return b""
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        return b"".join(_LEN.pack(len(v)) + v for v in values)
    return np.asarray(list(values)).astype(DTYPES[datatype]).tobytes()


def split_bytes(raw: bytes) -> list[bytes]:
    """Raw BYTES: 4-byte little-endian lengths, each followed by that many bytes."""
    out, pos, end = [], 0, len(raw)
    while pos < end:
        if pos + 4 > end:
            raise InvalidArgument("the pod's BYTES output ends inside a length prefix")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        out.append(raw[pos:pos + n])
        pos += n
    return out


def data_json(datatype: str, raw: bytes) -> list[Any]:
    """Raw bytes of an output as JSON `data` (flat, row-major, as Triton answers)."""
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in split_bytes(raw)]
    if datatype == "BF16":  # bfloat16 is float32's top half: exact as a JSON number
        halves = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
        return halves.view("<f4").tolist()
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"the pod answered an output of unknown datatype {quote_id(datatype, 16)}")
    return np.frombuffer(raw, dtype=dtype).tolist()


def infer_response(response: bytes, request: Request) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of the REST answer to the pod's ModelInferResponse
    bytes: the JSON, then the binary outputs' data in output order."""
    message = pb.ModelInferResponse.FromString(response)
    raws: Sequence[bytes] = message.raw_output_contents
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(message.outputs):
        raw = raw_of(tensor, raws[index] if index < len(raws) else None)
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = parameters_json(tensor.parameters)
        binary = (tensor.name in request.binary_outputs if tensor.name in request.named_outputs
                  else request.binary_default)
        if binary:
            params[BINARY_SIZE] = len(raw)
            blobs.append(raw)
        if params:
            out["parameters"] = params
        if not binary:
            out["data"] = data_json(tensor.datatype, raw)
        outputs.append(out)
    body: dict[str, Any] = {"model_name": message.model_name, "model_version": message.model_version}
    if message.id:
        body["id"] = message.id
    params = parameters_json(message.parameters)
    if params:
        body["parameters"] = params
    body["outputs"] = outputs
    text = dumps(body)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def dumps(obj: Any) -> bytes:
    """Compact JSON; non-finite floats as Triton's JSON writer spells them (NaN, Infinity)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def tensors_json(tensors: Iterable[Mapping[str, object]]) -> list[dict[str, Any]]:
    """Tensor metadata as ModelMetadata's JSON lists it."""
    return [{"name": str(t.get("name", "")), "datatype": str(t.get("datatype", "")),
             "shape": [int(d) for d in t.get("shape") or ()]}  # type: ignore[attr-defined]
            for t in tensors]
