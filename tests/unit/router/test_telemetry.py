"""Router usage telemetry without a network: batching, bucket keys, and drop counting when the
store fails (a fake pipeline records the commands a flush would send)."""

from __future__ import annotations

import asyncio

from mesh.metrics import Metrics
from mesh.telemetry import TelemetryKeys
from router.telemetry import Telemetry


class FakePipe:
    def __init__(self, store: FakeRedis) -> None:
        self.store = store
        self.ops: list[tuple] = []

    def hincrby(self, key: str, field: str, n: int) -> None:
        self.ops.append(("hincrby", key, field, n))

    def expire(self, key: str, ttl: int) -> None:
        self.ops.append(("expire", key, ttl))

    def zadd(self, key: str, mapping: dict, gt: bool = False) -> None:
        self.ops.append(("zadd", key, dict(mapping), gt))

    async def execute(self) -> list:
        if self.store.down:
            raise ConnectionError("redis down")
        self.store.ops.extend(self.ops)
        return []

    async def reset(self) -> None:
        self.ops = []


class FakeRedis:
    def __init__(self) -> None:
        self.down = False
        self.ops: list[tuple] = []

    def pipeline(self, transaction: bool = True) -> FakePipe:
        assert transaction is False  # no MULTI: plain pipelining
        return FakePipe(self)


def _samples(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("mesh_telemetry_samples_total", {"result": result}) or 0.0


def test_records_are_batched_into_one_pipelined_flush_per_bucket() -> None:
    now = [25_000]
    redis, metrics = FakeRedis(), Metrics()
    t = Telemetry(redis, TelemetryKeys("/r", bucket_s=10), metrics, retention_s=600, now_ms=lambda: now[0])
    for _ in range(3):
        t.record("a")
    now[0] = 31_000  # next bucket
    t.record("a")
    t.record("b")
    assert t.pending() == 5
    assert asyncio.run(t.flush())
    hincr = sorted(op for op in redis.ops if op[0] == "hincrby" and ":req:" in op[1])
    assert hincr == [
        ("hincrby", "meshserve:r:req:2", "a", 3),
        ("hincrby", "meshserve:r:req:3", "a", 1),
        ("hincrby", "meshserve:r:req:3", "b", 1),
    ]
    # The showback's hourly counts (`mesh usage`), summed over the flush's buckets of one hour.
    hourly = sorted(op for op in redis.ops if op[0] == "hincrby" and ":use:" in op[1])
    assert hourly == [("hincrby", "meshserve:r:use:0", "r|a", 4), ("hincrby", "meshserve:r:use:0", "r|b", 1)]
    assert ("expire", "meshserve:r:use:0", 35 * 24 * 3600) in redis.ops
    assert ("zadd", "meshserve:r:last", {"a": 31_000, "b": 31_000}, True) in redis.ops
    assert all(op[2] == 610 for op in redis.ops if op[0] == "expire" and ":req:" in op[1])
    assert t.pending() == 0 and _samples(metrics, "written") == 5


def test_store_down_drops_and_counts_samples_then_resumes() -> None:
    redis, metrics = FakeRedis(), Metrics()
    t = Telemetry(redis, TelemetryKeys("/r"), metrics, now_ms=lambda: 1_000)
    redis.down = True
    for _ in range(4):
        t.record("m")  # never raises, whatever the store does
    assert not asyncio.run(t.flush())
    assert _samples(metrics, "dropped") == 4 and t.pending() == 0  # memory stays bounded
    redis.down = False
    t.record("m")
    assert asyncio.run(t.flush())
    assert _samples(metrics, "written") == 1
    assert ("hincrby", "meshserve:r:req:0", "m", 1) in redis.ops


def test_empty_flush_sends_nothing() -> None:
    redis = FakeRedis()
    t = Telemetry(redis, TelemetryKeys("/r"), Metrics())
    assert asyncio.run(t.flush()) and redis.ops == []


def test_window_covers_the_buckets_ending_now() -> None:
    keys = TelemetryKeys("/mesh", bucket_s=10)
    assert keys.window(65_000, 30) == [6, 5, 4]
    assert keys.window(65_000, 1) == [6]
    assert keys.requests(6) == "meshserve:mesh:req:6"


def test_rollout_requests_are_counted_per_second_and_target_with_a_latency_histogram() -> None:
    from mesh import rollout

    now = [41_200]
    redis, metrics = FakeRedis(), Metrics()
    t = Telemetry(redis, TelemetryKeys("/r"), metrics, now_ms=lambda: now[0])
    t.record_rollout("vm", "cand", False, 0.004)
    t.record_rollout("vm", "cand", True, 0.004)
    now[0] = 42_100
    t.record_rollout("vm", "stable", True, 0.0001)
    assert asyncio.run(t.flush())
    b = rollout.latency_bucket(0.004)
    fields = sorted(op[1:] for op in redis.ops if op[0] == "hincrby" and ":ro:" in op[1])
    assert fields == sorted([
        ("meshserve:r:ro:vm:41", "cand|n", 2), ("meshserve:r:ro:vm:41", "cand|e", 1),
        ("meshserve:r:ro:vm:41", f"cand|l{b}", 2), ("meshserve:r:ro:vm:42", "stable|n", 1),
        ("meshserve:r:ro:vm:42", "stable|l0", 1)])
    assert ("expire", "meshserve:r:ro:vm:41", rollout.RETENTION_S) in redis.ops
    # What the placement leader reads back: parse_fields over one second's hash.
    counts = rollout.parse_fields({f.encode(): str(n).encode() for k, f, n in fields if k.endswith(":41")})
    assert counts["cand"].requests == 2 and counts["cand"].error_rate == 0.5
    assert rollout.bucket_upper_s(b - 1) < counts["cand"].quantile_s(0.99) <= rollout.bucket_upper_s(b)
