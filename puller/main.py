"""Entry point of a runtime pod: `serve` until stopped, `main` for the CLI and containers.

Stopping: SIGTERM drains (Kubernetes' stop): grpc health NOT_SERVING, the instance record
says `draining`, V2 requests for the models held are still served while placement makes them
ready elsewhere and takes the assignments away (each unload lets its in-flight requests
finish); when none is left, or after MESH_RUNTIME_DRAIN_TIMEOUT_S, the pod stops. SIGINT, or
a second signal, stops at once. Either way the server stops within a bounded grace and the
lease is revoked; every step that fails is logged, none silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket

from mesh import metrics as metrics_mod
from mesh import process
from mesh.clock import Clock, SystemClock
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.rpc.server import install_stop_signals
from mesh.rpc.tls import internal_server_tls
from mesh.settings import CommonSettings, RuntimeSettings
from puller import footprint, gpu
from puller.agent import Agent, Identity
from puller.cache import ArtifactCache
from puller.executor import Executor
from puller.sandbox import DEFAULT_MEMORY_BYTES, Sandbox
from puller.server import Runtime, build_server
from puller.stats import StatsBook
from puller.storage import providers
from puller.table import ModelTable

log = logging.getLogger(__name__)

GRACE_S = 5.0  # in-flight requests may finish this long once the server stops
STEP_S = 5.0  # bound of each other shutdown step


def instance_id(settings: RuntimeSettings, port: int) -> str:
    return settings.instance_id or f"{socket.gethostname()}-{port}"


def _listen_host(listen: str) -> str:
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"


async def serve(
    common: CommonSettings,
    settings: RuntimeSettings,
    stop: asyncio.Event,
    metrics: Metrics,
    clock: Clock | None = None,
    drain: asyncio.Event | None = None,
) -> None:
    """Serves until `stop` is set (stops at once) or `drain` is (drains first, see above)."""
    clock = clock or SystemClock()
    drain = drain or asyncio.Event()
    info = await asyncio.to_thread(gpu.detect)
    cuda = gpu.use_cuda(settings.use_gpu, info)
    capacity = max(info.total_bytes - settings.reserve, 0) if cuda else settings.capacity
    device = f"cuda:0 {info.name}".strip() if cuda else "cpu"

    table = ModelTable()
    io_binding = gpu.use_io_binding(settings.io_binding, cuda)
    sandbox = Sandbox(
        settings.sandbox_memory_bytes or min(capacity or DEFAULT_MEMORY_BYTES, DEFAULT_MEMORY_BYTES),
        settings.sandbox_timeout_s,
        pathlib.Path(settings.sandbox_verdict_dir or pathlib.Path(settings.cache_dir) / "verdicts"),
        settings.intra_op_threads, gpu.providers(cuda), enabled=settings.sandbox == "on", metrics=metrics,
    )
    executor = Executor(
        settings.executor_threads, settings.intra_op_threads, cuda, io_binding=io_binding, sandbox=sandbox
    )
    cache = ArtifactCache(pathlib.Path(settings.cache_dir), settings.cache_bytes, providers(settings), metrics)
    ready = asyncio.Event()
    runtime = Runtime(table, stats=StatsBook(on_queue=metrics.queue_delay))  # its direct loads: the agent's, once it exists
    metrics.track_lru(table.lru_unix_ms)
    server, port = build_server(
        settings.listen, settings.max_message_bytes, table, executor, clock, ready, metrics,
        settings.queue_per_model(), settings.max_queue_per_pod, runtime=runtime,
        tls=internal_server_tls(common), health_port=settings.health_port,
    )
    listen_host = settings.listen.rsplit(":", 1)[0]
    address = settings.advertise or f"{_listen_host(settings.listen)}:{port}"
    devices = await asyncio.to_thread(_devices, settings.reserve) if cuda else ()
    identity = Identity(instance_id(settings, port), address, capacity, device, devices)
    client = EtcdClient.from_settings(common)
    agent = Agent(
        client, Keys(common.root), identity, common.lease_ttl_s, cache, executor, table, metrics, clock,
        unload_timeout_s=settings.unload_timeout_s,
        loading_record_hold_s=settings.loading_record_hold_s,
    )
    runtime.loads = agent.direct
    try:
        await cache.start()
        await sandbox.start()  # the forkserver, onnxruntime imported once, before any load
        metrics_mod.serve(metrics, listen_host or "127.0.0.1", settings.metrics_port)
        await server.start()
        await agent.start()
        ready.set()
        await server.set_serving(True)  # registered in etcd: routers may send work
        log.info("runtime %s serving on %s (%s, capacity %d bytes)", identity.instance_id, address, device, capacity)
        await process.first_set(stop, drain)
        if not stop.is_set():
            # New connections (Kubernetes' probe, new routers) see NOT_SERVING; requests on
            # the models held are still served until placement has moved them.
            await process.shutdown_step("health NOT_SERVING", server.set_serving(False))
            await agent.drain(settings.drain_timeout_s, stop)
    finally:
        ready.clear()
        log.info("runtime %s stopping", identity.instance_id)
        await process.shutdown_step("health NOT_SERVING", server.set_serving(False))
        # The lease first: the pod's copies leave every route table at once, so no new
        # request is routed here while in-flight ones finish within the server's grace.
        await process.shutdown_step("agent stop and lease revoke", agent.stop(), STEP_S * 3)
        await process.shutdown_step("gRPC server stop", server.stop(GRACE_S), GRACE_S + STEP_S)
        agent.release()
        await process.shutdown_step("artifact cache close", cache.close())
        await process.shutdown_step("etcd client close", client.close())
        executor.close()
        log.info("runtime %s stopped", identity.instance_id)


async def _serve_draining(
    common: CommonSettings, settings: RuntimeSettings, stop: asyncio.Event, metrics: Metrics
) -> None:
    drain = asyncio.Event()
    install_stop_signals(stop, drain)  # SIGTERM drains, a second signal stops at once
    await serve(common, settings, stop, metrics, drain=drain)


def _devices(reserve: int) -> tuple[dict[str, object], ...]:
    """Every GPU / MIG slice with its capacity, for the instance record."""
    nvml = gpu.open_nvml()
    if nvml is None:
        return ()
    return tuple(d.as_dict() for d in footprint.devices(nvml, reserve))


def main() -> None:
    process.run("runtime", RuntimeSettings, _serve_draining)


if __name__ == "__main__":
    main()
