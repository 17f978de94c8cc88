"""The placement process: etcd view + leader election + EnsureLoaded server + reconcile loop.

Stopping (SIGTERM or SIGINT): health NOT_SERVING, then the leader resigns at once (revokes its
lease, so a standby leads without waiting out the TTL), then the server lets EnsureLoaded calls
in flight finish within a short grace. Every step is bounded and a failing one is logged with
what it was; none is skipped because an earlier one failed.
"""

from __future__ import annotations

import asyncio
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
from mesh.process import shutdown_step
from mesh.rpc import tls
from mesh.rpc.server import make_server
from mesh.settings import CommonSettings, PlacementSettings
from mesh.state import MeshState
from mesh.tasks import Supervisor
from mesh.telemetry import TelemetryKeys
from mesh.telemetry import client as redis_client
from placement.activity import ActivitySource, NoActivity
from placement.controller import Controller
from placement.leader import REVOKE_TIMEOUT_S, Leader
from placement.reconcile import Reconciler
from placement.rollouts import RolloutRunner
from placement.server import PlacementServicer
from placement.showback import Showback
from placement.telemetry import RedisActivity
from placement.usage import GrpcUsage

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
GRACE_S = 2.0  # EnsureLoaded calls in flight may finish this long once the server stops
RESIGN_S = REVOKE_TIMEOUT_S + 1.0  # the lease revoke has its own deadline; this bounds the rest
STEP_S = 5.0  # bound of each other shutdown step


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
    # Internal mTLS (MESH_INTERNAL_TLS_*): routers call in with their certificates, and the
    # calls to pods (usage, direct Load) present this replica's.
    usage = GrpcUsage(tls=tls.internal_client_tls(common))
    server, port = make_server(settings.listen, MAX_MESSAGE_BYTES, metrics,
                               tls=tls.internal_server_tls(common), health_port=settings.health_port)
    holder = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    leader = Leader(client, state, holder, _advertise(settings, port), common.lease_ttl_s, metrics)
    activity: ActivitySource = NoActivity()
    if common.redis_url:
        keys = TelemetryKeys(common.root, common.telemetry_bucket_s)
        activity = RedisActivity(redis_client(common.redis_url, common.redis_timeout_s), keys, metrics,
                                 settings.activity_window_s)
    controller = Controller(state, leader, settings, metrics, usage, activity=activity)
    controller.pressure.export()  # memory pressure, model counts, per-tenant memory (metrics)
    reconciler = Reconciler(controller)
    internal_pb2_grpc.add_PlacementServicer_to_server(PlacementServicer(controller, settings), server)
    # The election and what only a leader does, apart from the view: stopped first on shutdown.
    election = Supervisor()
    try:
        supervisor.start("view", view.run)
        synced = asyncio.ensure_future(view.wait_synced())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([synced, stopped], return_when=asyncio.FIRST_COMPLETED)
        synced.cancel()
        stopped.cancel()
        if stop.is_set():
            return
        election.start("leader", leader.run)
        election.start("reconcile", reconciler.run)
        if isinstance(activity, RedisActivity):  # showback: memory-seconds per model (`mesh usage`)
            election.start("showback", Showback(activity.redis, activity.keys, state, leader, controller.clock,
                                                settings.showback_interval_s, common.usage_retention_s).run)
            # rollouts: judged by the routers' per-second figures in Redis (mesh/rollout.py)
            election.start("rollouts", RolloutRunner(client, activity.redis, activity.keys, state, leader,
                                                     controller.clock).run)
        await server.start()
        await server.set_serving(True)  # followers are healthy too: they take over on failover
        serve_metrics(metrics, settings.listen.rsplit(":", 1)[0], settings.metrics_port)
        log.info("placement %s listening on port %d", holder, port)
        await stop.wait()
    finally:
        log.info("placement %s stopping", holder)
        await shutdown_step("health NOT_SERVING", server.set_serving(False))
        # Resign first (the leader's cancel revokes its lease, bounded by REVOKE_TIMEOUT_S): a
        # standby leads at once instead of after the TTL. The view goes on, so EnsureLoaded
        # calls in flight here still see their copies become LOADED during the server's grace.
        await shutdown_step("leader resign (lease revoke)", election.stop(), RESIGN_S)
        await shutdown_step("gRPC server stop", server.stop(GRACE_S), GRACE_S + STEP_S)
        await shutdown_step("controller close", controller.close())
        await shutdown_step("background tasks stop", supervisor.stop())
        await shutdown_step("usage channels close", usage.close())
        if isinstance(activity, RedisActivity):
            await shutdown_step("Redis close", activity.close())
        await shutdown_step("etcd client close", client.close())
        log.info("placement %s stopped", holder)


def main() -> None:
    process.run("placement", PlacementSettings, serve)
