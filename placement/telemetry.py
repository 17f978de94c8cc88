"""Router usage telemetry read back from Redis: an `ActivitySource` for the controller.

One pipelined round trip per snapshot: HGETALL of the request buckets covering the window
(known key names, no KEYS/SCAN) and the last-use sorted set. Any failure answers None, which
placement treats as "unavailable" (it falls back to pod-reported recency and never reads a
gap as idleness); the next snapshot tries again.

Each snapshot gives two counts per model: `requests`, the requests in the window (a rate, for
copies), and `new_requests`, those counted since this reader's previous snapshot (per bucket:
a bucket's count now less the count seen in it before). The GDSF book adds the new ones up, so
its frequency is the model's use over its whole history (halved now and then by the book's
aging), not over the last minute: a windowed count reads most of a Zipf tail as one-offs
(docs/PLACEMENT.md, "Why the live mesh trailed its replay").
"""

from __future__ import annotations

import collections
import logging

from mesh.metrics import Metrics
from mesh.telemetry import TelemetryKeys
from placement.activity import ModelActivity

log = logging.getLogger(__name__)

LATE_MS = 60_000  # a last use written this long after a newer one is still read


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisActivity:
    def __init__(self, redis: object, keys: TelemetryKeys, metrics: Metrics, window_s: float = 60.0) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.keys = keys
        self.metrics = metrics
        self.window_s = window_s
        self._failing = False
        self._seen: dict[int, dict[str, int]] = {}  # bucket -> model -> count at the last snapshot
        self._last: dict[str, int] = {}  # model -> last use, as read so far
        self._newest = 0  # the newest last use read so far (unix ms)
        self._quiet: dict[str, ModelActivity] = {}  # models with no request in the window
        self._quiet_window = 0.0
        self._active: set[str] = set()  # models with requests in the window at the last snapshot

    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        buckets = self.keys.window(now_ms, self.window_s)
        pipe = self.redis.pipeline(transaction=False)  # type: ignore[attr-defined]
        for bucket in buckets:
            pipe.hgetall(self.keys.requests(bucket))
        # Only the last uses that moved since the previous read (ZADD GT only moves a score
        # forward), less LATE_MS for a router that flushed late: reading the whole set on every
        # reconcile pass cost placement a quarter of its CPU with 10,000 models (bench/fleet.py).
        low = max(0, self._newest - LATE_MS) if self._last else "-inf"
        pipe.zrangebyscore(self.keys.last(), low, "+inf", withscores=True)
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
        new: collections.Counter[str] = collections.Counter()
        seen: dict[int, dict[str, int]] = {}
        for bucket, h in zip(buckets, hashes, strict=True):
            before, now_seen = self._seen.get(bucket, {}), seen.setdefault(bucket, {})
            for raw, n in (h or {}).items():
                try:
                    model_id, count = _text(raw), int(n)
                except ValueError:
                    continue
                counts[model_id] += count
                now_seen[model_id] = count
                new[model_id] += max(0, count - before.get(model_id, 0))
        self._seen = seen  # buckets older than the window are forgotten (their late flushes too)
        moved = set(counts) | self._active  # also those that just left the window
        for raw, score in last or []:
            model_id = _text(raw)
            moved.add(model_id)
            self._last[model_id] = max(self._last.get(model_id, 0), int(score))
            self._newest = max(self._newest, int(score))
        last_used = self._last
        window = len(buckets) * self.keys.bucket_s
        if window != self._quiet_window:
            self._quiet, self._quiet_window, moved = {}, window, set(counts) | set(last_used)
        # Models without requests in the window keep their record from the previous snapshot
        # unless their last use moved: rebuilding all of them on every reconcile pass was a
        # third of placement's CPU with 10,000 models (bench/fleet.py).
        for m in moved:
            if m in counts or m not in last_used:  # (a use too late to be read: counted only)
                self._quiet.pop(m, None)
            else:
                self._quiet[m] = ModelActivity(m, last_used_ms=last_used.get(m, 0), requests=0, window_s=window)
        self._active = set(counts)
        out = dict(self._quiet)
        for m in counts:
            out[m] = ModelActivity(m, last_used_ms=last_used.get(m, 0), requests=counts[m], window_s=window,
                                   new_requests=new.get(m, 0))
        return out

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]
