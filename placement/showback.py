"""Showback (FinOps): memory byte-seconds per model, written hourly to Redis by the leader.

Every `interval_s` the leader adds, for each LOADED copy on a live pod, its measured size x
the seconds since its previous tick to the hour's hash (mesh/telemetry.py: `<ns>:use:<hour>`,
field `m|<model id>`); routers add the hour's requests beside it. `mesh usage` sums them.

Accuracy (docs/OPERATIONS.md "Usage report"): a copy is counted by its state at each tick,
so a load or unload is off by at most one interval x its size; sizes are the pods'
measurements (puller/footprint.py), not requests or limits; a tick's whole interval goes to
the hour it ends in; after a leader change the new leader counts from its first tick (the
failover and at most one interval go uncounted); a write Redis refuses is dropped (logged).
A paused ex-leader cannot double-count: it checks leadership before each write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mesh.clock import Clock
from mesh.state import MeshState
from mesh.telemetry import MEMORY_FIELD, USAGE_RETENTION_S, TelemetryKeys
from mesh.types import CopyState

log = logging.getLogger(__name__)


class _Leading(Protocol):
    @property
    def is_leader(self) -> bool: ...


def held_bytes(state: MeshState) -> dict[str, int]:
    """Measured bytes of each model's LOADED copies on live pods."""
    out: dict[str, int] = {}
    for model_id, copies in state.copies.items():
        held = sum(c.size_bytes for inst, c in copies.items() if inst in state.instances and c.state is CopyState.LOADED)
        if held:
            out[model_id] = held
    return out


class Showback:
    def __init__(self, redis: object, keys: TelemetryKeys, state: MeshState, leader: _Leading, clock: Clock,
                 interval_s: float = 15.0, retention_s: int = USAGE_RETENTION_S) -> None:
        self.redis = redis  # redis.asyncio.Redis
        self.keys = keys
        self.state = state
        self.leader = leader
        self.clock = clock
        self.interval_s = interval_s
        self.retention_s = retention_s
        self._last_ms: int | None = None
        self._failing = False

    async def tick(self) -> int:
        """Adds the byte-seconds since the previous tick; returns how many models it wrote."""
        now = self.clock.unix_ms()
        if not self.leader.is_leader:
            self._last_ms = None
            return 0
        last, self._last_ms = self._last_ms, now
        if last is None:
            return 0  # leading since this tick: count from here
        # A stalled loop does not bill a long gap to what is loaded now.
        elapsed_ms = min(now - last, int(self.interval_s * 2000))
        held = held_bytes(self.state)
        if not held or elapsed_ms <= 0:
            return 0
        key = self.keys.usage(now // 3_600_000)
        pipe = self.redis.pipeline(transaction=False)  # type: ignore[attr-defined]
        for model_id, nbytes in sorted(held.items()):
            pipe.hincrby(key, MEMORY_FIELD + model_id, nbytes * elapsed_ms // 1000)
        pipe.expire(key, self.retention_s)
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - showback is best effort: this interval is lost
            if not self._failing:
                log.warning("usage showback: Redis write failed, memory-seconds dropped until it "
                            "answers (MESH_REDIS_URL): %s", exc)
            self._failing = True
            return 0
        finally:
            await pipe.reset()
        self._failing = False
        return len(held)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.tick()
