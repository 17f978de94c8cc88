"""Per-model activity as the routers saw it (request counts, last use), read from telemetry.

The contract between the telemetry reader (Redis, placement/telemetry.py) and the policy
(placement/planner.py via controller.py). A source answers None when telemetry is unavailable
(Redis down): placement then falls back to pod-reported recency and must not treat the gap
as idleness.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class ModelActivity:
    model_id: str
    last_used_ms: int = 0  # last request any router saw, unix ms (0: never)
    requests: int = 0  # requests in the recent window
    window_s: float = 60.0  # length of that window
    new_requests: int = 0  # requests counted since the source's previous snapshot (the book adds them up)

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0


class ActivitySource(Protocol):
    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        """model id -> activity over the recent window ending at `now_ms`; None when the
        telemetry store cannot be read (fall back, do not assume idleness)."""
        ...


class NoActivity:
    """Telemetry turned off: always 'unavailable', so placement uses pod-reported recency."""

    async def snapshot(self, now_ms: int) -> dict[str, ModelActivity] | None:
        return None
