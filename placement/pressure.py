"""Memory pressure: what the mesh's models want against what its runtime pods offer.

The autoscaling signal (docs/OPERATIONS.md "Autoscaling runtime pods"). CPU says nothing
about a mesh whose pods are full: a miss that finds no room, or a hot model evicted to make
room for another, is the sign that more pods would help. The leader records both as they
happen (`refused`, `evicted`); a model counts as *unplaced* for `window_s` after the last
such event unless a copy of it is held again (LOADING or LOADED on a live pod) or it is
unregistered. Then

    wanted   = used (what the pods measure in use) + unplaced (bytes of those models)
    pressure = wanted / capacity (of live pods that are not draining)

Above 1 the pods are too few for what is asked of them; `wanted / (capacity / pods)` is the
number of pods that would hold it (the chart's KEDA / HPA query, helm/meshserve).

Also the Deployment-scope model counts ModelMesh publishes (managed / loaded / with failure)
and the idle-at-eviction observation (mesh_eviction_idle_seconds). Figures are read from the
metrics thread: only plain dict reads of the watched state, retried by mesh.metrics when the
event loop changed a dict meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from mesh.clock import Clock
from mesh.errors import NoCapacity
from mesh.metrics import Metrics, ModelCounts, PressureFigures
from mesh.state import MeshState
from mesh.types import CopyState
from placement import planner
from placement.tenancy import TenantCapReached

log = logging.getLogger(__name__)


class _Leading(Protocol):
    @property
    def is_leader(self) -> bool: ...


class Pressure:
    def __init__(self, state: MeshState, leader: _Leading, clock: Clock, metrics: Metrics,
                 window_s: float = 300.0, hot_s: float = 60.0) -> None:
        self.state = state
        self.leader = leader
        self.clock = clock
        self.metrics = metrics
        self.window_ms = int(window_s * 1000)
        self.hot_ms = int(hot_s * 1000)
        self._wanted: dict[str, tuple[int, int]] = {}  # model -> (unix ms of the event, bytes)

    def export(self) -> None:
        """Registers the figures on the metrics registry (computed at scrape time)."""
        self.metrics.track_pressure(self.figures)
        self.metrics.track_models(self.counts)
        self.metrics.track_tenant_memory(self.tenant_bytes)

    # -- events (event loop) --------------------------------------------------------------------

    def refused(self, model_id: str, predicted_bytes: int, exc: BaseException) -> None:
        """A placement failed: only lack of room counts (not a tenant's own memory cap, which
        more pods would not lift, nor a lost leadership)."""
        if isinstance(exc, NoCapacity) and not isinstance(exc, TenantCapReached):
            self._want(model_id, predicted_bytes)

    def evicted(self, victims: Iterable[planner.PodModel], now_ms: int) -> None:
        """Copies evicted to make room: their idle time is observed, and hot ones are wanted."""
        for victim in victims:
            idle_ms = now_ms - victim.last_used_ms if victim.last_used_ms else now_ms - victim.loaded_unix_ms
            idle_ms = max(idle_ms, 0)
            self.metrics.evicted(victim.model_id, idle_ms / 1000)
            if idle_ms < self.hot_ms:
                self._want(victim.model_id, victim.bytes)

    def evicted_from(self, pod: planner.PodView, victim_ids: Iterable[str], now_ms: int) -> None:
        """`evicted` for the victims (by id) of one pod's view."""
        ids = set(victim_ids)
        self.evicted([m for m in pod.models if m.model_id in ids], now_ms)

    def _want(self, model_id: str, nbytes: int) -> None:
        self._wanted[model_id] = (self.clock.unix_ms(), max(nbytes, 0))
        self._expire()

    def _expire(self) -> None:
        oldest = self.clock.unix_ms() - self.window_ms
        for model_id in [m for m, (at, _) in self._wanted.items() if at < oldest]:
            del self._wanted[model_id]

    # -- figures (any thread) -------------------------------------------------------------------

    def _held(self, model_id: str) -> bool:
        live = self.state.instances
        return any(inst in live and c.state in (CopyState.LOADING, CopyState.LOADED)
                   for inst, c in list(self.state.copies.get(model_id, {}).items()))

    def unplaced_bytes(self) -> int:
        if not self.leader.is_leader:
            return 0
        oldest = self.clock.unix_ms() - self.window_ms
        models = self.state.models
        return sum(nbytes for m, (at, nbytes) in list(self._wanted.items())
                   if at >= oldest and m in models and not self._held(m))

    def figures(self) -> PressureFigures:
        pods = [i for i in list(self.state.instances.values()) if not i.draining]
        return PressureFigures(
            pods=len(pods),
            capacity_bytes=sum(i.capacity_bytes for i in pods),
            used_bytes=sum(i.used_bytes for i in pods),
            unplaced_bytes=self.unplaced_bytes(),
        )

    def tenant_bytes(self) -> dict[str, int]:
        """Measured bytes of LOADED copies on live pods, per tenant (leader only)."""
        if not self.leader.is_leader:
            return {}
        live, out = self.state.instances, dict[str, int]()
        for model_id, copies in list(self.state.copies.items()):
            spec = self.state.models.get(model_id)
            held = sum(c.size_bytes for inst, c in list(copies.items())
                       if inst in live and c.state is CopyState.LOADED)
            if spec is not None and held:
                tenant = spec.tenant or "default"
                out[tenant] = out.get(tenant, 0) + held
        return out

    def counts(self) -> ModelCounts | None:
        """Published by the leader only (a standby's 0 keeps sum() right)."""
        if not self.leader.is_leader:
            return None
        live = self.state.instances
        loaded = failed = 0
        for model_id in list(self.state.models):
            states = [c.state for inst, c in list(self.state.copies.get(model_id, {}).items()) if inst in live]
            loaded += CopyState.LOADED in states
            failed += CopyState.FAILED in states
        return ModelCounts(managed=len(self.state.models), loaded=loaded, with_failure=failed)
