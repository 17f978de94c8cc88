"""Router usage telemetry read back from Redis: an `ActivitySource` for the controller.

One pipelined round trip per snapshot: HGETALL of the request buckets covering the window
(known key names, no KEYS/SCAN) and the last-use sorted set. Any failure answers None, which
placement treats as "unavailable" (it falls back to pod-reported recency and never reads a
gap as idleness); the next snapshot tries again.
"""

from __future__ import annotations

import collections
import logging

from mesh.metrics import Metrics
from mesh.telemetry import TelemetryKeys
from placement.activity import ModelActivity

log = logging.getLogger(__name__)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisActivity:
    def __init__(self, redis: object, keys: TelemetryKeys, metrics: Metrics, window_s: float = 60.0) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.keys = keys
        self.metrics = metrics
        self.window_s = window_s
        self._failing = False

    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        buckets = self.keys.window(now_ms, self.window_s)
        pipe = self.redis.pipeline(transaction=False)  # type: ignore[attr-defined]
        for bucket in buckets:
            pipe.hgetall(self.keys.requests(bucket))
        pipe.zrange(self.keys.last(), 0, -1, withscores=True)
        try:
            *hashes, last = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
            self.metrics.telemetry_reads.labels("unavailable").inc()
            if not self._failing:
                log.warning("usage telemetry unreadable (MESH_REDIS_URL); using pod-reported "
                            "recency: %s", exc)
            self._failing = True
            return None
        finally:
            await pipe.reset()
        self._failing = False
        self.metrics.telemetry_reads.labels("ok").inc()
        counts: collections.Counter[str] = collections.Counter()
        for h in hashes:
            for model_id, n in (h or {}).items():
                try:
                    counts[_text(model_id)] += int(n)
                except ValueError:
                    continue
        last_used = {_text(m): int(score) for m, score in (last or [])}
        window = len(buckets) * self.keys.bucket_s
        return {
            m: ModelActivity(m, last_used_ms=last_used.get(m, 0), requests=counts.get(m, 0), window_s=window)
            for m in set(counts) | set(last_used)
        }

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]
