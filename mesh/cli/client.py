"""CLI commands that talk to a running router: register, unregister, list, status, infer, token.

Every call carries the caller's token (`authorization: Bearer ...`, mesh.credentials.client_token).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
from typing import Any

import grpc
import numpy as np

from mesh import credentials
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, tokens_pb2, tokens_pb2_grpc, types_pb2

# V2 datatype -> numpy dtype (BYTES handled apart)
DTYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def run(args: argparse.Namespace) -> int:
    if args.command == "token" and args.token_command == "generate":
        return generate_token()
    channel = router_channel(args)
    token = credentials.client_token(args.token)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    try:
        command = COMMANDS[args.command] if args.command != "token" else TOKEN_COMMANDS[args.token_command]
        return command(channel, args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()


def router_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS with --tls / --tls-ca (and a client certificate with --tls-cert/-key)."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    ca, cert, key = (getattr(args, n, "") for n in ("tls_ca", "tls_cert", "tls_key"))
    if not (getattr(args, "tls", False) or ca or cert):
        return grpc.insecure_channel(args.router, options=options)
    if bool(cert) != bool(key):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    creds = grpc.ssl_channel_credentials(
        pathlib.Path(ca).read_bytes() if ca else None,
        pathlib.Path(key).read_bytes() if key else None,
        pathlib.Path(cert).read_bytes() if cert else None)
    return grpc.secure_channel(args.router, creds, options=options)


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of the channel."""

    def __init__(self, token: str) -> None:
        self.metadata = credentials.metadata(token)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = details._replace(metadata=(*(details.metadata or ()), *self.metadata))
        return continuation(details, request)


def _registry(channel: grpc.Channel) -> registry_pb2_grpc.ModelRegistryStub:
    return registry_pb2_grpc.ModelRegistryStub(channel)


def register(channel: grpc.Channel, args: argparse.Namespace) -> int:
    if args.repository:
        from mesh.cli import repo

        return repo.register_repository(channel, args)
    if not args.model_id or not args.storage_uri:
        print("error: give ID and URI, or --repository DIR|s3://bucket/prefix", file=sys.stderr)
        return 2
    uri = args.storage_uri
    if "://" not in uri:
        uri = pathlib.Path(uri).resolve().as_uri()
    spec = types_pb2.ModelSpec(model_id=args.model_id, storage_uri=uri, sha256=args.sha256,
                               tenant=args.tenant, labels=dict(args.label), credentials_ref=args.credentials_ref,
                               min_copies=args.min_copies, max_copies=args.max_copies,
                               max_batch_size=args.max_batch_size,
                               max_queue_delay_us=args.max_queue_delay_us,
                               idle_unload_s=args.idle_ttl, version=args.version)
    try:
        _registry(channel).RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED and uri.startswith("file:"):
            print("hint: a mesh started with `mesh up` reads models from its state folder's models/ and "
                  "the folders given with --file-root DIR", file=sys.stderr)
        raise
    print(f"registered {args.model_id}{f' version {args.version}' if args.version else ''} -> {uri}")
    return 0


def unregister(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _registry(channel).UnregisterModel(
        registry_pb2.UnregisterModelRequest(model_id=args.model_id, version=args.version), timeout=args.timeout)
    shown = f"{args.model_id} version {args.version}" if args.version else args.model_id
    print(f"unregistered {shown}" if resp.existed else f"{shown} was not registered")
    return 0


def _state(status: types_pb2.ModelStatus) -> str:
    return types_pb2.ModelState.Name(status.state)


def list_models(channel: grpc.Channel, args: argparse.Namespace) -> int:
    token, rows = "", []
    models: list[types_pb2.ModelStatus] = []
    while True:
        resp = _registry(channel).ListModels(
            registry_pb2.ListModelsRequest(page_token=token, tenant=args.tenant), timeout=args.timeout)
        for m in resp.models:
            rows.append((m.spec.model_id, m.spec.tenant or "-", _state(m), str(len(m.copies)),
                         _size(m.size_bytes), m.spec.storage_uri))
        models.extend(resp.models)
        token = resp.next_page_token
        if not token:
            break
    if getattr(args, "output", "table") == "json":
        return _json([_status_dict(m) for m in models])
    _table(("MODEL", "TENANT", "STATE", "COPIES", "SIZE", "URI"), rows)
    return 0


def _status_dict(m: types_pb2.ModelStatus) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _json(value: object) -> int:
    import json

    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def status(channel: grpc.Channel, args: argparse.Namespace) -> int:
    m = _registry(channel).GetModel(registry_pb2.GetModelRequest(model_id=args.model_id), timeout=args.timeout)
    if getattr(args, "output", "table") == "json":
        return _json(_status_dict(m))
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
               [(c.instance_id, c.address, _copy_state(c), _size(c.size_bytes),
                 c.measure_method or "-", c.error) for c in m.copies])
    return 0


def _copy_state(c: types_pb2.CopyStatus) -> str:
    """The copy's state; a pull in progress with how far it got."""
    name = types_pb2.CopyState.Name(c.state)
    if c.state == types_pb2.LOADING and c.total_bytes and c.pulled_bytes < c.total_bytes:
        return f"{name} (pulled {_size(c.pulled_bytes)} of {_size(c.total_bytes)})"
    return name


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
    headers = tuple((k.lower(), v) for k, v in getattr(args, "header", []))  # e.g. a vmodel's sticky / tag header
    if getattr(args, "repeat", 1) > 1:
        return _repeat(stub, request, args, headers)
    resp = stub.ModelInfer(request, timeout=args.timeout, metadata=headers or None)
    print(f"model {resp.model_name} version {resp.model_version or '-'}")  # a vmodel's: the target that answered
    for i, out in enumerate(resp.outputs):
        if out.datatype in DTYPES and i < len(resp.raw_output_contents):
            value = np.frombuffer(resp.raw_output_contents[i], dtype=DTYPES[out.datatype]).reshape(list(out.shape))
            print(f"{out.name} {out.datatype} {list(out.shape)}:\n{value}")
        else:
            print(f"{out.name} {out.datatype} {list(out.shape)}")
    return 0


def _repeat(stub: Any, request: Any, args: argparse.Namespace, headers: tuple[tuple[str, str], ...]) -> int:
    """`--repeat N`: the same request N times; who answered (model and version), and the errors
    by code. Exit 1 when any failed."""
    import collections
    import time

    answered: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    for i in range(args.repeat):
        if i and args.interval > 0:
            time.sleep(args.interval)
        try:
            resp = stub.ModelInfer(request, timeout=args.timeout, metadata=headers or None)
            answered[f"model {resp.model_name} version {resp.model_version or '-'}"] += 1
        except grpc.RpcError as exc:
            failed[f"{exc.code().name}: {exc.details()}"[:200]] += 1
    for what, n in answered.most_common():
        print(f"{n:6d}  {what}")
    for what, n in failed.most_common():
        print(f"{n:6d}  error {what}")
    return 1 if failed else 0


def _size(n: int) -> str:
    from mesh.units import format_bytes

    return format_bytes(n) if n else "-"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]] | list) -> None:
    from mesh.cli import tables

    tables.show(header, rows)


def generate_token() -> int:
    token = credentials.new_token()
    print(f"token:  {token}\nsha256: {credentials.digest(token)}")
    print("Give routers the digest (MESH_ROUTER_ADMIN_TOKEN_SHA256, or the Helm chart's auth Secret) and "
          "keep the token secret: it is a bootstrap admin token.", file=sys.stderr)
    return 0


def _tokens(channel: grpc.Channel) -> tokens_pb2_grpc.TokenAdminStub:
    return tokens_pb2_grpc.TokenAdminStub(channel)


def token_create(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _tokens(channel).CreateToken(tokens_pb2.CreateTokenRequest(
        tenant=args.tenant, scope=args.scope, name=args.name, ttl_s=args.expires), timeout=args.timeout)
    i = resp.info
    print(resp.token)
    print(f"created token '{i.name}' (id {i.id}) for tenant '{i.tenant or '(default)'}', scope {i.scope}, "
          f"expires {_when(i.expires_unix_ms)}. It is shown only this once: store it now. Use it as the "
          "metadata 'authorization: Bearer <token>', or MESH_TOKEN=<token> for the mesh CLI.", file=sys.stderr)
    return 0


def token_list(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _tokens(channel).ListTokens(tokens_pb2.ListTokensRequest(tenant=args.tenant), timeout=args.timeout)
    rows = [(t.name, t.id, t.tenant or "-", t.scope, _when(t.created_unix_ms) if t.created_unix_ms else "-",
             "EXPIRED" if t.expired else _when(t.expires_unix_ms), "settings" if t.configured else "etcd")
            for t in resp.tokens]
    _table(("NAME", "ID", "TENANT", "SCOPE", "CREATED", "EXPIRES", "FROM"), rows)
    return 0


def token_revoke(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _tokens(channel).RevokeToken(tokens_pb2.RevokeTokenRequest(token=args.which), timeout=args.timeout)
    for t in resp.revoked:
        print(f"revoked token '{t.name}' (id {t.id}, tenant '{t.tenant or '(default)'}', scope {t.scope})")
    return 0


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "never"
    return datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


TOKEN_COMMANDS = {"create": token_create, "list": token_list, "revoke": token_revoke}

# -- tenant quotas (admin) ------------------------------------------------------------------------

_QUOTA_FLAGS = ("max_models", "max_requests_per_s", "max_in_flight", "memory_reserved_bytes", "memory_cap_bytes")


def _tenant_row(t: registry_pb2.TenantStatus) -> tuple[str, ...]:
    s = t.spec

    def limit(value: float, text: str) -> str:
        return text if value else "-"

    return (s.tenant or "(default)", str(t.registered_models), limit(s.max_models, str(s.max_models)),
            limit(s.max_requests_per_s, f"{s.max_requests_per_s:g}"), limit(s.max_in_flight, str(s.max_in_flight)),
            _size(s.memory_reserved_bytes), _size(s.memory_cap_bytes), "defaults" if t.defaults else "set")


_TENANT_HEADER = ("TENANT", "MODELS", "MAX MODELS", "MAX REQ/S", "MAX IN FLIGHT", "RESERVED", "CAP", "QUOTAS")


def tenant_set(channel: grpc.Channel, args: argparse.Namespace) -> int:
    """Changes only the quotas given; the others keep the values in force (the defaults for a
    tenant that had none)."""
    stub = _registry(channel)
    current = stub.GetTenant(registry_pb2.GetTenantRequest(tenant=args.tenant), timeout=args.timeout).spec
    spec = registry_pb2.TenantSpec(**{f: getattr(current, f) for f in _QUOTA_FLAGS}, tenant=args.tenant)
    for flag in _QUOTA_FLAGS:
        if getattr(args, flag) is not None:
            setattr(spec, flag, getattr(args, flag))
    status = stub.SetTenant(registry_pb2.SetTenantRequest(spec=spec), timeout=args.timeout)
    _table(_TENANT_HEADER, [_tenant_row(status)])
    return 0


def tenant_get(channel: grpc.Channel, args: argparse.Namespace) -> int:
    _table(_TENANT_HEADER, [_tenant_row(_registry(channel).GetTenant(
        registry_pb2.GetTenantRequest(tenant=args.tenant), timeout=args.timeout))])
    return 0


def tenant_list(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _registry(channel).ListTenants(registry_pb2.ListTenantsRequest(), timeout=args.timeout)
    _table(_TENANT_HEADER, [_tenant_row(t) for t in resp.tenants])
    return 0


def tenant_delete(channel: grpc.Channel, args: argparse.Namespace) -> int:
    resp = _registry(channel).DeleteTenant(registry_pb2.DeleteTenantRequest(tenant=args.tenant), timeout=args.timeout)
    name = args.tenant or "(default)"
    print(f"tenant {name}: quotas removed, the defaults apply" if resp.existed else f"tenant {name} had no quotas set")
    return 0


TENANT_COMMANDS = {"set": tenant_set, "get": tenant_get, "list": tenant_list, "delete": tenant_delete}


def tenant(channel: grpc.Channel, args: argparse.Namespace) -> int:
    return TENANT_COMMANDS[args.tenant_command](channel, args)


def _load(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from mesh.cli import load

    return load.run(channel, args)


def _alias(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from mesh.cli import alias

    return alias.run(channel, args)


def _top(channel: grpc.Channel, args: argparse.Namespace) -> int:
    from mesh.cli import top

    return top.run(channel, args)


COMMANDS = {
    "register": register,
    "unregister": unregister,
    "load": _load,
    "list": list_models,
    "status": status,
    "infer": infer,
    "tenant": tenant,
    "top": _top,
    "alias": _alias,
}
