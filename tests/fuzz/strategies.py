"""Hypothesis strategies over the messages meshserve parses: ModelInferRequest (valid-ish and
corrupted) and the registration API's requests.

Requests are built with whichever generated module the caller passes (`tritonclient.grpc.
service_pb2` in the test process, `mesh.pb.inference.grpc_predict_v2_pb2` in the benchmark
runner: the two define the same `inference.*` package and cannot share a process) and always
come out as bytes, so every target sees exactly what a client puts on the wire.
"""

from __future__ import annotations

import string
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import strategies as st

from puller.datatypes import V2, TensorSpec

DATATYPES = sorted(V2)
# Names a target model has (see specs()), names it lacks, and the awkward ones.
INPUT_NAMES = ["input", "x", "b", "", "in put", "ünï", "a" * 300]
MODEL_NAMES = ["fuzz-linear", "fuzz-types", "fuzz-any", "absent-model", "", "../etc/passwd", "a/b", "x" * 129,
               "x" * 200_000, "modèle\n", "\x00"]
BIG = [0, 1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -1, -(2**63)]


def specs() -> dict[str, dict[str, TensorSpec]]:
    """The models the in-process pod target decodes against: one input of every datatype
    (dynamic first dimension, like fuzz-types in the gRPC run), the linear FP32 model and an
    FP32 input of unknown rank (an ONNX input without a shape)."""
    # BF16 apart: beside a BYTES input a model is refused at load (puller/ortvalues.py)
    types = {f"in_{dt.lower()}": TensorSpec(f"in_{dt.lower()}", dt, (-1, 2)) for dt in DATATYPES if dt != "BF16"}
    return {"fuzz-types": types, "fuzz-linear": {"input": TensorSpec("input", "FP32", (-1, 4))},
            "fuzz-any": {"x": TensorSpec("x", "FP32", ())}}  # unknown rank: the pod checks no shape


def _values(datatype: str, count: int) -> st.SearchStrategy[list[Any]]:
    count = min(count, 64)
    if datatype == "BOOL":
        item: st.SearchStrategy[Any] = st.booleans()
    elif datatype == "BYTES":
        item = st.binary(max_size=8)
    elif datatype in ("FP32", "FP64", "FP16"):
        item = st.floats(width=32 if datatype != "FP64" else 64)
    elif datatype.startswith("UINT"):
        item = st.integers(0, 2**64 - 1 if datatype == "UINT64" else 2**32 - 1)
    else:
        item = st.integers(-(2**63), 2**63 - 1) if datatype == "INT64" else st.integers(-(2**31), 2**31 - 1)
    return st.lists(item, min_size=count, max_size=count)


def _raw(datatype: str, count: int, draw: Any) -> bytes:
    """Raw contents of `count` elements, often the right size, sometimes not."""
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=6), min_size=min(count, 32), max_size=min(count, 32)))
        out = b"".join(len(i).to_bytes(4, "little") + i for i in items)
        return draw(st.sampled_from([out, out[:-1], out + b"\x05\x00", b"\xff\xff\xff\x7f" + out]))
    size = V2[datatype][0].itemsize * min(count, 256)
    exact = bytes(draw(st.binary(min_size=size, max_size=size)))
    return draw(st.sampled_from([exact, exact[:-1], exact + b"\x00", b"", exact * 2]))


def _typed(tensor: Any, datatype: str, count: int, draw: Any) -> None:
    field = V2[datatype][1] if datatype in V2 else None
    field = draw(st.sampled_from([field or "fp32_contents", "int_contents", "bytes_contents", "fp64_contents",
                                  "uint64_contents", "bool_contents"])) if draw(st.integers(0, 4)) == 0 else field
    if field is None:
        return
    kind = {"bool_contents": "BOOL", "int_contents": "INT32", "int64_contents": "INT64", "uint_contents": "UINT32",
            "uint64_contents": "UINT64", "fp32_contents": "FP32", "fp64_contents": "FP64",
            "bytes_contents": "BYTES"}[field]
    values = draw(_values(kind, count + draw(st.sampled_from([0, 0, 0, 1, -1]))) if count > 0 else st.just([]))
    getattr(tensor.contents, field).extend(values)


def _valid_tensor(req: Any, spec: TensorSpec, raw: bool, rows: int, draw: Any) -> None:
    shape = [rows, *(d if d >= 0 else 2 for d in spec.shape[1:])]
    tensor = req.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
    count = int(np.prod(shape))
    if raw:
        if spec.datatype == "BYTES":
            items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
            req.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in items))
        else:
            size = V2[spec.datatype][0].itemsize * count
            req.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    elif V2[spec.datatype][1] is not None:
        getattr(tensor.contents, V2[spec.datatype][1]).extend(draw(_values(spec.datatype, count)))
    else:  # FP16 has no typed field: the whole request goes raw
        raise _NeedsRaw


class _NeedsRaw(Exception):
    pass


FAULTS = ["datatype", "rank", "giant", "negative", "drop", "duplicate", "unknown", "extra_raw", "mixed",
          "short_raw", "bytes_prefix", "typed_count", "zero_rows", "many_dims", "zero_and_giant"]


def _fault(req: Any, fault: str, draw: Any) -> None:
    """One semantic mistake in an otherwise valid request."""
    if not req.inputs:
        return
    i = draw(st.integers(0, len(req.inputs) - 1))
    t = req.inputs[i]
    raw = len(req.raw_input_contents) > 0
    if fault == "datatype":
        t.datatype = draw(st.sampled_from(DATATYPES) | st.sampled_from(["", "FP8", "fp32", "x" * 100]))
    elif fault == "rank":
        if draw(st.booleans()) or not t.shape:
            t.shape.append(1)
        else:
            t.shape.pop()
    elif not t.shape:
        return
    elif fault == "giant":
        t.shape[draw(st.integers(0, len(t.shape) - 1))] = draw(st.sampled_from(BIG[6:10]))
    elif fault == "negative":
        t.shape[0] = draw(st.sampled_from([-1, -2, -(2**63)]))
    elif fault == "drop":
        del req.inputs[i]
        if raw:
            del req.raw_input_contents[i]
    elif fault == "duplicate":
        req.inputs.add().CopyFrom(t)
        if raw:
            req.raw_input_contents.append(req.raw_input_contents[i])
    elif fault == "unknown":
        t.name = draw(st.sampled_from(INPUT_NAMES))
    elif fault == "extra_raw":
        req.raw_input_contents.append(b"\x00" * 8)
    elif fault == "mixed":
        t.contents.fp32_contents.append(1.0)
        t.contents.int_contents.append(1)
    elif fault == "short_raw" and raw:
        req.raw_input_contents[i] = req.raw_input_contents[i][: draw(st.integers(0, 3))]
    elif fault == "bytes_prefix" and raw:
        lie = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x05\x00\x00\x00", b"\x00\x00", b"\x00\x00\x00\x80"]))
        req.raw_input_contents[i] = lie + req.raw_input_contents[i]
    elif fault == "typed_count" and not raw:
        t.contents.fp32_contents.extend([0.0] * draw(st.integers(1, 3)))
    elif fault == "zero_rows":
        t.shape[0] = 0
    elif fault == "many_dims":  # beyond numpy's 64 dimensions, same element count
        t.shape[:] = [*t.shape, *[1] * draw(st.integers(31, 70))]
    elif fault == "zero_and_giant":  # 0 elements, but numpy refuses the shape
        t.shape[:] = [0, *[draw(st.sampled_from(BIG[6:10])) for _ in range(draw(st.integers(1, 3)))]]


@st.composite
def valid_request(draw: Any, pb: ModuleType, faults: int = 2) -> bytes:
    """A request a fuzz model accepts (every input, right datatype, shape and size), raw or
    typed, with up to `faults` semantic mistakes (FAULTS) put in."""
    model = draw(st.sampled_from(sorted(specs())))
    req = pb.ModelInferRequest(model_name=model, id=draw(st.text(max_size=8)))
    raw = draw(st.booleans())
    rows = draw(st.integers(1, 3))
    try:
        for spec in specs()[model].values():
            _valid_tensor(req, spec, raw, rows, draw)
    except _NeedsRaw:
        req = pb.ModelInferRequest(model_name=model)
        for spec in specs()[model].values():
            _valid_tensor(req, spec, True, rows, draw)
    for name in draw(st.lists(st.sampled_from(["output", "out_fp32", "out_bytes", "nope"]), max_size=2)):
        req.outputs.add(name=name)
    for fault in draw(st.lists(st.sampled_from(FAULTS), max_size=faults)):
        _fault(req, fault, draw)
    return req.SerializeToString()


@st.composite
def random_request(draw: Any, pb: ModuleType) -> bytes:
    """A serialized ModelInferRequest assembled from random parts: well-formed protobuf,
    mostly wrong for the model (datatype, shape, byte size, typed/raw mix, unknown names,
    giant and negative dims, ranks beyond numpy's)."""
    model = draw(st.sampled_from(sorted(specs())))
    name = st.sampled_from(MODEL_NAMES[:4]) | st.sampled_from(MODEL_NAMES)
    req = pb.ModelInferRequest(model_name=model if draw(st.integers(0, 3)) else draw(name))
    if draw(st.booleans()):
        req.id = draw(st.text(max_size=20) | st.just("i" * 5000))
    if draw(st.integers(0, 5)) == 0:
        req.parameters[draw(st.text(max_size=8))].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    wanted = specs()[model]
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(sorted(wanted)) | st.sampled_from(INPUT_NAMES))
        spec = wanted.get(name)
        datatype = spec.datatype if spec and draw(st.integers(0, 3)) else draw(
            st.sampled_from(DATATYPES) | st.sampled_from(["", "FP8", "fp32", "STRING", "x" * 100]))
        dims = draw(st.lists(st.sampled_from([1, 2, 4]) | st.sampled_from(BIG), max_size=4))
        if spec and draw(st.booleans()):
            dims = [draw(st.integers(0, 3)), *(d if d >= 0 else 2 for d in spec.shape[1:])]
        if draw(st.integers(0, 40)) == 0:
            dims = [1] * draw(st.integers(33, 80))  # a rank beyond anything numpy takes
        tensor = req.inputs.add(name=name, datatype=datatype, shape=dims)
        count = int(np.prod([d for d in dims if 0 <= d < 2**16], dtype=np.int64)) if dims else 1
        if raw:
            req.raw_input_contents.append(_raw(datatype if datatype in V2 else "FP32", count, draw))
            if draw(st.integers(0, 8)) == 0:
                _typed(tensor, datatype, count, draw)  # raw and typed contents mixed
        else:
            _typed(tensor, datatype, count, draw)
    if raw and draw(st.integers(0, 6)) == 0:
        req.raw_input_contents.append(b"\x00" * 4)  # one raw entry too many
    for _ in range(draw(st.integers(0, 2))):
        req.outputs.add(name=draw(st.sampled_from(["output", "out_fp32", "nope", ""])))
    return req.SerializeToString()


def infer_request(pb: ModuleType) -> st.SearchStrategy[bytes]:
    """Valid-ish ModelInferRequest bytes: valid ones with a few mistakes, and random ones."""
    return st.one_of(valid_request(pb), random_request(pb))


@st.composite
def corrupted(draw: Any, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid message's bytes mutated at random offsets: flipped, inserted, deleted bytes,
    truncation, a tail of garbage, duplicated slices."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, len(data))) if data else 0
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2 and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == 3:
            del data[pos:]
        elif op == 4:
            data += draw(st.binary(min_size=1, max_size=16))
        elif data:
            end = draw(st.integers(pos, len(data)))
            data[pos:pos] = data[pos:end]
        if data and draw(st.integers(0, 3)) == 0:
            data[min(pos, len(data) - 1)] = draw(st.sampled_from([0x80, 0xFF, 0x0B, 0x0C, 0x0F, 0x00, 0x7F]))
    return bytes(data)


def infer_bytes(pb: ModuleType) -> st.SearchStrategy[bytes]:
    """What the fuzz targets receive: valid-ish requests, corrupted ones, random bytes."""
    valid = infer_request(pb)
    return st.one_of(valid, corrupted(valid), corrupted(valid), st.binary(max_size=256))


# -- registration API ---------------------------------------------------------------------------

_ID_CHARS = string.ascii_letters + string.digits + "._-"
GOOD_IDS = st.text(_ID_CHARS, min_size=1, max_size=20).map(lambda s: "fz-" + s)
IDS = st.one_of(
    GOOD_IDS,
    st.sampled_from(["", ".", "..", "a/b", "../x", "x" * 129, "x" * 200_000, "ok\n", "é", "-lead", "\x00"]),
    st.text(max_size=40),
)
TENANTS = st.one_of(st.just(""), st.sampled_from(["t1", "other-tenant", "x" * 64, "bad tenant", "../t", "é"]),
                    st.text(max_size=20))
URIS = st.one_of(
    st.sampled_from([
        "", "file:///etc/shadow", "file:///proc/self/environ", "file://host/x", "file:///x/../etc/passwd",
        "file:///nonexistent/m.onnx", "http://169.254.169.254/latest/meta-data", "http://127.0.0.1:2379/v3",
        "http://[::1]/m.onnx", "http://2130706433/m.onnx", "https://user:pw@127.0.0.1/m.onnx",
        "https://127.0.0.1/m.onnx?X-Amz-Signature=abc", "s3://b/../x", "gopher://x", "ftp://x/y", "no-scheme",
        "http://", "file:", "x" * 5000, "http://127.0.0.1:1/m.onnx#frag", "file:///%2e%2e/etc/passwd",
    ]),
    st.text(max_size=60),
    st.text(max_size=30).map(lambda s: "file:///" + s),
    st.text(max_size=30).map(lambda s: "http://127.0.0.1:1/" + s),
)
LABELS = st.dictionaries(st.text(max_size=12) | st.sampled_from(["app", "a/b", "x" * 70]),
                         st.text(max_size=12) | st.just("v" * 300), max_size=4)
SANE_LABELS = st.dictionaries(st.text(_ID_CHARS, min_size=1, max_size=8).map(lambda s: "k" + s),
                              st.text(string.ascii_letters, max_size=8), max_size=3)
U32 = st.integers(0, 2**32 - 1)


@st.composite
def register_request(draw: Any, registry_pb2: ModuleType, types_pb2: ModuleType, good_uris: tuple[str, ...] = ()) -> bytes:
    """RegisterModelRequest with random ids, tenants, URIs, labels and bounds. min_copies is
    0 on purpose: nothing is ever loaded, so a URI a broken guard let through is never fetched
    by placement (fetching is the storage tests' job, inside an isolated network namespace).
    `good_uris`: artifacts the mesh under test accepts, so some registrations succeed."""
    uris = URIS | st.sampled_from(good_uris) if good_uris else URIS
    if good_uris and draw(st.booleans()):  # a sane spec, most fields valid: some get through
        spec = types_pb2.ModelSpec(
            model_id=draw(GOOD_IDS | IDS), storage_uri=draw(st.sampled_from(good_uris) | uris),
            format=draw(st.sampled_from(["", "onnx"])), labels=draw(SANE_LABELS),
            max_copies=draw(st.integers(0, 3)), max_batch_size=draw(st.integers(0, 8)),
            max_queue_delay_us=draw(st.integers(0, 2000)), tenant=draw(st.just("") | TENANTS),
        )
    else:
        spec = types_pb2.ModelSpec(
            model_id=draw(IDS), tenant=draw(TENANTS), storage_uri=draw(uris),
            format=draw(st.sampled_from(["", "onnx", "ONNX", "pickle", "x" * 50])),
            sha256=draw(st.sampled_from(["", "0" * 64, "g" * 64, "abc"])),
            labels=draw(LABELS), min_copies=0, max_copies=draw(U32),
            max_batch_size=draw(U32), max_queue_delay_us=draw(U32),
        )
    return registry_pb2.RegisterModelRequest(spec=spec).SerializeToString()


def registry_requests(registry_pb2: ModuleType, types_pb2: ModuleType,
                      good_uris: tuple[str, ...] = ()) -> dict[str, st.SearchStrategy[bytes]]:
    """Request bytes for each ModelRegistry method: valid-ish, corrupted and random."""
    get = IDS.map(lambda i: registry_pb2.GetModelRequest(model_id=i).SerializeToString())
    unregister = IDS.map(lambda i: registry_pb2.UnregisterModelRequest(model_id=i).SerializeToString())
    listing = st.builds(
        lambda size, token, tenant, labels: registry_pb2.ListModelsRequest(
            page_size=size, page_token=token, tenant=tenant, label_selector=labels).SerializeToString(),
        U32, st.text(max_size=20) | st.just("t" * 5000), TENANTS, LABELS)
    bodies = {"RegisterModel": register_request(registry_pb2, types_pb2, good_uris), "GetModel": get,
              "UnregisterModel": unregister, "ListModels": listing}
    return {m: st.one_of(b, corrupted(b), st.binary(max_size=64)) for m, b in bodies.items()}


def registry_calls(registry_pb2: ModuleType, types_pb2: ModuleType,
                   good_uris: tuple[str, ...] = ()) -> st.SearchStrategy[tuple[str, bytes]]:
    """(method, request bytes) over every ModelRegistry method."""
    requests = registry_requests(registry_pb2, types_pb2, good_uris)
    return st.one_of(*(st.tuples(st.just(m), body) for m, body in requests.items()))
