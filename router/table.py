"""The route table: ready copies per model, kept current from MeshState's change hooks.

A copy is ready when it is LOADED and its pod's instance record (leased) exists. The table is
recomputed per model on each change, so a request's lookup is one dict read. In-flight counts
per pod address live here too, so the policy sees every request this router has running,
with each address's recent attempt latency: a copy at the router's per-pod cap
(`max_in_flight_per_pod`) is not picked, and when every ready copy is at it the request is shed
here, on the router's own event loop, with RESOURCE_EXHAUSTED and a retry hint (`shed`).
Shedding at the router is early and cheap; an overloaded pod sheds late, since requests wait in
its saturated event loop before its admission control sees them (F21).
Waiters use MeshState.wait_for: hooks run before the view wakes them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

from mesh.errors import Overloaded
from mesh.kv import keys as k
from mesh.metrics import Metrics
from mesh.rpc.status import pushback_ms
from mesh.state import MeshState
from mesh.types import CopyRecord


class RouteTable:
    def __init__(self, state: MeshState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics
        self.synced = False
        self.in_flight: dict[str, int] = {}
        self.latency_s: dict[str, float] = {}  # address -> EWMA of its attempts' durations
        self._shed = metrics.shed.labels(metrics.service, "pod_cap")
        self._ready: dict[str, tuple[CopyRecord, ...]] = {}
        self._models_on: dict[str, set[str]] = {}  # instance -> models with a copy record there
        state.on_change(self._on_change)

    # -- reading ------------------------------------------------------------------------------

    def ready(self, model_id: str) -> tuple[CopyRecord, ...]:
        return self._ready.get(model_id, ())

    def addresses(self, model_id: str) -> list[str]:
        return [c.address for c in self._ready.get(model_id, ())]

    def routes(self) -> dict[str, tuple[CopyRecord, ...]]:
        """model id -> its ready copies, every routed model (read-only; Envoy's endpoints)."""
        return self._ready

    def ready_models(self) -> int:
        return len(self._ready)

    def live_addresses(self) -> set[str]:
        return {inst.address for inst in self.state.instances.values()}

    @contextlib.contextmanager
    def track(self, address: str) -> Iterator[None]:
        """Counts one in-flight request to `address` for the duration of the block."""
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        start = time.perf_counter()
        try:
            yield
        finally:
            left = self.in_flight[address] - 1
            if left:
                self.in_flight[address] = left
            else:
                del self.in_flight[address]
            seconds = time.perf_counter() - start
            old = self.latency_s.get(address)
            self.latency_s[address] = seconds if old is None else old + 0.1 * (seconds - old)

    def with_room(self, addresses: Sequence[str], cap: int) -> list[str]:
        """`addresses` with fewer than `cap` requests of this router in flight."""
        in_flight = self.in_flight
        return [a for a in addresses if in_flight.get(a, 0) < cap]

    def shed(self, model_id: str, addresses: Sequence[str], cap: int) -> Overloaded:
        """The shed of a request whose every copy (`addresses`) is at `cap`: the hint is the
        recent latency of the fastest one (about when one of its requests finishes)."""
        self._shed.inc()
        ms = pushback_ms(min((self.latency_s.get(a, 0.0) for a in addresses), default=0.0))
        return Overloaded(
            f"model '{model_id}': each of its {len(addresses)} ready copies has {cap} requests in flight "
            f"from this router, its limit per pod (MESH_ROUTER_MAX_IN_FLIGHT_PER_POD); retry after {ms} ms, "
            "or give the model more copies", ms,
        )

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
            if ids[0] not in self.state.instances and self.latency_s:
                live = self.live_addresses()  # a pod went: its latency estimate with it
                self.latency_s = {a: v for a, v in self.latency_s.items() if a in live}
        else:
            return
        self.metrics.routes.set(len(self._ready))

    def _refresh(self, model_id: str) -> None:
        copies = tuple(self.state.ready_copies(model_id))
        if copies:
            self._ready[model_id] = copies
        else:
            self._ready.pop(model_id, None)
