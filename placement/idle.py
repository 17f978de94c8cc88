"""Scale to zero: the leader unloads every copy of a model nobody asked for within its idle TTL.

A model's TTL is its ModelSpec.idle_unload_s, else PlacementSettings.idle_unload_s (default
0: off, the last copy stays until evicted for room); a model with min_copies ≥ 1 never goes
idle. Run by the reconcile loop (reconcile.py) at most once per telemetry read. Two steps:

1. `idle_models`, pure: the models whose last known use — router telemetry, the pods'
   earlier GetUsage answers, and the newest copy's load (a copy loaded a moment ago for a
   request telemetry has not flushed yet is not idle) — is older than their TTL, and whose
   copies are all LOADED (a load in progress is never undone);
2. the pods holding them are asked (GetUsage, fresh): a model is unloaded only when every one
   of them answered, none has a request in flight and none saw a use within the TTL. A pod
   that does not answer keeps its models: a gap in what placement knows is never idleness
   (without Redis the pods' answers are all the recency there is, and they suffice).

The unload is an Unassign intent to the decider (one fenced write per pod, with a Decision
"idle_unloaded"), counted in mesh_evictions_total{reason="idle"}. The next request for the
model is an ordinary miss (router/miss.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from mesh.kv import keys as k
from mesh.types import CopyRecord, CopyState, ModelSpec
from placement.decider import Unassign
from placement.usage import Usage

if TYPE_CHECKING:
    from placement.controller import Controller

log = logging.getLogger(__name__)

ACTION = "idle_unloaded"


def ttl_ms(spec: ModelSpec, default_s: float) -> int:
    """The model's idle TTL in ms; 0: never idle-unloaded (min_copies holds it, or TTL off)."""
    if spec.min_copies > 0:
        return 0
    return int((spec.idle_unload_s or default_s) * 1000)


def idle_models(
    specs: Mapping[str, ModelSpec],
    assigned: Mapping[str, Iterable[str]],
    copies: Mapping[str, Mapping[str, CopyRecord]],
    last_used_ms: Callable[[str], int],
    now_ms: int,
    default_s: float,
) -> list[str]:
    """Models (of `assigned`: model id -> live pods assigned it) idle past their TTL, in id
    order: every assigned pod reports a LOADED copy, and neither a recorded use nor the newest
    copy's load time falls within the TTL."""
    out = []
    for model_id, instances in sorted(assigned.items()):
        spec = specs.get(model_id)
        pods = list(instances)
        if spec is None or not pods:
            continue
        ttl = ttl_ms(spec, default_s)
        if not ttl:
            continue
        held = copies.get(model_id, {})
        records = [held.get(i) for i in pods]
        if any(c is None or c.state is not CopyState.LOADED for c in records):
            continue  # loading (or not reported yet): never undo a load in progress
        newest = max([last_used_ms(model_id), *(c.updated_unix_ms for c in records if c is not None)])
        if now_ms - newest >= ttl:
            out.append(model_id)
    return out


def still_idle(model_id: str, pods: Iterable[str], answers: Mapping[str, Mapping[str, Usage]],
               now_ms: int, ttl: int) -> bool:
    """The pods' own answers agree: each answered, nothing in flight, no use within the TTL."""
    for instance_id in pods:
        answer = answers.get(instance_id)
        if answer is None:
            return False  # no answer: not known to be idle
        used = answer.get(model_id)
        if used is not None and (used.in_flight > 0 or now_ms - used.last_used_ms < ttl):
            return False
    return True


class IdleUnloader:
    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        # Models with a TTL of their own, kept by the change hook: with the default off a pass
        # looks at those only, never at every assigned model.
        self._own = {m for m, spec in self.state.models.items() if spec.idle_unload_s > 0}
        self.state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.MODELS and len(ids) == 1:
            spec = self.state.models.get(ids[0])
            if spec is not None and spec.idle_unload_s > 0:
                self._own.add(ids[0])
            else:
                self._own.discard(ids[0])

    def _assigned(self) -> dict[str, list[str]]:
        ledger = self.ctl.ledger
        if self.ctl.settings.idle_unload_s > 0:
            models: Iterable[str] = {m for ms in self.state.assignments.values() for m in ms}
        else:
            models = self._own
        out = {}
        for model_id in models:
            live = ledger.live_copies(model_id)
            if live:
                out[model_id] = live
        return out

    async def run(self) -> int:
        """One pass (telemetry already refreshed by the caller); returns the copies unloaded."""
        default_s = self.ctl.settings.idle_unload_s
        if not default_s and not self._own:
            return 0
        assigned = self._assigned()
        now = self.ctl.clock.unix_ms()
        idle = idle_models(self.state.models, assigned, self.state.copies, self.ctl.last_used_ms, now, default_s)
        if not idle:
            return 0
        answers = await self.ctl.gather_usage(sorted({i for m in idle for i in assigned[m]}))
        now = self.ctl.clock.unix_ms()
        items: list[tuple[str, str, str]] = []
        for model_id in idle:
            spec = self.state.models.get(model_id)
            if spec is None or model_id not in self.state.models:
                continue
            ttl = ttl_ms(spec, default_s)
            pods = assigned[model_id]
            if not ttl or not still_idle(model_id, pods, answers, now, ttl):
                continue
            why = f"no request for {ttl / 1000:g}s (idle_unload_s); min_copies is 0"
            items += [(i, model_id, why) for i in pods]
        if not items or not await self.ctl.decider.unassign(Unassign(items, action=ACTION)):
            return 0
        self.ctl.metrics.evictions.labels("idle").inc(len(items))
        for instance_id, model_id, why in items:
            self.ctl.book.evicted(model_id)
            log.info("unloaded model %s from %s: %s", model_id, instance_id, why)
        return len(items)
