"""The placement process: etcd view + leader election + EnsureLoaded server + reconcile loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from mesh import process
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.metrics import serve as serve_metrics
from mesh.pb.v1 import internal_pb2_grpc
from mesh.rpc.server import make_server
from mesh.settings import CommonSettings, PlacementSettings
from mesh.state import MeshState
from mesh.tasks import Supervisor
from mesh.telemetry import TelemetryKeys
from mesh.telemetry import client as redis_client
from placement.activity import ActivitySource, NoActivity
from placement.controller import Controller
from placement.leader import Leader
from placement.reconcile import Reconciler
from placement.server import PlacementServicer
from placement.telemetry import RedisActivity
from placement.usage import GrpcUsage

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GRACE_S = 2.0


def _advertise(settings: PlacementSettings, port: int) -> str:
    if settings.advertise:
        return settings.advertise
    host = settings.listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


async def serve(common: CommonSettings, settings: PlacementSettings, stop: asyncio.Event, metrics: Metrics) -> None:
    """Runs one placement replica until `stop` is set, then shuts down within a bounded grace."""
    client = EtcdClient.from_settings(common)
    view = View(client, Keys(common.root).prefix())
    state = MeshState(view, Keys(common.root))
    supervisor = Supervisor()
    usage = GrpcUsage()
    server, port = make_server(settings.listen, MAX_MESSAGE_BYTES, metrics)
    holder = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    leader = Leader(client, state, holder, _advertise(settings, port), common.lease_ttl_s, metrics)
    activity: ActivitySource = NoActivity()
    if common.redis_url:
        keys = TelemetryKeys(common.root, common.telemetry_bucket_s)
        activity = RedisActivity(redis_client(common.redis_url, common.redis_timeout_s), keys, metrics,
                                 settings.activity_window_s)
    controller = Controller(state, leader, settings, metrics, usage, activity=activity)
    reconciler = Reconciler(controller)
    internal_pb2_grpc.add_PlacementServicer_to_server(PlacementServicer(controller, settings), server)
    try:
        supervisor.start("view", view.run)
        synced = asyncio.ensure_future(view.wait_synced())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([synced, stopped], return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopped.cancel()
        if stop.is_set():
            return
        supervisor.start("leader", leader.run)
        supervisor.start("reconcile", reconciler.run)
        await server.start()
        await server.set_serving(True)  # followers are healthy too: they take over on failover
        serve_metrics(metrics, settings.listen.rsplit(":", 1)[0], settings.metrics_port)
        log.info("placement %s listening on port %d", holder, port)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.set_serving(False)
            await server.stop(GRACE_S)
        await controller.close()
        await supervisor.stop()  # the leader resigns (revokes its lease) on cancel
        await usage.close()
        if isinstance(activity, RedisActivity):
            await activity.close()
        await client.close()


def main() -> None:
    process.run("placement", PlacementSettings, serve)
