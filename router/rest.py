"""The router's HTTP/JSON front: KServe V2 REST (Triton's HTTP API) and the registration API.

Stack-agnostic: `RestFront.handle(method, path, query, headers, body)` returns a `Reply`;
router/rest_server.py serves it with aiohttp (bench/rest_stack.py serves it with other stacks
to compare them). Nothing here is a second copy of the gRPC side's logic:
- infer: the body becomes one ModelInferRequest (router/rest_codec.py) that goes through
  `Forwarder.infer`, the route table, miss path, retries, tenancy and quotas of ModelInfer;
- metadata / ready / config / statistics / repository: router/extensions.py, the gRPC
  servicer's implementation (messages to JSON with json_format);
- /v1/models and /v1/tenants: router/registry_api.py's RegistryServicer methods themselves.
Every endpoint but /v2/health/* authenticates as the gRPC guard does (router/auth.py): a
bearer token in `Authorization`, else a verified client certificate (HTTPS with client
certificates required), else anonymous when the router allows it; the principal is bound
(`auth.bind`) before the handler runs. Errors are JSON `{"error": ...}` with the HTTP status
of the gRPC status the mesh raised (STATUS below), paths redacted as the status layer does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from mesh import errors, process
from mesh.errors import InvalidArgument, Kind, MeshError, PermissionDenied, Unauthenticated
from mesh.metrics import Metrics
from mesh.pb.inference import extensions_pb2 as ext
from mesh.pb.v1 import registry_pb2
from mesh.rpc.status import PUSHBACK_KEY
from mesh.state import MeshState
from router import auth, extensions, rest_codec, tenancy, versions, vmodels
from router.extensions import Extensions
from router.forward import Forwarder, PodStatus
from router.registry_api import RegistryServicer
from router.table import RouteTable

log = logging.getLogger(__name__)

SERVER_NAME = "meshserve"
EXTENSIONS = (*extensions.EXTENSIONS, "binary_tensor_data")
HEADER_LENGTH = "inference-header-content-length"
JSON, OCTETS = "application/json", "application/octet-stream"

# HTTP status of each error kind: Triton's HttpCodeFromError where it has the case (NOT_FOUND
# 404, UNAVAILABLE 503, INTERNAL 500, UNIMPLEMENTED 501, the rest 400), and the standard
# code where Triton has no such error (quotas, credentials, deadlines).
STATUS: dict[Kind, int] = {
    Kind.NOT_FOUND: 404, Kind.INVALID_ARGUMENT: 400, Kind.ALREADY_EXISTS: 409, Kind.UNAVAILABLE: 503,
    Kind.FAILED_PRECONDITION: 400, Kind.RESOURCE_EXHAUSTED: 429, Kind.ABORTED: 409,
    Kind.DEADLINE_EXCEEDED: 504, Kind.UNIMPLEMENTED: 501, Kind.UNAUTHENTICATED: 401,
    Kind.PERMISSION_DENIED: 403, Kind.INTERNAL: 500,
}
_KIND_OF_CODE = {grpc.StatusCode[k.value]: k for k in Kind}
HOW_TO = "send the header 'Authorization: Bearer <token>' (tritonclient.http: headers={'Authorization': 'Bearer <token>'})"


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, rest_codec.dumps(obj))


def error_reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, rest_codec.dumps({"error": errors.redact_paths(message)}), JSON, headers)


def retry_after(ms: int) -> tuple[tuple[str, str], ...]:
    """Retry-After (whole seconds, at least 1) from a pushback hint in milliseconds."""
    return (("Retry-After", str(max(1, math.ceil(ms / 1000)))),)


def _pushback(trailing: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    for key, value in trailing:
        if key == PUSHBACK_KEY and value.isdigit():
            return retry_after(int(value))
    return ()


def mesh_error_reply(exc: MeshError) -> Reply:
    headers = retry_after(exc.retry_after_ms) if isinstance(exc, errors.Overloaded) else ()
    return error_reply(STATUS.get(exc.kind, 500), exc.message, headers)


def pod_status_reply(exc: PodStatus) -> Reply:
    kind = _KIND_OF_CODE.get(exc.code, Kind.INTERNAL)
    return error_reply(STATUS.get(kind, 500), exc.details, _pushback(exc.trailing))


def proto_json(message: Message) -> Any:
    """A message as Triton's HTTP API writes it: proto field names, defaults included, and
    64-bit integers as JSON numbers (json_format writes them as strings)."""
    return _ints(message.DESCRIPTOR, json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


_INT64_TYPES = frozenset({FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64})


def _ints(descriptor: Any, obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj
    for key, value in obj.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                vfield = field.message_type.fields_by_name["value"]
                if vfield.message_type is not None:
                    obj[key] = {k: _ints(vfield.message_type, v) for k, v in value.items()}
            elif isinstance(value, list):
                obj[key] = [_ints(field.message_type, v) for v in value]
            else:
                obj[key] = _ints(field.message_type, value)
        elif field.type in _INT64_TYPES:
            obj[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return obj


class _Budget:
    """The one thing RegistryServicer's methods ask of a gRPC context: the caller's time left."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s

    def time_remaining(self) -> float:
        return self.budget_s


Handler = Callable[..., Awaitable[Reply]]


class RestFront:
    """The endpoints (docs/PROTOCOL.md "REST"), over the gRPC side's domain objects."""

    def __init__(self, state: MeshState, table: RouteTable, forwarder: Forwarder, triton: Extensions,
                 registry: RegistryServicer, authn: auth.Authenticator, metrics: Metrics,
                 default_deadline_s: float) -> None:
        self.state = state
        self.table = table
        self.forwarder = forwarder
        self.triton = triton
        self.registry = registry
        self.authn = authn
        self.metrics = metrics
        self.default_deadline_s = default_deadline_s
        self.draining = False  # /v2/health/ready answers 503 once set (router/main.py's drain)
        self._server_metadata = rest_codec.dumps(
            {"name": SERVER_NAME, "version": process.version(), "extensions": list(EXTENSIONS)})
        self._counts: dict[tuple[str, int], tuple[Any, Any]] = {}

    # -- entry point ---------------------------------------------------------------------------

    async def handle(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
                     body: bytes, peer: Mapping[str, Any] | None = None) -> Reply:
        """Answers one request. `headers.get` takes lower-case names (case-insensitive maps do);
        `peer`: the verified client certificate (ssl's getpeercert()), if any."""
        started = time.perf_counter()
        where = ["unknown"]
        status = 499  # the client went away (the request was cancelled)
        try:
            reply = await self._dispatch(method, path, query, headers, body, peer, where)
            status = reply.status
            return reply
        finally:
            self._record(where[0], status, started)

    def _record(self, name: str, status: int, started: float) -> None:
        """mesh_requests_total / mesh_request_seconds, method "REST/<endpoint>", code the HTTP status."""
        key = (name, status)
        children = self._counts.get(key)
        if children is None:
            m = self.metrics
            children = self._counts[key] = (m.requests.labels(m.service, f"REST/{name}", str(status)),
                                            m.request_seconds.labels(m.service, f"REST/{name}"))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    async def _dispatch(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str],
                        body: bytes, peer: Mapping[str, Any] | None, where: list[str]) -> Reply:
        name = "unknown"
        try:
            parts = [p for p in path.split("/") if p]
            if parts[:2] == ["v2", "health"] and len(parts) == 3:
                where[0] = "health"
                return self._health(method, parts[2])
            route = self._route(method, parts)
            if route is None:
                return error_reply(404, f"no endpoint {method} {path[:200]!r}: see docs/PROTOCOL.md \"REST\"")
            name, handler, args, write = route
            where[0] = name
            if isinstance(handler, Reply):
                return handler  # 405
            principal = self._principal(headers, peer)
            if write and principal.infer_only:
                raise PermissionDenied(f"{name} needs a tenant or admin token (this token has the infer scope: "
                                       "inference and reads only)")
            auth.bind(principal)
            budget = _budget(query, headers, self.default_deadline_s)
            return await handler(*args, body=body, query=query, headers=headers, budget=budget)
        except MeshError as exc:
            return mesh_error_reply(exc)
        except PodStatus as exc:
            return pod_status_reply(exc)
        except Exception:
            log.exception("unhandled error in REST %s %s", method, name)
            return error_reply(500, f"internal error in {name}")

    def _health(self, method: str, which: str) -> Reply:
        if method not in ("GET", "HEAD"):
            return error_reply(405, "health endpoints take GET")
        if which == "live":
            return json_reply({"live": True})
        if which == "ready":
            ready = self.table.synced and not self.draining
            return json_reply({"ready": ready}, 200 if ready else 503)
        return error_reply(404, "health endpoints: /v2/health/live, /v2/health/ready")

    def _principal(self, headers: Mapping[str, str], peer: Mapping[str, Any] | None) -> auth.Principal:
        value = headers.get("authorization")
        if value is not None:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(f"the Authorization header is not 'Bearer <token>': {HOW_TO}")
            return self.authn.by_token(token.strip())
        if peer is not None and self.authn.certificates:
            principal = self.authn.by_certificate(_auth_context(peer))
            if principal is not None:
                return principal
        if self.authn.allow_anonymous:
            return auth.ANONYMOUS
        raise Unauthenticated(f"no credentials: {HOW_TO}")

    # -- routing ------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str]) -> tuple[str, Any, tuple[Any, ...], bool] | None:
        """(endpoint name, handler or a 405 Reply, its positional args, is a registry write)."""
        n = len(parts)
        if parts == ["v2"]:
            return self._pick("server_metadata", method, {"GET": self.server_metadata}, ())
        if n >= 3 and parts[:2] == ["v2", "models"]:
            if n == 3 and parts[2] == "stats":
                return self._pick("statistics", method, {"GET": self.statistics}, ("", ""))
            model, version, rest = parts[2], "", parts[3:]
            if rest[:1] == ["versions"] and len(rest) >= 2:
                version, rest = rest[1], rest[2:]
            if not rest:
                return self._pick("model_metadata", method, {"GET": self.model_metadata}, (model, version))
            if len(rest) == 1:
                table: dict[str, tuple[str, Handler]] = {
                    "ready": ("GET", self.model_ready), "infer": ("POST", self.infer),
                    "config": ("GET", self.config), "stats": ("GET", self.statistics)}
                if rest[0] in table:
                    verb, fn = table[rest[0]]
                    return self._pick(rest[0], method, {verb: fn}, (model, version))
            return None
        if n >= 3 and parts[0] == "v2" and parts[1] == "repository":
            repo, rest = "", parts[2:]
            if rest[0] not in ("index", "models"):
                repo, rest = rest[0], rest[1:]
            if rest == ["index"]:
                return self._pick("repository_index", method, {"POST": self.repository_index}, (repo,))
            if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
                fn = self.load if rest[2] == "load" else self.unload
                route = self._pick(f"repository_{rest[2]}", method, {"POST": fn}, (repo, rest[1]))
                return (*route[:3], True)
            return None
        if parts[:2] == ["v1", "models"] and n <= 3:
            if n == 2:
                route = self._pick("models", method, {"GET": self.list_models, "POST": self.register}, ())
                return (*route[:3], method == "POST")
            route = self._pick("model", method, {"GET": self.get_model, "DELETE": self.unregister}, (parts[2],))
            return (*route[:3], method == "DELETE")
        if parts[:2] == ["v1", "tenants"] and n <= 3:
            if n == 2:
                return self._pick("tenants", method, {"GET": self.list_tenants}, ())
            return self._pick("tenant", method, {"GET": self.get_tenant, "PUT": self.set_tenant,
                                                 "DELETE": self.delete_tenant}, (parts[2],))
        return None

    @staticmethod
    def _pick(name: str, method: str, verbs: dict[str, Handler],
              args: tuple[Any, ...]) -> tuple[str, Any, tuple[Any, ...], bool]:
        handler = verbs.get("GET" if method == "HEAD" else method)
        if handler is None:
            return name, error_reply(405, f"{name} takes {' or '.join(verbs)}",
                                     (("Allow", ", ".join(verbs)),)), args, False
        return name, handler, args, False

    # -- KServe V2 / Triton -------------------------------------------------------------------

    async def server_metadata(self, **_: Any) -> Reply:
        return Reply(200, self._server_metadata)

    async def model_metadata(self, model: str, version: str, *, budget: float, **_: Any) -> Reply:
        """From the registry and the last load's tensor metadata (a model never loaded is loaded
        first), as gRPC's ModelMetadata."""
        # A vmodel's: its primary target's (router/vmodels.py); "" the highest version (router/versions.py).
        model, spec = self.triton.resolve(model, version=version)
        stats = await self.triton.tensors(model, spec.model_id, budget)
        every = self.forwarder.namespace.versions.versions(versions.split(spec.model_id)[0])
        return json_reply({"name": model, "versions": every, "platform": extensions.PLATFORM,
                           "inputs": rest_codec.tensors_json(stats.inputs if stats else ()),
                           "outputs": rest_codec.tensors_json(stats.outputs if stats else ())})

    async def model_ready(self, model: str, version: str, **_: Any) -> Reply:
        """200 when a copy is ready somewhere; 400 when registered but not loaded (Triton's
        answer; the body says {"ready": false}); 404 when unknown."""
        model, spec = self.triton.resolve(model, version=version)
        ready = bool(self.table.ready(spec.model_id))
        return json_reply({"name": model, "ready": ready}, 200 if ready else 400)

    async def infer(self, model: str, version: str, *, body: bytes, headers: Mapping[str, str],
                    budget: float, **_: Any) -> Reply:
        try:  # the version is resolved with the model (router/versions.py)
            header, binary = rest_codec.split_body(body, headers.get(HEADER_LENGTH))
            request = rest_codec.infer_request(header, binary, model, version)
        except InvalidArgument:
            self.triton.known(model)  # an unknown model is 404 whatever its body, as over gRPC
            raise
        if request.timeout_s is not None:
            budget = min(budget, request.timeout_s)
        metadata = [(k, v) for k, v in headers.items() if k[:3].lower() == "mm-"]
        # A vmodel's sticky and tag headers too (router/vmodels.py), and only those: other HTTP
        # headers never become gRPC metadata.
        record = self.forwarder.namespace.vmodel(tenancy.caller(), headers.get("mm-vmodel-id") or model)
        if record is not None:
            metadata += [(h, headers[h]) for h in vmodels.header_names(record) if headers.get(h) is not None]
        response = await self.forwarder.infer(request.message, metadata, budget)
        content, header_length = rest_codec.infer_response(response, request)
        if header_length is None:
            return Reply(200, content)
        return Reply(200, content, OCTETS, (("Inference-Header-Content-Length", str(header_length)),))

    async def config(self, model: str, version: str, *, budget: float, **_: Any) -> Reply:
        response = await self.triton.model_config(ext.ModelConfigRequest(name=model, version=version), budget)
        return json_reply(proto_json(response.config))

    async def statistics(self, model: str, version: str, *, budget: float, **_: Any) -> Reply:
        response = await self.triton.model_statistics(
            ext.ModelStatisticsRequest(name=model, version=version), budget)
        return json_reply(proto_json(response))

    async def repository_index(self, repo: str, *, body: bytes, budget: float, **_: Any) -> Reply:
        options = _object(body)
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        response = await self.triton.repository_index(
            ext.RepositoryIndexRequest(repository_name=repo, ready=ready), budget)
        return json_reply([proto_json(m) for m in response.models])

    async def load(self, repo: str, model: str, *, body: bytes, budget: float, **_: Any) -> Reply:
        request = ext.RepositoryModelLoadRequest(repository_name=repo, model_name=model)
        _repository_parameters(request.parameters, _object(body))
        await self.triton.repository_model_load(request, budget)
        return Reply(200)

    async def unload(self, repo: str, model: str, *, body: bytes, budget: float, **_: Any) -> Reply:
        request = ext.RepositoryModelUnloadRequest(repository_name=repo, model_name=model)
        _repository_parameters(request.parameters, _object(body))
        await self.triton.repository_model_unload(request, budget)
        return Reply(200)

    # -- registration API (mesh.v1.ModelRegistry over JSON) ----------------------------------

    async def register(self, *, body: bytes, budget: float, **_: Any) -> Reply:
        obj = _object(body)
        request = _parse(registry_pb2.RegisterModelRequest(), obj if "spec" in obj else {"spec": obj})
        status = await self.registry.RegisterModel(request, _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(status))

    async def list_models(self, *, query: Mapping[str, str], budget: float, **_: Any) -> Reply:
        request = registry_pb2.ListModelsRequest(page_token=query.get("page_token", ""),
                                                 tenant=query.get("tenant", ""))
        size = query.get("page_size", "0")
        if not size.isdigit() or int(size) > 2**31 - 1:
            raise InvalidArgument("page_size must be a non-negative integer")
        request.page_size = int(size)
        for selector in _all(query, "label"):
            key, sep, value = selector.partition("=")
            if not sep:
                raise InvalidArgument("label selectors are label=KEY=VALUE")
            request.label_selector[key] = value
        response = await self.registry.ListModels(request, _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))

    async def get_model(self, model_id: str, *, budget: float, **_: Any) -> Reply:
        status = await self.registry.GetModel(registry_pb2.GetModelRequest(model_id=model_id),
                                              _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(status))

    async def unregister(self, model_id: str, *, budget: float, **_: Any) -> Reply:
        response = await self.registry.UnregisterModel(
            registry_pb2.UnregisterModelRequest(model_id=model_id), _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))

    async def list_tenants(self, *, budget: float, **_: Any) -> Reply:
        response = await self.registry.ListTenants(registry_pb2.ListTenantsRequest(),
                                                   _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))

    async def get_tenant(self, tenant: str, *, budget: float, **_: Any) -> Reply:
        response = await self.registry.GetTenant(registry_pb2.GetTenantRequest(tenant=_tenant(tenant)),
                                                 _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))

    async def set_tenant(self, tenant: str, *, body: bytes, budget: float, **_: Any) -> Reply:
        spec = _parse(registry_pb2.TenantSpec(), _object(body))
        if spec.tenant and spec.tenant != _tenant(tenant):
            raise InvalidArgument("the body's tenant differs from the URL's")
        spec.tenant = _tenant(tenant)
        response = await self.registry.SetTenant(registry_pb2.SetTenantRequest(spec=spec),
                                                 _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))

    async def delete_tenant(self, tenant: str, *, budget: float, **_: Any) -> Reply:
        response = await self.registry.DeleteTenant(registry_pb2.DeleteTenantRequest(tenant=_tenant(tenant)),
                                                    _Budget(budget))  # type: ignore[arg-type]
        return json_reply(proto_json(response))


def _tenant(name: str) -> str:
    """The default tenant in a URL: "-" (an empty path segment cannot be sent)."""
    return "" if name == "-" else name


def _all(query: Mapping[str, str], key: str) -> list[str]:
    getall = getattr(query, "getall", None)
    if getall is not None:
        return list(getall(key, []))
    value = query.get(key)
    return [] if value is None else [value]


def _object(body: bytes) -> dict[str, Any]:
    obj = rest_codec.parse_json(body)
    if not isinstance(obj, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return obj


def _parse(message: Any, obj: dict[str, Any]) -> Any:
    try:
        return json_format.ParseDict(obj, message)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"bad request body: {str(exc)[:300]}") from None


def _repository_parameters(into: Any, obj: dict[str, Any]) -> None:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    for key, value in params.items():
        p = into[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidArgument(f"parameter {errors.quote_id(key)} must be a bool, integer or string")


def _budget(query: Mapping[str, str], headers: Mapping[str, str], default: float) -> float:
    """The request's deadline in seconds: the `timeout` query parameter (seconds), else the
    router's default deadline (an infer body's `timeout` parameter can shorten it)."""
    value = query.get("timeout")
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600 or seconds != seconds:
        raise InvalidArgument("the timeout query parameter is the deadline in seconds (0 < timeout <= 3600)")
    return seconds


def _auth_context(peer: Mapping[str, Any]) -> dict[str, list[bytes]]:
    """ssl's getpeercert() dict in the shape of grpc's auth_context (what by_certificate reads)."""
    cn = [v.encode() for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
    uris = [v.encode() for k, v in peer.get("subjectAltName", ()) if k == "URI"]
    return {"transport_security_type": [b"ssl"], "x509_common_name": cn[:1], "peer_uri": uris}

