"""What the router tells Envoy (router/envoy.py runs it): its bootstrap, endpoints and routes.

Pure: no process, no I/O. Envoy, when on, listens on the router's public port and sends a
ModelInfer for a model with a ready copy straight to a pod holding it; everything else goes
to the Python router, which listens on an internal port and stays the control plane.

How a request finds its pod, without per-model routes or clusters:

- a Lua filter (`LUA`) reads the model id: ModelInferRequest.model_name (field 1, the last
  occurrence wins as in protobuf) walked from the buffered gRPC message, tensor payloads
  skipped by length; it names the model in dynamic metadata `envoy.lb: {models: <id>}`, which
  Envoy's router merges into the route's subset match. It names none (so the request goes to
  Python) for anything Python must decide: `mm-vmodel-id`, an `mm-model-id` other than
  model_name, a caller Envoy may not admit (below), a model_version other than "" / "1", a
  compressed or malformed message, an id no registered model can have;
- callers: anonymous ones where the router admits them, and bearer tokens whose sha256 the
  routes file lists (`routes`: default-tenant and admin tokens valid now). The filter hashes
  the token (sha256 in Lua, cached per worker) and swaps `authorization` for
  `x-mesh-token-sha256: <digest>`, so the token never reaches a pod; the Python router, behind
  Envoy on a loopback port, takes that digest as the caller's credential (router/auth.py). Every
  other caller (another tenant's token, an unknown or revoked one, a certificate) is Python's;
- one cluster `mesh` with subset load balancing: each pod is an endpoint at priority 0 whose
  metadata lists the models it holds ready (`list_as_any`), so the subset of a model is its
  ready copies (least-request among them); the Python router is an endpoint at priority 1
  listing every routed model, and the default subset (`role: router`) for any id no pod lists
  (misses, unknown models, aliases);
- a pod answering UNAVAILABLE ("not loaded on this pod": a stale route, a pod stopping), a
  reset or a refused connection is retried once on the next priority (Envoy's
  previous_priorities), i.e. through Python, whose miss path loads it or retries elsewhere;
- every other RPC (health, metadata, registration, streams, the Triton extensions) is routed
  to the Python router unchanged;
- the router's per-pod cap (MESH_ROUTER_MAX_IN_FLIGHT_PER_POD) holds here too, inside Envoy:
  one HTTP/2 connection per endpoint of `mesh` with at most that many streams, a pod's worth of
  requests waiting for a stream across the cluster, and any more shed at once (circuit-breaker
  overflow, flag UO) as RESOURCE_EXHAUSTED with grpc-retry-pushback-ms, as Python sheds them:
  an overloaded pod is never queued to in its saturated event loop (F21). The Python router's
  endpoint in `mesh` (misses) has the same cap; its own RPC limit stays behind it.

TLS (`PublicTLS`, `PodTLS`): Envoy terminates the public port's TLS with the router's
certificate, and with client certificates required it verifies them and passes the verified
subject and URI SANs to Python in x-forwarded-client-cert (set by Envoy alone: a client's own
is dropped), where a certificate caller is resolved (router/auth.py) — those callers take the
Python path, as every certificate caller does. To the pods it speaks the internal mutual TLS
(its client certificate, the internal CA, the one server name every pod certificate carries,
MESH_INTERNAL_TLS_SERVER_NAME); to the Python router, on loopback, plaintext. Certificates and
CAs are SDS files (`secrets`) naming the PEM files with their folder watched, so a rotated
Secret (its `..data` swapped) is used from the next handshake on, as the Python servers do.

Only the models whose request Python would forward unchanged are listed (`direct_ids`): the
default tenant's, with one version, while that tenant has no request quota. Deadlines pass
through (`grpc-timeout` is honoured and forwarded); a request without one gets no Envoy
timeout (the pod's own limits apply).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterable, Mapping
from typing import Any

from mesh.rpc.status import MIN_PUSHBACK_MS, PUSHBACK_KEY
from router.envoy_lua import LUA

ENVOY_LB = "envoy.lb"
MODELS_KEY = "models"
ROLE_KEY = "role"
ROUTER_ROLE = "router"
MESH_CLUSTER = "mesh"
ROUTER_CLUSTER = "router"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
EDS_FILE = "eds.json"
RDS_FILE = "rds.json"
ROUTE_CONFIG = "mesh"
LUA_FILTER = "envoy.filters.http.lua"
ACCESS_LOG = "access.log"
# One access-log line per ModelInfer Envoy handled: model (or "-"), upstream host, gRPC status, ms.
ACCESS_FORMAT = "%DYNAMIC_METADATA(envoy.lb:models)% %UPSTREAM_HOST% %GRPC_STATUS(NUMBER)% %DURATION%\n"
_BIG = 1_000_000  # circuit-breaker thresholds Envoy never reaches (the Python router's cluster)
MAX_CONNECTIONS = 50_000  # client connections Envoy accepts at once
OVERFLOW_FLAG = "UO"  # Envoy's response flag of a circuit-breaker overflow
OVERFLOW_PUSHBACK_MS = MIN_PUSHBACK_MS  # Envoy knows no recent latency to hint with


TLS_SOCKET = "envoy.transport_sockets.tls"
TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
SOCKET_MATCH = "envoy.transport_socket_match"  # endpoint metadata picking a cluster's transport socket
POD_SOCKET = {"tls": "pod"}  # a pod endpoint's; the Python router's endpoint has none (plaintext)


@dataclasses.dataclass(frozen=True)
class PublicTLS:
    """The public port's certificate, and the CA client certificates must chain to ("" when
    clients are not asked for one)."""

    cert: str
    key: str
    client_ca: str = ""


@dataclasses.dataclass(frozen=True)
class PodTLS:
    """Internal mutual TLS to the pods: the internal CA, this router's certificate, and the name
    every pod certificate carries as a DNS SAN."""

    ca: str
    cert: str
    key: str
    server_name: str


def _sds(name: str, config_dir: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"resource_api_version": "V3",
                                         "path_config_source": {"path": f"{config_dir}/sds-{name}.json"}}}


def _watched(path: str) -> dict[str, Any]:
    return {"path": os.path.dirname(os.path.abspath(path))}


def secrets(public: PublicTLS | None, pods: PodTLS | None) -> dict[str, dict[str, Any]]:
    """The SDS files the bootstrap names (`sds-<name>.json` -> its document)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, body: dict[str, Any]) -> None:
        out[f"sds-{name}.json"] = {"resources": [{"@type": TLS_TYPES + "Secret", "name": name, **body}]}

    def pair(cert: str, key: str) -> dict[str, Any]:
        return {"tls_certificate": {"certificate_chain": {"filename": cert}, "private_key": {"filename": key},
                                    "watched_directory": _watched(cert)}}

    def ca(path: str) -> dict[str, Any]:
        return {"validation_context": {"trusted_ca": {"filename": path}, "watched_directory": _watched(path)}}

    if public is not None:
        add("public-cert", pair(public.cert, public.key))
        if public.client_ca:
            add("public-client-ca", ca(public.client_ca))
    if pods is not None:
        add("internal-cert", pair(pods.cert, pods.key))
        add("internal-ca", ca(pods.ca))
    return out


def _downstream_tls(public: PublicTLS, config_dir: str) -> dict[str, Any]:
    common: dict[str, Any] = {"alpn_protocols": ["h2"],
                              "tls_certificate_sds_secret_configs": [_sds("public-cert", config_dir)]}
    if public.client_ca:
        common["validation_context_sds_secret_config"] = _sds("public-client-ca", config_dir)
    return {"name": TLS_SOCKET, "typed_config": {"@type": TLS_TYPES + "DownstreamTlsContext",
                                                 "require_client_certificate": bool(public.client_ca),
                                                 "common_tls_context": common}}


def _upstream_tls(pods: PodTLS, config_dir: str) -> dict[str, Any]:
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": TLS_TYPES + "UpstreamTlsContext", "sni": pods.server_name,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [_sds("internal-cert", config_dir)],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "DNS", "matcher": {"exact": pods.server_name}}]},
                "validation_context_sds_secret_config": _sds("internal-ca", config_dir)}},
    }}


@dataclasses.dataclass(frozen=True)
class Addr:
    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> Addr:
        host, _, port = address.rpartition(":")
        return cls(host.strip("[]") or "127.0.0.1", int(port))

    def socket(self) -> dict[str, Any]:
        return {"socket_address": {"address": self.host, "port_value": self.port}}

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _http2(stream_window: int, max_streams: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "initial_stream_window_size": stream_window, "initial_connection_window_size": stream_window,
        # a frozen pod's connection is closed within ~2 s (its requests retried through Python)
        "connection_keepalive": {"interval": "1s", "timeout": "1s"},
    }
    if max_streams is not None:
        options["max_concurrent_streams"] = max_streams
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": options},
    }}


def _breakers(per_pod: int | None = None) -> dict[str, Any]:
    """Circuit breakers: none Envoy reaches, or (`per_pod`) the per-pod cap: one connection per
    endpoint (at `per_pod` streams, _http2), `per_pod` requests waiting for a stream in all."""
    pending = _BIG if per_pod is None else per_pod
    out: dict[str, Any] = {"thresholds": [{"priority": "DEFAULT", "max_connections": _BIG,
                                           "max_pending_requests": pending, "max_requests": _BIG,
                                           "max_retries": _BIG}]}
    if per_pod is not None:
        out["per_host_thresholds"] = [{"priority": "DEFAULT", "max_connections": 1}]
    return out


def _overflow_reply(per_pod: int) -> dict[str, Any]:
    """The answer to a request the per-pod cap sheds: what the Python router answers
    (router/table.py), RESOURCE_EXHAUSTED with a retry hint, instead of Envoy's UNAVAILABLE."""
    def header(key: str, value: str) -> dict[str, Any]:
        return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

    message = (f"model '%DYNAMIC_METADATA({ENVOY_LB}:{MODELS_KEY})%': its ready copies have {per_pod} requests "
               "in flight each from this router, its limit per pod (MESH_ROUTER_MAX_IN_FLIGHT_PER_POD); "
               f"retry after {OVERFLOW_PUSHBACK_MS} ms, or give the model more copies")
    return {"mappers": [{
        "filter": {"response_flag_filter": {"flags": [OVERFLOW_FLAG]}},
        "headers_to_add": [header("grpc-status", "8"),  # RESOURCE_EXHAUSTED
                           header(PUSHBACK_KEY, str(OVERFLOW_PUSHBACK_MS))],
        "body_format_override": {"text_format_source": {"inline_string": message}},
    }]}


def _timeouts() -> dict[str, Any]:
    # no route timeout; the caller's grpc-timeout, uncapped, is the deadline (and is forwarded)
    return {"timeout": "0s", "max_stream_duration": {"grpc_timeout_header_max": "0s"}}


def bootstrap(public: Addr, router: Addr, config_dir: str, max_message_bytes: int,
              max_in_flight_per_pod: int, public_tls: PublicTLS | None = None,
              pod_tls: PodTLS | None = None) -> dict[str, Any]:
    """Envoy's static configuration; the `mesh` cluster's endpoints (`<config_dir>/eds.json`)
    and the routes (`rds.json`, for the tokens they list) change, written by router/envoy.py
    and watched by Envoy; with TLS, the `secrets` files beside them."""
    buffer = max_message_bytes + 64 * 1024  # one whole request is buffered (Lua, retries)
    window = max(65_535, min(max_message_bytes, 16 * 1024 * 1024))
    access_log = {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": f"{config_dir}/{ACCESS_LOG}", "log_format": {"text_format_source": {"inline_string": ACCESS_FORMAT}},
    }, "filter": {"header_filter": {"header": {"name": ":path", "string_match": {"exact": INFER_PATH}}}}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "mesh", "codec_type": "AUTO", "generate_request_id": False,
        "server_header_transformation": "PASS_THROUGH",
        "stream_idle_timeout": "3600s",  # ModelStreamInfer streams may sit idle (Python's have no limit)
        "http2_protocol_options": {"max_concurrent_streams": 1250, "initial_stream_window_size": window,
                                   "initial_connection_window_size": window},
        "access_log": [access_log],  # ModelInfer only: router/envoy.py reads it back (metrics, usage)
        "local_reply_config": _overflow_reply(max_in_flight_per_pod),
        # a client's own x-forwarded-client-cert is dropped; with client certificates Envoy
        # sets it (the verified subject and URI SANs) for Python to resolve the caller by
        **({"forward_client_cert_details": "SANITIZE_SET", "set_current_client_cert_details": {
            "subject": True, "uri": True}} if public_tls and public_tls.client_ca else
           {"forward_client_cert_details": "SANITIZE"}),
        "rds": {"route_config_name": ROUTE_CONFIG, "config_source": {"resource_api_version": "V3", "path_config_source": {
            "path": f"{config_dir}/{RDS_FILE}", "watched_directory": {"path": config_dir}}}},
        "http_filters": [
            {"name": LUA_FILTER, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": LUA}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                "suppress_envoy_headers": True}},
        ],
    }
    eds_path = f"{config_dir}/{EDS_FILE}"
    return {
        "node": {"id": "meshserve-router", "cluster": "meshserve"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        # a bound on client connections (Envoy warns without one); the Python router's limits
        # on RPCs in flight stay where they were, behind it and on the pods
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3"
                         ".DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_CONNECTIONS}}]},
        "static_resources": {
            "listeners": [{
                "name": "public", "address": public.socket(),
                "per_connection_buffer_limit_bytes": buffer,
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}],
                                   **({"transport_socket": _downstream_tls(public_tls, config_dir)}
                                      if public_tls else {})}],
            }],
            "clusters": [
                {"name": ROUTER_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
                 "per_connection_buffer_limit_bytes": buffer, "circuit_breakers": _breakers(),
                 "typed_extension_protocol_options": _http2(window),
                 "load_assignment": {"cluster_name": ROUTER_CLUSTER, "endpoints": [
                     {"lb_endpoints": [{"endpoint": {"address": router.socket()}}]}]}},
                {"name": MESH_CLUSTER, "type": "EDS", "connect_timeout": "1s", "lb_policy": "LEAST_REQUEST",
                 "per_connection_buffer_limit_bytes": buffer,
                 "circuit_breakers": _breakers(max_in_flight_per_pod),
                 "typed_extension_protocol_options": _http2(window, max_in_flight_per_pod),
                 "eds_cluster_config": {"eds_config": {"resource_api_version": "V3", "path_config_source": {
                     "path": eds_path, "watched_directory": {"path": config_dir}}}},
                 # pods (endpoint metadata POD_SOCKET) over internal mTLS, the Python router plaintext
                 **({"transport_socket_matches": [{"name": "pod", "match": POD_SOCKET,
                                                   "transport_socket": _upstream_tls(pod_tls, config_dir)}]}
                    if pod_tls else {}),
                 "lb_subset_config": {
                     "fallback_policy": "DEFAULT_SUBSET",
                     "default_subset": {ROLE_KEY: ROUTER_ROLE},
                     "subset_selectors": [{"keys": [MODELS_KEY]}],
                     "list_as_any": True,
                 },
                 # pods that stop answering at all (refused, reset, timed out) are left out a while;
                 # a pod's own statuses (UNAVAILABLE "not loaded here" included) never eject it
                 "outlier_detection": {
                     "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 3,
                     "enforcing_consecutive_local_origin_failure": 100, "enforcing_consecutive_5xx": 0,
                     "enforcing_consecutive_gateway_failure": 0, "enforcing_success_rate": 0,
                     "enforcing_local_origin_success_rate": 0, "interval": "1s", "base_ejection_time": "5s",
                     "max_ejection_percent": 100}},
            ],
        },
    }


def routes(digests: Iterable[str], anonymous: bool) -> dict[str, Any]:
    """The route configuration as an xDS file (rds.json): ModelInfer to the `mesh` cluster,
    everything else to Python. The ModelInfer route's metadata tells the Lua filter who may
    take the direct path: anonymous callers (when the router admits them) and the bearer
    tokens whose sha256 `digests` are listed (key "t<digest>")."""
    retry = {
        "retry_on": "unavailable,cancelled,reset,connect-failure,refused-stream",
        "num_retries": 1,
        "retry_priority": {"name": "envoy.retry_priorities.previous_priorities", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3"
                     ".PreviousPrioritiesConfig", "update_frequency": 1}},
    }
    allowed: dict[str, Any] = {"anonymous": anonymous, **{f"t{d}": True for d in sorted(digests)}}
    config = {
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": ROUTE_CONFIG,
        "virtual_hosts": [{"name": "mesh", "domains": ["*"], "routes": [
            {"match": {"path": INFER_PATH, "grpc": {}},
             "route": {"cluster": MESH_CLUSTER, **_timeouts(), "retry_policy": retry},
             "metadata": {"filter_metadata": {LUA_FILTER: allowed}}},
            {"match": {"prefix": "/"}, "route": {"cluster": ROUTER_CLUSTER, **_timeouts()}},
        ]}],
    }
    return {"resources": [config]}


def direct_ids(ready: Iterable[str], models: Mapping[str, Any], held: Any, quota_free: bool) -> set[str]:
    """The routed models whose ModelInfer Envoy may send straight to a pod: Python would forward
    it unchanged (the default tenant's id, the model's only version) and no quota applies.
    `held(base)` is router/versions.Index.held."""
    if not quota_free:
        return set()
    out = set()
    for model_id in ready:
        if ":" in model_id or "@" in model_id:
            continue
        spec = models.get(model_id)
        if spec is None or spec.tenant or len(held(model_id)) != 1:
            continue
        out.add(model_id)
    return out


def endpoints(copies: Mapping[str, Iterable[str]], router: Addr, direct: set[str],
              resolve: Any = None, pod_tls: bool = False) -> dict[str, Any]:
    """The `mesh` cluster's ClusterLoadAssignment as an xDS file: `copies` maps each model id
    to the pod addresses of its ready copies; only `direct` ids are listed. `resolve(host)`
    gives a pod host's IP (EDS takes addresses only); hosts it cannot resolve are left out.
    `pod_tls`: pods are reached over the internal mTLS (bootstrap's `pod_tls`)."""
    by_pod: dict[str, list[str]] = {}
    for model_id, addresses in copies.items():
        if model_id not in direct:
            continue
        for address in addresses:
            by_pod.setdefault(address, []).append(model_id)
    pods = []
    for address in sorted(by_pod):
        addr = Addr.parse(address)
        host = addr.host if is_ip(addr.host) or resolve is None else resolve(addr.host)
        if host is None:
            continue
        metadata: dict[str, Any] = {ENVOY_LB: {MODELS_KEY: sorted(by_pod[address])}}
        if pod_tls:
            metadata[SOCKET_MATCH] = POD_SOCKET
        pods.append({"endpoint": {"address": Addr(host, addr.port).socket()},
                     "metadata": {"filter_metadata": metadata}})
    python = {"endpoint": {"address": router.socket()},
              "metadata": {"filter_metadata": {ENVOY_LB: {ROLE_KEY: ROUTER_ROLE, MODELS_KEY: sorted(direct)}}}}
    groups = ([{"priority": 0, "lb_endpoints": pods}] if pods else []) + [
        {"priority": 1 if pods else 0, "lb_endpoints": [python]}]
    # Priorities must be contiguous from 0: with no pod listed the router is priority 0.
    assignment = {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                  "cluster_name": MESH_CLUSTER, "endpoints": groups}
    return {"resources": [assignment]}
