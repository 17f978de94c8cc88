"""The route table: ready copies per model, kept current from MeshState's change hooks.

A copy is ready when it is LOADED and its pod's instance record (leased) exists. The table is
recomputed per model on each change, so a request's lookup is one dict read. In-flight counts
per pod address live here too, so the policy sees every request this router has running.
Waiters use MeshState.wait_for: hooks run before the view wakes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mesh.kv import keys as k
from mesh.metrics import Metrics
from mesh.state import MeshState
from mesh.types import CopyRecord


class RouteTable:
    def __init__(self, state: MeshState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self.synced = False
        self.in_flight: dict[str, int] = {}
        self._ready: dict[str, tuple[CopyRecord, ...]] = {}
        self._models_on: dict[str, set[str]] = {}  # instance -> models with a copy record there
        state.on_change(self._on_change)

    # -- reading ------------------------------------------------------------------------------

    def ready(self, model_id: str) -> tuple[CopyRecord, ...]:
        return self._ready.get(model_id, ())

    def addresses(self, model_id: str) -> list[str]:
        return [c.address for c in self._ready.get(model_id, ())]

    def ready_models(self) -> int:
        return len(self._ready)

    def live_addresses(self) -> set[str]:
        return {inst.address for inst in self.state.instances.values()}

    @contextlib.contextmanager
    def track(self, address: str) -> Iterator[None]:
        """Counts one in-flight request to `address` for the duration of the block."""
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        try:
            yield
        finally:
            left = self.in_flight[address] - 1
            if left:
                self.in_flight[address] = left
            else:
                del self.in_flight[address]

    async def track_sync(self) -> None:
        """Marks the table synced once the view has listed etcd (run under a Supervisor)."""
        await self.state.view.wait_synced()
        self.synced = True

    # -- updating -----------------------------------------------------------------------------

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.COPIES and len(ids) == 2:
            model_id, instance_id = ids
            models = self._models_on.setdefault(instance_id, set())
            if instance_id in self.state.copies.get(model_id, {}):
                models.add(model_id)
            else:
                models.discard(model_id)
                if not models:
                    del self._models_on[instance_id]
            self._refresh(model_id)
        elif section == k.INSTANCES and len(ids) == 1:
            for model_id in list(self._models_on.get(ids[0], ())):
                self._refresh(model_id)
        else:
            return
        self.metrics.routes.set(len(self._ready))

    def _refresh(self, model_id: str) -> None:
        copies = tuple(self.state.ready_copies(model_id))
        if copies:
            self._ready[model_id] = copies
        else:
            self._ready.pop(model_id, None)
