"""The router process: V2 inference + registration API on one gRPC server over a watched view
of the mesh state."""

from __future__ import annotations

import asyncio
import logging

from mesh import metrics as metrics_mod
from mesh import process
from mesh.clock import SystemClock
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.pb.v1 import registry_pb2_grpc
from mesh.rpc.server import ChannelPool, make_server
from mesh.rpc.status import StatusServer
from mesh.settings import CommonSettings, RouterSettings
from mesh.state import MeshState
from mesh.tasks import Supervisor
from mesh.telemetry import TelemetryKeys
from mesh.telemetry import client as redis_client
from router.forward import Forwarder
from router.miss import MissHandler
from router.registry import Registry
from router.registry_api import RegistryServicer
from router.servicer import InferenceServicer
from router.table import RouteTable
from router.telemetry import Telemetry

log = logging.getLogger(__name__)

GRACE_S = 5.0


async def serve(
    common: CommonSettings, settings: RouterSettings, stop: asyncio.Event, metrics: Metrics
) -> None:
    """Runs the router until `stop` is set, then drains in-flight RPCs (bounded) and closes."""
    keys = Keys(common.root)
    client = EtcdClient.from_settings(common)
    view = View(client, keys.prefix())
    state = MeshState(view, keys)
    table = RouteTable(state, metrics)
    pods = ChannelPool(settings.max_message_bytes)
    placement = ChannelPool(settings.max_message_bytes)
    miss = MissHandler(state, table, placement, metrics, settings.default_deadline_s)
    telemetry = None
    if common.redis_url:
        telemetry = Telemetry(
            redis_client(common.redis_url, common.redis_timeout_s),
            TelemetryKeys(common.root, common.telemetry_bucket_s), metrics,
            settings.telemetry_flush_s, common.telemetry_retention_s,
        )
    forwarder = Forwarder(state, table, miss, pods, settings, metrics,
                          on_request=telemetry.record if telemetry else None)
    registry = Registry(client, keys, state, settings, SystemClock())

    supervisor = Supervisor()
    supervisor.start("view", view.run)
    supervisor.start("sync", table.track_sync)
    supervisor.start("channel-sweep", forwarder.sweep)
    if telemetry is not None:
        supervisor.start("telemetry", telemetry.run)

    server, port = make_server(
        settings.listen, settings.max_message_bytes, metrics,
        settings.max_concurrent_rpcs,
    )
    server.add_generic_rpc_handlers([InferenceServicer(state, table, forwarder).handler()])
    registry_pb2_grpc.add_ModelRegistryServicer_to_server(RegistryServicer(registry), server)
    try:
        await server.start()
        host = settings.listen.rsplit(":", 1)[0]
        metrics_mod.serve(metrics, host, settings.metrics_port)
        log.info("router listening on %s (port %d), mesh root %s", settings.listen, port, keys.root)
        supervisor.start("health", lambda: _serving_once_synced(view, server))
        await stop.wait()
        log.info("router stopping")
    finally:
        await server.set_serving(False)
        await server.stop(GRACE_S)
        await miss.close()
        await supervisor.stop()
        await pods.close()
        await placement.close()
        if telemetry is not None:
            await telemetry.redis.aclose()  # type: ignore[attr-defined]
        await client.close()


async def _serving_once_synced(view: View, server: StatusServer) -> None:
    """Ready (grpc health SERVING) once the route table has loaded from etcd."""
    await view.wait_synced()
    await server.set_serving(True)


def main() -> None:
    process.run("router", RouterSettings, serve)
