"""The models this pod serves right now, with per-model usage (in-flight, requests, last use).

Written by the agent (load / unload), read by the V2 servicer and GetUsage. Event-loop only.
An unload removes a model from the table (no new requests) and then waits on `wait_idle`,
which is woken by the `end` that brings in-flight requests to 0 (no polling).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from puller.executor import LoadedModel

if TYPE_CHECKING:
    from puller.batching import Batcher


@dataclasses.dataclass(eq=False)
class Served:
    model: LoadedModel
    artifact_key: str
    last_used_unix_ms: int  # the load time until the first request
    in_flight: int = 0
    requests: int = 0
    batcher: Batcher | None = None  # dynamic batching, when the model's spec asked for it
    # Set while nothing is in flight; cleared by begin, set again by the end that reaches 0.
    _idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        if self.in_flight <= 0:
            self._idle.set()

    def begin(self) -> None:
        self.in_flight += 1
        self.requests += 1
        self._idle.clear()

    def end(self, now_ms: int) -> None:
        self.in_flight -= 1
        self.last_used_unix_ms = now_ms
        if self.in_flight <= 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request is in flight, at most `timeout_s`; True when none is."""
        if self.in_flight > 0:
            try:
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await self._idle.wait()
            except TimeoutError:
                pass
        return self.in_flight <= 0


class ModelTable:
    def __init__(self) -> None:
        self._models: dict[str, Served] = {}

    def get(self, model_id: str) -> Served | None:
        return self._models.get(model_id)

    def add(self, served: Served) -> None:
        self._models[served.model.model_id] = served

    def remove(self, model_id: str) -> Served | None:
        return self._models.pop(model_id, None)

    def ids(self) -> list[str]:
        return sorted(self._models)

    def items(self) -> list[tuple[str, Served]]:
        return sorted(self._models.items())

    def used_bytes(self) -> int:
        return sum(s.model.size_bytes for s in self._models.values())

    def lru_unix_ms(self) -> int:
        """Last use of the least recently used model (0 with none): modelmesh_instance_lru_*."""
        return min((s.last_used_unix_ms for s in list(self._models.values())), default=0)

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models
