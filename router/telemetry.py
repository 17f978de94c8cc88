"""Usage telemetry written by a router: per-model request counts and last-use times, batched
in memory and flushed to Redis about once a second by one supervised loop.

`record` is the only part on the request path: two dict updates, no I/O, never raises; so is
`record_rollout`, for a request through a vmodel whose rollout runs (mesh/rollout.py: per
second and target, requests, errors and a latency histogram, judged by the placement leader). A
flush that fails (Redis down, slow, refusing) drops its samples and counts them
(`mesh_telemetry_samples_total{result="dropped"}`); the next flush tries again, so telemetry
resumes by itself when Redis is back. Memory stays bounded while Redis is down: each flush
takes everything recorded since the last one, written or not.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from mesh import rollout
from mesh.metrics import Metrics
from mesh.telemetry import LAST_TTL_S, REQUESTS_FIELD, USAGE_RETENTION_S, TelemetryKeys

log = logging.getLogger(__name__)


class Telemetry:
    def __init__(
        self,
        redis: object,  # redis.asyncio.Redis (or a fake with .pipeline(transaction=False))
        keys: TelemetryKeys,
        metrics: Metrics,
        flush_s: float = 1.0,
        retention_s: int = 600,
        now_ms: Callable[[], int] | None = None,
        usage_retention_s: int = USAGE_RETENTION_S,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.flush_s = flush_s
        self.retention_s = retention_s
        self.usage_retention_s = usage_retention_s
        self.now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._counts: collections.Counter[tuple[int, str]] = collections.Counter()
        self._last: dict[str, int] = {}
        self._rollout: collections.Counter[tuple[str, int, str]] = collections.Counter()  # (vmodel, second, field)
        self._failing = False

    def record(self, model_id: str) -> None:
        """One request for `model_id`: O(1), in memory only."""
        now = self.now_ms()
        self._counts[(self.keys.bucket(now), model_id)] += 1
        self._last[model_id] = now

    def record_rollout(self, vmodel: str, model_id: str, ok: bool, seconds: float) -> None:
        """A request through `vmodel` (a rollout running) answered by `model_id` (internal ids)."""
        second = self.now_ms() // 1000
        self._rollout[(vmodel, second, f"{model_id}|n")] += 1
        if not ok:
            self._rollout[(vmodel, second, f"{model_id}|e")] += 1
        self._rollout[(vmodel, second, f"{model_id}|l{rollout.latency_bucket(seconds)}")] += 1

    def pending(self) -> int:
        return sum(self._counts.values())

    async def flush(self) -> bool:
        """Writes what was recorded since the last flush in one pipelined round trip; returns
        False when it was dropped."""
        counts, last, rollouts = self._counts, self._last, self._rollout
        if not counts and not last and not rollouts:
            return True
        self._counts, self._last, self._rollout = collections.Counter(), {}, collections.Counter()
        samples = sum(counts.values())
        pipe = self.redis.pipeline(transaction=False)  # type: ignore[attr-defined]
        for (vmodel, second, field), n in sorted(rollouts.items()):
            pipe.hincrby(self.keys.rollout(vmodel, second), field, n)
        for vmodel, second in sorted({(v, s) for v, s, _ in rollouts}):
            pipe.expire(self.keys.rollout(vmodel, second), rollout.RETENTION_S)
        for bucket in sorted({b for b, _ in counts}):
            key = self.keys.requests(bucket)
            for (b, model_id), n in counts.items():
                if b == bucket:
                    pipe.hincrby(key, model_id, n)
            # Expire relative to the bucket's end, so a late flush cannot keep it forever.
            pipe.expire(key, self.retention_s + self.keys.bucket_s)
        hours: collections.Counter[tuple[int, str]] = collections.Counter()
        for (b, model_id), n in counts.items():
            hours[(self.keys.hour_of_bucket(b), model_id)] += n
        for (hour, model_id), n in sorted(hours.items()):  # the showback's hourly counts (`mesh usage`)
            pipe.hincrby(self.keys.usage(hour), REQUESTS_FIELD + model_id, n)
        for hour in sorted({h for h, _ in hours}):
            pipe.expire(self.keys.usage(hour), self.usage_retention_s)
        if last:
            pipe.zadd(self.keys.last(), last, gt=True)
            pipe.expire(self.keys.last(), LAST_TTL_S)
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - whatever failed, these samples are dropped
            self.metrics.telemetry_samples.labels("dropped").inc(samples)
            if not self._failing:
                log.warning("usage telemetry: Redis write failed, dropping samples until it "
                            "answers again (MESH_REDIS_URL): %s", exc)
            self._failing = True
            return False
        finally:
            await _reset(pipe)
        self.metrics.telemetry_samples.labels("written").inc(samples)
        if self._failing:
            log.info("usage telemetry: Redis answers again")
        self._failing = False
        return True

    async def run(self) -> None:
        """The flush loop (run under the router's Supervisor); flushes once more on cancel."""
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                await self.flush()
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(self.flush(), 1.0)
            except Exception:  # noqa: BLE001 - shutting down: the samples are lost either way
                pass
            raise


async def _reset(pipe: object) -> None:
    reset = getattr(pipe, "reset", None)
    if reset is not None:
        result = reset()
        if asyncio.iscoroutine(result):
            await result
