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


def fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Yields (field number, wire type, start, end) of each top-level field.

    For a length-delimited field, data[start:end] is its payload; for the others it is the
    encoded value. Groups (wire types 3/4) and unknown wire types are malformed for V2.
    """
    pos, end = 0, len(data)
    while pos < end:
        tag, pos = read_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidArgument("malformed protobuf message: field number 0")
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
