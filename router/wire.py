"""Just enough of the protobuf wire format to route V2 traffic without the generated classes.

The router forwards ModelInfer bytes untouched and reads only `model_name` from them, so a full
parse would be wasted work. The handful of small V2 control messages it answers itself
(ServerLive, ModelReady, ModelMetadata, ...) are encoded here too: that keeps
`mesh.pb.inference` out of the router's import graph, so the router can run in one process
with `tritonclient` (both define the `inference.*` protobuf package).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mesh.errors import InvalidArgument

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1
_MAX_FIELD = (1 << 29) - 1  # protobuf's largest field number; upb rejects larger tags


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Reads a varint at `pos`; returns (value, position after it)."""
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise InvalidArgument("malformed protobuf message: truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise InvalidArgument("malformed protobuf message: varint longer than 10 bytes")


def fields(data: bytes, pos: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int]]:
    """Yields (field number, wire type, start, end) of each field of data[pos:end].

    For a length-delimited field, data[start:end] is its payload; for the others it is the
    encoded value. Groups (wire types 3/4) and unknown wire types are malformed for V2.
    """
    end = len(data) if end is None else end
    while pos < end:
        tag, pos = read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidArgument("malformed protobuf message: field number 0")
        if number > _MAX_FIELD:
            raise InvalidArgument("malformed protobuf message: field number out of range")
        start = pos
        if wire_type == VARINT:
            _, pos = read_varint(data, pos)
        elif wire_type == FIXED64:
            pos += 8
        elif wire_type == FIXED32:
            pos += 4
        elif wire_type == LEN:
            length, start = read_varint(data, pos)
            pos = start + length
        else:
            raise InvalidArgument(f"malformed protobuf message: unsupported wire type {wire_type}")
        if pos > end:
            raise InvalidArgument("malformed protobuf message: field runs past the end")
        yield number, wire_type, start, pos


def string_field(data: bytes, number: int) -> str:
    """The value of string field `number` ("" when absent; the last one wins, as in protobuf)."""
    found: tuple[int, int] | None = None
    for field, wire_type, start, end in fields(data):
        if field == number:
            if wire_type != LEN:
                raise InvalidArgument(f"malformed protobuf message: field {number} is not a string")
            found = (start, end)
    if found is None:
        return ""
    try:
        return data[found[0] : found[1]].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"malformed protobuf message: field {number} is not UTF-8") from exc


# -- structural check of a ModelInferRequest ------------------------------------------------
#
# Field number -> what protobuf may send for it: "str" (UTF-8, as proto3 requires), "bytes",
# a nested schema (a message), or the wire types of a scalar ("packed" adds LEN for a repeated
# one). Field numbers are grpc_predict_v2.proto's; unknown fields are skipped, as protobuf does.
_V = (VARINT,)
_PARAMETER = {1: _V, 2: _V, 3: "str", 4: (FIXED64,), 5: _V}  # InferParameter's oneof
_PARAMETERS = {1: "str", 2: _PARAMETER}  # a map<string, InferParameter> entry
_PACKED_V, _PACKED_32, _PACKED_64 = (VARINT, LEN), (FIXED32, LEN), (FIXED64, LEN)
_CONTENTS = {1: _PACKED_V, 2: _PACKED_V, 3: _PACKED_V, 4: _PACKED_V, 5: _PACKED_V,
             6: _PACKED_32, 7: _PACKED_64, 8: "bytes"}
_INPUT = {1: "str", 2: "str", 3: _PACKED_V, 4: _PARAMETERS, 5: _CONTENTS}
_OUTPUT = {1: "str", 2: _PARAMETERS}
INFER_REQUEST = {1: "str", 2: "str", 3: "str", 4: _PARAMETERS, 5: _INPUT, 6: _OUTPUT, 7: "bytes"}
NAMED = {1: "str", 2: "str"}  # ModelReadyRequest, ModelMetadataRequest: name, version
_ITEM = {FIXED32: 4, FIXED64: 8}


def _check(data: bytes, schema: dict, pos: int, end: int, path: str) -> tuple[int, int]:
    """Walks data[pos:end] as a message of `schema`; returns the payload bounds of its last
    field 1 ((0, 0) when absent). Raises InvalidArgument naming the first malformed field.

    The walk is fields() inlined, with one-byte tags and lengths read directly: it runs on
    every request the router forwards."""
    last_1 = (0, 0)
    try:
        while pos < end:
            tag = data[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = read_varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if number == 0 or number > _MAX_FIELD:
                raise InvalidArgument("malformed protobuf message: field number out of range")
            start = pos
            if wire_type == LEN:
                if pos < end and data[pos] < 0x80:
                    start = pos + 1
                    pos = start + data[pos]
                else:
                    length, start = read_varint(data, pos)
                    pos = start + length
            elif wire_type == VARINT:
                _, pos = read_varint(data, pos)
            elif wire_type == FIXED64:
                pos += 8
            elif wire_type == FIXED32:
                pos += 4
            else:
                raise InvalidArgument(f"malformed protobuf message: unsupported wire type {wire_type}")
            if pos > end:
                raise InvalidArgument("malformed protobuf message: field runs past the end")
            want = schema.get(number)
            if want is None:
                continue  # unknown field: skipped by its length, as protobuf does
            if number == 1:
                last_1 = (start, pos)
            if isinstance(want, tuple):
                if wire_type not in want:
                    raise InvalidArgument(f"malformed protobuf message: field {number} has the wrong type")
                if wire_type == LEN:
                    _check_packed(data, want[0], start, pos, number)
                continue
            if wire_type != LEN:
                raise InvalidArgument(f"malformed protobuf message: field {number} has the wrong type")
            if want == "str":
                try:
                    data[start:pos].decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidArgument(f"malformed protobuf message: field {number} is not UTF-8") from None
            elif want != "bytes":
                _check(data, want, start, pos, f"{path}.{number}")
    except _Located:
        raise
    except InvalidArgument as exc:  # say in which message it broke, once, at the innermost level
        raise _Located(f"{exc.message} (in {path})") from None
    return last_1


class _Located(InvalidArgument):
    """A wire-structure error whose message already names the message it is in."""


def _check_packed(data: bytes, wire_type: int, start: int, stop: int, number: int) -> None:
    size = _ITEM.get(wire_type)
    if size is not None:
        if (stop - start) % size:
            raise InvalidArgument(f"malformed protobuf message: field {number} has a partial element")
    elif stop > start and data[stop - 1] & 0x80:
        # Only the end is checked (a varint that runs off the field): walking every element
        # of a large typed tensor would cost the router what the pod's parser does anyway.
        raise InvalidArgument(f"malformed protobuf message: field {number} ends inside a varint")


def check_message(data: bytes, schema: dict, name: str) -> str:
    """Checks the wire structure of a serialized message of `schema` (nested messages
    included; bytes payloads are skipped by length, never decoded) and returns its string
    field 1 ("" when unset; the last one wins, as in protobuf). Raises InvalidArgument for
    bytes protobuf would refuse to parse (packed numbers are checked only at their end: the
    pod parses fully)."""
    start, stop = _check(data, schema, 0, len(data), name)
    return data[start:stop].decode("utf-8") if stop else ""


def check_infer_request(data: bytes) -> str:
    """model_name of a serialized ModelInferRequest whose structure check_message accepted."""
    return check_message(data, INFER_REQUEST, "ModelInferRequest")


# -- encoding -----------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    value &= _MASK64  # negative int64 values take ten bytes, as protobuf encodes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def string(number: int, value: str) -> bytes:
    return length_delimited(number, value.encode("utf-8")) if value else b""


def boolean(number: int, value: bool) -> bytes:
    return tag(number, VARINT) + b"\x01" if value else b""


def packed_int64(number: int, values: Iterable[int]) -> bytes:
    payload = b"".join(varint(int(v)) for v in values)
    return length_delimited(number, payload) if payload else b""
