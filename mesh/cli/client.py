"""CLI commands that talk to a running router: register, unregister, list, status, infer."""

from __future__ import annotations

import argparse
import pathlib
import sys

import grpc
import numpy as np

from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

# V2 datatype -> numpy dtype (BYTES handled apart)
DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def run(args: argparse.Namespace) -> int:
    channel = grpc.insecure_channel(args.router, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        return COMMANDS[args.command](channel, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def _registry(channel: grpc.Channel) -> registry_pb2_grpc.ModelRegistryStub:
    return registry_pb2_grpc.ModelRegistryStub(channel)


def register(channel: grpc.Channel, args: argparse.Namespace) -> int:
    uri = args.storage_uri
    if "://" not in uri:
        uri = pathlib.Path(uri).resolve().as_uri()
    spec = types_pb2.ModelSpec(model_id=args.model_id, storage_uri=uri, sha256=args.sha256,
                               tenant=args.tenant, labels=dict(args.label),
                               min_copies=args.min_copies, max_copies=args.max_copies,
                               max_batch_size=args.max_batch_size,
                               max_queue_delay_us=args.max_queue_delay_us)
    _registry(channel).RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=args.timeout)
    print(f"registered {args.model_id} -> {uri}")
    return 0


def unregister(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _registry(channel).UnregisterModel(
        registry_pb2.UnregisterModelRequest(model_id=args.model_id), timeout=args.timeout)
    print(f"unregistered {args.model_id}" if resp.existed else f"{args.model_id} was not registered")
    return 0


def _state(status: types_pb2.ModelStatus) -> str:
    return types_pb2.ModelState.Name(status.state)


def list_models(channel: grpc.Channel, args: argparse.Namespace) -> int:
    token, rows = "", []
    while True:
        resp = _registry(channel).ListModels(
            registry_pb2.ListModelsRequest(page_token=token, tenant=args.tenant), timeout=args.timeout)
        for m in resp.models:
            rows.append((m.spec.model_id, m.spec.tenant or "-", _state(m), str(len(m.copies)),
                         _size(m.size_bytes), m.spec.storage_uri))
        token = resp.next_page_token
        if not token:
            break
    _table(("MODEL", "TENANT", "STATE", "COPIES", "SIZE", "URI"), rows)
    return 0


def status(channel: grpc.Channel, args: argparse.Namespace) -> int:
    m = _registry(channel).GetModel(registry_pb2.GetModelRequest(model_id=args.model_id), timeout=args.timeout)
    print(f"model:   {m.spec.model_id}\nuri:     {m.spec.storage_uri}\nstate:   {_state(m)}")
    measured = f" ({m.measure_method})" if m.measure_method else ""
    print(f"size:    {_size(m.size_bytes)}{measured}   load: {m.load_ms} ms")
    if m.last_error:
        print(f"error:   {m.last_error}")
    if m.last_decision:
        print(f"placement: {m.last_decision}")
    bounds = [f"{name} {value}" for name, value in (
        ("min copies", m.spec.min_copies), ("max copies", m.spec.max_copies),
        ("max batch size", m.spec.max_batch_size), ("max queue delay us", m.spec.max_queue_delay_us)) if value]
    if bounds:
        print("spec:    " + ", ".join(bounds))
    if m.copies:
        _table(("INSTANCE", "ADDRESS", "STATE", "SIZE", "MEASURED BY", "ERROR"),
               [(c.instance_id, c.address, types_pb2.CopyState.Name(c.state), _size(c.size_bytes),
                 c.measure_method or "-", c.error) for c in m.copies])
    return 0


def infer(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from mesh.pb.inference import grpc_predict_v2_pb2 as pb
    from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    given = dict(args.input)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model_id), timeout=args.timeout)
    request = pb.ModelInferRequest(model_name=args.model_id)
    specs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] or [(n, "FP32", []) for n in given]
    if not specs:
        print("error: the model's inputs are not known yet; pass them with --input NAME=JSON", file=sys.stderr)
        return 2
    rng = np.random.default_rng()
    for name, datatype, shape in specs:
        if datatype not in DTYPES:
            print(f"error: input {name} is {datatype}; pass it with --input", file=sys.stderr)
            return 2
        if name in given:
            array: np.ndarray = np.asarray(given[name], dtype=DTYPES[datatype])
        else:
            dims = [args.batch if i == 0 and d < 0 else (d if d >= 0 else 1) for i, d in enumerate(shape)]
            array = (rng.random(dims) * 10).astype(DTYPES[datatype])
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    resp = stub.ModelInfer(request, timeout=args.timeout)
    for i, out in enumerate(resp.outputs):
        if out.datatype in DTYPES and i < len(resp.raw_output_contents):
            value = np.frombuffer(resp.raw_output_contents[i], dtype=DTYPES[out.datatype]).reshape(list(out.shape))
            print(f"{out.name} {out.datatype} {list(out.shape)}:\n{value}")
        else:
            print(f"{out.name} {out.datatype} {list(out.shape)}")
    return 0


def _size(n: int) -> str:
    from mesh.units import format_bytes

    return format_bytes(n) if n else "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]] | list) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


COMMANDS = {
    "register": register,
    "unregister": unregister,
    "list": list_models,
    "status": status,
    "infer": infer,
}
