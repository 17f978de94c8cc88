"""GDSF frequencies count a model's whole history, not telemetry's window.

Regression (issue 8, density figures): controller.refresh_activity SET each model's book
frequency to its request count in the 60 s telemetry window, and probation judged by that
count too. In the density benchmark the window holds ~1,500 requests, so most of a Zipf tail's
established models read as one-offs (count <= 1) and their values were re-based on a minute's
count: the live mesh trailed its own offline replay (bench/livesim.py quantifies it). Now the
reader reports the requests new since its previous snapshot (per bucket) and the book adds
them up, as the offline replay's book does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mesh.clock import FakeClock
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.telemetry import TelemetryKeys
from placement.activity import ModelActivity
from placement.controller import Controller
from placement.telemetry import RedisActivity
from tests.unit.placement.fakes import FakeUsage, StoreWorld

T0 = 1_700_000_000_000


class FakePipe:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.calls: list[tuple[str, str]] = []

    def hgetall(self, key: str) -> None:
        self.calls.append(("hgetall", key))

    def zrangebyscore(self, key: str, low: object, high: object, withscores: bool = False) -> None:
        self.calls.append(("zrange", key))
        self.low = float(low) if low != "-inf" else float("-inf")

    async def execute(self) -> list[object]:
        out: list[object] = []
        for op, key in self.calls:
            if op == "hgetall":
                out.append({m.encode(): str(n).encode() for m, n in self.redis.hashes.get(key, {}).items()})
            else:
                out.append([(m.encode(), float(t)) for m, t in self.redis.last.items() if t >= self.low])
        return out

    async def reset(self) -> None:
        self.calls = []


class FakeRedis:
    """The two reads RedisActivity makes: request-bucket hashes and the last-use set."""

    def __init__(self, keys: TelemetryKeys) -> None:
        self.keys = keys
        self.hashes: dict[str, dict[str, int]] = {}
        self.last: dict[str, int] = {}

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)

    def use(self, model_id: str, at_ms: int, n: int = 1) -> None:
        bucket = self.keys.requests(self.keys.bucket(at_ms))
        self.hashes.setdefault(bucket, {}).setdefault(model_id, 0)
        self.hashes[bucket][model_id] += n
        self.last[model_id] = max(self.last.get(model_id, 0), at_ms)


async def test_reader_reports_new_requests_per_bucket() -> None:
    keys = TelemetryKeys("/t", bucket_s=10)
    redis = FakeRedis(keys)
    reader = RedisActivity(redis, keys, Metrics(), window_s=30)
    redis.use("a", T0, 5)
    snap = await reader.snapshot(T0)
    assert snap is not None and (snap["a"].requests, snap["a"].new_requests) == (5, 5)
    redis.use("a", T0 + 1, 2)  # the same bucket grows: only the growth is new
    snap = await reader.snapshot(T0 + 2)
    assert snap is not None and (snap["a"].requests, snap["a"].new_requests) == (7, 2)
    snap = await reader.snapshot(T0 + 3)  # nothing since
    assert snap is not None and snap["a"].new_requests == 0
    # 40 s later the first bucket has left the window; one request in a new bucket is new.
    redis.use("a", T0 + 40_000)
    snap = await reader.snapshot(T0 + 40_000)
    assert snap is not None and (snap["a"].requests, snap["a"].new_requests) == (1, 1)
    # Last uses are read incrementally (only scores that moved); an older one is still known.
    redis.use("b", T0 + 41_000)
    redis.last["a"] = T0 + 40_000
    snap = await reader.snapshot(T0 + 41_000)
    assert snap is not None and snap["a"].last_used_ms == T0 + 40_000 and snap["b"].last_used_ms == T0 + 41_000
    redis.use("c", T0 + 300_000)
    await reader.snapshot(T0 + 300_000)
    redis.last.pop("a")  # not read again (older than the newest less LATE_MS), still remembered
    snap = await reader.snapshot(T0 + 300_001)
    assert snap is not None and snap["a"].last_used_ms == T0 + 40_000


class Source:
    def __init__(self) -> None:
        self.snap: dict[str, ModelActivity] = {}

    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        return self.snap


@pytest.fixture
async def world() -> AsyncIterator[StoreWorld]:
    w = StoreWorld()
    yield w
    await w.close()


async def test_book_adds_up_uses_beyond_the_window(world: StoreWorld) -> None:
    """A model used 10 times, then once a minute later (its window count: 1), has been used 11
    times: not a one-off on probation, and valued at 11 uses."""
    world.model("hot", size=100)
    await world.start()
    source = Source()
    ctl = Controller(world.state, world.leader, PlacementSettings(), Metrics(), FakeUsage(),
                     clock=FakeClock(), activity=source)
    try:
        source.snap = {"hot": ModelActivity("hot", last_used_ms=T0, requests=10, new_requests=10)}
        await ctl.refresh_activity()
        value_10 = ctl.book.value("hot")
        source.snap = {"hot": ModelActivity("hot", last_used_ms=T0 + 70_000, requests=1, new_requests=1)}
        await ctl.refresh_activity()
        assert ctl.frequency("hot") == 11
        assert ctl.frequency("hot") > ctl.rules.probation_hits
        assert ctl.book.value("hot") > value_10
        # A read with no new use (last use unchanged) changes nothing.
        await ctl.refresh_activity()
        assert ctl.frequency("hot") == 11
    finally:
        await ctl.close()
