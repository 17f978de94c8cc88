"""The router process: V2 inference + registration API on one gRPC server over a watched view
of the mesh state.

Stopping (RELIABILITY.md F2, F7): SIGTERM drains, as Kubernetes' stop asks. The grpc health
turns NOT_SERVING at once (readiness probes and load balancers stop sending new traffic), the
router goes on accepting and serving requests for MESH_ROUTER_DRAIN_SETTLE_S (endpoint
removal takes a moment to reach every load balancer), then stops accepting new RPCs (GOAWAY:
clients reconnect elsewhere) and lets those in flight finish within MESH_ROUTER_DRAIN_GRACE_S,
then exits 0. SIGINT, or a second signal, stops at once (in-flight RPCs are cancelled). Every
shutdown step is bounded and a failing one is logged, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mesh import metrics as metrics_mod
from mesh import process
from mesh.clock import SystemClock
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.pb.v1 import registry_pb2_grpc, tokens_pb2_grpc, vmodels_pb2_grpc
from mesh.process import shutdown_step
from mesh.rpc import tls
from mesh.rpc.server import ChannelPool, install_stop_signals, make_server
from mesh.rpc.status import InFlightLimit, StatusServer
from mesh.settings import CommonSettings, RouterSettings
from mesh.state import MeshState
from mesh.tasks import Supervisor
from mesh.telemetry import TelemetryKeys
from mesh.telemetry import client as redis_client
from router import auth, envoy, tokens
from router.extensions import Extensions
from router.forward import Forwarder
from router.miss import MissHandler
from router.quota import Quotas, TenantStore
from router.registry import Registry
from router.registry_api import RegistryServicer
from router.rest import RestFront
from router.rest_server import RestServer
from router.rollout_store import RolloutStore
from router.servicer import InferenceServicer
from router.table import RouteTable
from router.telemetry import Telemetry
from router.vmodel_api import VModelServicer
from router.vmodel_store import VModelStore

log = logging.getLogger(__name__)

STEP_S = 5.0  # bound of each shutdown step other than the server's stop


async def serve(
    common: CommonSettings,
    settings: RouterSettings,
    stop: asyncio.Event,
    metrics: Metrics,
    drain: asyncio.Event | None = None,
) -> None:
    """Runs the router until `stop` is set (stops at once: in-flight RPCs are cancelled) or
    `drain` is (drains first, see the module docstring), then closes everything it opened."""
    drain = drain or asyncio.Event()
    keys = Keys(common.root)
    client = EtcdClient.from_settings(common)
    view = View(client, keys.prefix())
    state = MeshState(view, keys)
    table = RouteTable(state, metrics)
    # Internal mTLS (MESH_INTERNAL_TLS_*) to pods and placement; the public port's own TLS below.
    internal_tls = tls.internal_client_tls(common)
    public_tls = tls.public_server_tls(settings)
    pods = ChannelPool(settings.max_message_bytes, internal_tls)
    placement = ChannelPool(settings.max_message_bytes, internal_tls)
    miss = MissHandler(state, table, placement, metrics, settings.default_deadline_s, settings.leader_wait_s,
                       leader_lease_s=common.lease_ttl_s)
    telemetry = None
    if common.redis_url:
        telemetry = Telemetry(
            redis_client(common.redis_url, common.redis_timeout_s),
            TelemetryKeys(common.root, common.telemetry_bucket_s), metrics,
            settings.telemetry_flush_s, common.telemetry_retention_s,
            usage_retention_s=common.usage_retention_s,
        )
    quotas = Quotas(state, settings, metrics)  # per-tenant quotas (router/quota.py)
    forwarder = Forwarder(state, table, miss, pods, settings, metrics,
                          on_request=telemetry.record if telemetry else None, quotas=quotas,
                          on_rollout=telemetry.record_rollout if telemetry else None)
    registry = Registry(client, keys, state, settings, SystemClock(), quotas)
    tenant_store = TenantStore(client, keys, state, quotas, settings.default_deadline_s)

    supervisor = Supervisor()
    supervisor.start("view", view.run)
    supervisor.start("sync", table.track_sync)
    supervisor.start("channel-sweep", forwarder.sweep)
    if telemetry is not None:
        supervisor.start("telemetry", telemetry.run)

    # Envoy on the public port (router/envoy.py) when wanted; this server then listens behind it.
    binary, why = envoy.wanted(settings, public_tls, internal_tls)
    plane = None
    if binary is not None:
        plane = envoy.DataPlane(binary, settings, state, table, forwarder.namespace.versions, metrics,
                                lambda: quotas.free(""), forwarder.on_request,
                                tls=envoy.tls_of(public_tls, internal_tls))
    else:
        log.info("Envoy data plane off: %s", why)
    server, port = make_server(
        settings.listen if plane is None else settings.envoy_internal_listen, settings.max_message_bytes, metrics,
        settings.max_concurrent_rpcs, limit_setting="MESH_ROUTER_MAX_CONCURRENT_RPCS",
        # Streams per connection above the RPC limit, so the limit sheds them with
        # RESOURCE_EXHAUSTED + pushback: at grpc's 100, one client multiplexing more calls got
        # RST_STREAM REFUSED_STREAM, i.e. UNAVAILABLE with no hint (F21), even at 90 in flight.
        max_concurrent_streams=InFlightLimit(settings.max_concurrent_rpcs).backstop,
        # Behind Envoy: plaintext on loopback (Envoy holds the public TLS); the probes' port
        # stays on the public host.
        tls=public_tls if plane is None else None, health_port=settings.health_port,
        health_host=settings.listen.rpartition(":")[0] or None,
    )
    # Every public RPC is authenticated before its handler runs (router/auth.py); grpc
    # health (added by make_server) and the metrics port are not behind the guard.
    authn = auth.Authenticator.from_settings(settings, state.tokens, lambda: table.synced)
    authn.trust_digest = plane is not None  # Envoy hashes tokens (router/envoy.py); this port is loopback then
    guard = auth.Guard(authn, admin_services=[tokens.SERVICE])
    # Triton's extensions (router/extensions.py), shared by every front.
    triton = Extensions(state, table, forwarder, registry, pods, placement)
    server.add_generic_rpc_handlers([guard.generic(InferenceServicer(state, table, forwarder, triton).handler())])
    registry_api = RegistryServicer(registry, tenant_store)
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(registry_api, guard.server(server))
    vmodel_store = VModelStore(client, keys, state, table, miss, forwarder.namespace, SystemClock(),
                               settings.default_deadline_s)  # aliases (router/vmodels.py)
    rollouts = RolloutStore(vmodel_store, telemetry is not None)  # rollouts (router/rollout_store.py)
    vmodels_pb2_grpc.add_VModelsServicer_to_server(VModelServicer(vmodel_store, rollouts), guard.server(server))
    supervisor.start("vmodel-switches", vmodel_store.sweep)
    # The HTTP/JSON front (router/rest.py) over the same forwarder, extensions and registry.
    rest = RestServer(
        RestFront(state, table, forwarder, triton, registry_api, authn, metrics, settings.default_deadline_s),
        settings.rest_listen, settings.max_message_bytes, settings.rest_max_concurrent,
        settings.rest_keepalive_s, public_tls) if settings.rest_listen else None
    tokens_pb2_grpc.add_TokenAdminServicer_to_server(
        tokens.TokenAdminServicer(client, keys, state, SystemClock(), authn.admin_digests,
                                  plane.sync if plane is not None else None), guard.server(server))
    _log_auth(authn)
    try:
        await server.start()
        if rest is not None:
            log.info("router REST (KServe V2 HTTP + registration API) listening on %s:%d (%s)", rest.host,
                     await rest.start(), "plaintext" if public_tls is None else "HTTPS")
        host = settings.listen.rsplit(":", 1)[0]
        metrics_mod.serve(metrics, host, settings.metrics_port)
        if plane is not None:
            plane.prepare(port)
            supervisor.start("envoy", plane.run)
            supervisor.start("envoy-endpoints", plane.push)
            supervisor.start("envoy-access-log", plane.tail)
        log.info("router listening on %s (port %d, %s), mesh root %s",
                 settings.listen if plane is None else f"{settings.listen} through Envoy", port,
                 _transport(public_tls, internal_tls), keys.root)
        supervisor.start("health", lambda: _serving_once_synced(view, server, drain, stop))
        await process.first_set(stop, drain)
        if not stop.is_set():
            if plane is not None:  # Envoy GOAWAYs its clients too, then serves on for the settle time
                await shutdown_step("Envoy drain", envoy.drain_listeners(plane))
            await asyncio.gather(_drain(server, settings, stop), *(
                [rest.drain(settings.drain_settle_s, settings.drain_grace_s, stop)] if rest is not None else []))
    finally:
        log.info("router stopping")
        await shutdown_step("health NOT_SERVING", server.set_serving(False))
        if plane is not None:
            plane.close()
            await shutdown_step("Envoy stop", plane.stop(), STEP_S)
        # Stopped at once (or the drain's server stop cut short): cancels what is in flight.
        await shutdown_step("gRPC server stop", server.stop(None), STEP_S)
        if rest is not None:
            await shutdown_step("REST server stop", rest.stop(None), STEP_S)
        await shutdown_step("cold-load waits close", miss.close())
        await shutdown_step("background tasks stop", supervisor.stop())
        await shutdown_step("pod channels close", pods.close())
        await shutdown_step("placement channels close", placement.close())
        if telemetry is not None:
            await shutdown_step("Redis close", telemetry.redis.aclose())  # type: ignore[attr-defined]
        await shutdown_step("etcd client close", client.close())
        log.info("router stopped")


def _log_auth(authn: auth.Authenticator) -> None:
    log.info("authentication: %s", authn.describe())
    if authn.allow_anonymous:
        log.warning("AUTHENTICATION IS OPTIONAL: callers without credentials are admitted as the default "
                    "tenant (MESH_ROUTER_ALLOW_ANONYMOUS / mesh up --allow-anonymous); do not expose this "
                    "router beyond this machine")


def _transport(public: tls.ServerTLS | None, internal: tls.ClientTLS | None) -> str:
    """How the router's connections are secured, for its start-up line."""
    front = "plaintext" if public is None else (
        "mutual TLS" if public.require_client_cert else "TLS")
    return f"{front}; to pods and placement: {'mutual TLS' if internal else 'plaintext'}"


async def _drain(server: StatusServer, settings: RouterSettings, stop: asyncio.Event) -> None:
    """NOT_SERVING at once; serve on for the settle time; then stop accepting and let in-flight
    RPCs finish within the grace. `stop` (a second signal) cuts either wait short."""
    started = time.monotonic()
    log.info("router draining: health NOT_SERVING; accepting requests for %.1fs more, then "
             "in-flight ones get %.1fs", settings.drain_settle_s, settings.drain_grace_s)
    await shutdown_step("health NOT_SERVING", server.set_serving(False))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), settings.drain_settle_s)
    if stop.is_set():
        return
    log.info("router drain: no longer accepting new RPCs; waiting for those in flight")
    stopping = asyncio.ensure_future(server.stop(settings.drain_grace_s))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([stopping, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not stopping.done():
        log.warning("router drain cut short: cancelling the RPCs still in flight")
        # A smaller grace stops the server sooner (grpc); the drain's stop then returns too.
        await shutdown_step("gRPC server stop", server.stop(None))
    drained = await shutdown_step("gRPC server stop within the drain grace", stopping, STEP_S)
    if drained and not stop.is_set():
        log.info("router drained in %.1fs", time.monotonic() - started)


async def _serving_once_synced(view: View, server: StatusServer, *stopping: asyncio.Event) -> None:
    """Ready (grpc health SERVING) once the route table has loaded from etcd, unless the router
    began stopping meanwhile (a late SERVING would undo the drain's NOT_SERVING)."""
    await view.wait_synced()
    if not any(e.is_set() for e in stopping):
        await server.set_serving(True)


async def _serve_draining(
    common: CommonSettings, settings: RouterSettings, stop: asyncio.Event, metrics: Metrics
) -> None:
    drain = asyncio.Event()
    install_stop_signals(stop, drain)  # replaces mesh.process's handlers (which only stop)
    await serve(common, settings, stop, metrics, drain=drain)


def main() -> None:
    process.run("router", RouterSettings, _serve_draining)
