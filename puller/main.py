"""Entry point of a runtime pod: `serve` until stopped, `main` for the CLI and containers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import socket

from mesh import metrics as metrics_mod
from mesh import process
from mesh.clock import Clock, SystemClock
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.settings import CommonSettings, RuntimeSettings
from puller import footprint, gpu
from puller.agent import Agent, Identity
from puller.cache import ArtifactCache
from puller.executor import Executor
from puller.server import build_server
from puller.storage import providers
from puller.table import ModelTable

log = logging.getLogger(__name__)

GRACE_S = 5.0


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
) -> None:
    clock = clock or SystemClock()
    info = await asyncio.to_thread(gpu.detect)
    cuda = gpu.use_cuda(settings.use_gpu, info)
    capacity = max(info.total_bytes - settings.reserve, 0) if cuda else settings.capacity
    device = f"cuda:0 {info.name}".strip() if cuda else "cpu"

    table = ModelTable()
    io_binding = gpu.use_io_binding(settings.io_binding, cuda)
    executor = Executor(settings.executor_threads, settings.intra_op_threads, cuda, io_binding=io_binding)
    cache = ArtifactCache(pathlib.Path(settings.cache_dir), settings.cache_bytes, providers(settings), metrics)
    ready = asyncio.Event()
    server, port = build_server(
        settings.listen, settings.max_message_bytes, table, executor, clock, ready, metrics
    )
    listen_host = settings.listen.rsplit(":", 1)[0]
    address = settings.advertise or f"{_listen_host(settings.listen)}:{port}"
    devices = await asyncio.to_thread(_devices, settings.reserve) if cuda else ()
    identity = Identity(instance_id(settings, port), address, capacity, device, devices)
    client = EtcdClient.from_settings(common)
    agent = Agent(client, Keys(common.root), identity, common.lease_ttl_s, cache, executor, table, metrics, clock)
    try:
        await cache.start()
        metrics_mod.serve(metrics, listen_host or "127.0.0.1", settings.metrics_port)
        await server.start()
        await agent.start()
        ready.set()
        await server.set_serving(True)  # registered in etcd: routers may send work
        log.info("runtime %s serving on %s (%s, capacity %d bytes)", identity.instance_id, address, device, capacity)
        await stop.wait()
    finally:
        ready.clear()
        log.info("runtime %s stopping", identity.instance_id)
        await server.set_serving(False)
        await server.stop(GRACE_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.stop(), GRACE_S)
        await cache.close()
        await client.close()
        executor.close()


def _devices(reserve: int) -> tuple[dict[str, object], ...]:
    """Every GPU / MIG slice with its capacity, for the instance record."""
    nvml = gpu.open_nvml()
    if nvml is None:
        return ()
    return tuple(d.as_dict() for d in footprint.devices(nvml, reserve))


def main() -> None:
    process.run("runtime", RuntimeSettings, serve)


if __name__ == "__main__":
    main()
