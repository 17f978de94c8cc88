"""The telemetry reader's snapshots reuse the records of models without requests in the window
and still equal a snapshot rebuilt in full.

Regression (issue 8, fleet run): every snapshot rebuilt a ModelActivity for every model ever
used (10,000 in bench/fleet.py), on every reconcile pass — a third of placement's CPU at 5,000
resident copies. Now only models with requests in the window, those that just left it and
those whose last use moved are rebuilt; this checks over random uses and reads (buckets
leaving the window, late last uses) that the result equals a full rebuild.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.metrics import Metrics
from mesh.telemetry import TelemetryKeys
from placement.telemetry import RedisActivity
from tests.unit.placement.test_activity_history import T0, FakeRedis

step = st.one_of(
    # a use up to 3 s before the clock (a late flush) or after it (before the next read)
    st.tuples(st.just("use"), st.sampled_from(["a", "b", "c", "d"]), st.integers(-3_000, 70_000), st.integers(1, 3)),
    st.tuples(st.just("read"), st.integers(0, 70_000)),
)


async def _run(steps: list[tuple]) -> None:
    keys = TelemetryKeys("/t", bucket_s=10)
    redis = FakeRedis(keys)
    cached = RedisActivity(redis, keys, Metrics(), window_s=30)
    full = RedisActivity(redis, keys, Metrics(), window_s=30)
    now = T0
    for s in steps:
        if s[0] == "use":
            redis.use(s[1], now + s[2], s[3])
        else:
            now += s[1]
            full._quiet_window = 0.0  # forces the full rebuild (the code before the cache)
            got, want = await cached.snapshot(now), await full.snapshot(now)
            assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=30))
def test_cached_snapshots_equal_full_ones(steps: list[tuple]) -> None:
    asyncio.run(_run(steps))
