"""The models this pod serves right now, with per-model usage (in-flight, requests, last use).

Written by the agent (load / unload), read by the V2 servicer and GetUsage. Event-loop only.
"""

from __future__ import annotations

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

    def begin(self) -> None:
        self.in_flight += 1
        self.requests += 1

    def end(self, now_ms: int) -> None:
        self.in_flight -= 1
        self.last_used_unix_ms = now_ms


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

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models
