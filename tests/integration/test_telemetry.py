"""Usage telemetry through a real redis-server: routers' batched counts are what placement
reads; Redis down -> writes dropped and counted, reads None (fallback); Redis back -> resumes."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from mesh.cli import procs
from mesh.cli.local import start_redis
from mesh.metrics import Metrics
from mesh.telemetry import TelemetryKeys, client
from placement.telemetry import RedisActivity
from router.telemetry import Telemetry

pytestmark = pytest.mark.integration


def _value(metrics: Metrics, name: str, result: str) -> float:
    return metrics.registry.get_sample_value(name, {"result": result}) or 0.0


def test_counts_flow_from_router_to_placement(redis_server: tuple[str, subprocess.Popen]) -> None:
    url, _ = redis_server
    now = [1_700_000_005_000]

    async def scenario() -> None:
        keys = TelemetryKeys("/telemetry-test", bucket_s=10)
        routers = [Telemetry(client(url, 0.5), keys, Metrics(), now_ms=lambda: now[0]) for _ in range(2)]
        reader = RedisActivity(client(url, 0.5), keys, Metrics(), window_s=30)
        for _ in range(5):
            routers[0].record("a")
        routers[1].record("a")
        routers[1].record("b")
        assert all([await r.flush() for r in routers])
        now[0] += 10_000  # a later bucket, still inside the 30 s window
        routers[0].record("b")
        assert await routers[0].flush()
        snap = await reader.snapshot(now[0])
        assert snap is not None
        assert snap["a"].requests == 6 and snap["b"].requests == 2
        assert snap["a"].last_used_ms == now[0] - 10_000 and snap["b"].last_used_ms == now[0]
        assert snap["a"].window_s == 30
        # Later than the window: counts gone, last use kept.
        later = await reader.snapshot(now[0] + 120_000)
        assert later is not None and later["a"].requests == 0 and later["a"].last_used_ms > 0
        for r in routers:
            await r.redis.aclose()
        await reader.close()

    asyncio.run(scenario())


def test_redis_down_drops_and_counts_then_resumes(tmp_path) -> None:
    port = procs.free_port()
    proc = start_redis(port, tmp_path / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        async def scenario() -> None:
            nonlocal proc
            keys = TelemetryKeys("/down-test")
            wm, rm = Metrics(), Metrics()
            writer = Telemetry(client(url, 0.3), keys, wm)
            reader = RedisActivity(client(url, 0.3), keys, rm, window_s=60)
            writer.record("m")
            assert await writer.flush()
            procs.stop(proc)
            for _ in range(7):
                writer.record("m")
            assert not await asyncio.wait_for(writer.flush(), 5)
            assert _value(wm, "mesh_telemetry_samples_total", "dropped") == 7
            assert await asyncio.wait_for(reader.snapshot(writer.now_ms()), 5) is None
            assert _value(rm, "mesh_telemetry_reads_total", "unavailable") == 1
            proc = start_redis(port, tmp_path / "redis.log")  # back, empty (no persistence)
            writer.record("m")
            writer.record("m")
            assert await writer.flush()
            snap = await reader.snapshot(writer.now_ms())
            assert snap is not None and snap["m"].requests == 2
            await writer.redis.aclose()
            await reader.close()

        asyncio.run(scenario())
    finally:
        procs.stop(proc)
