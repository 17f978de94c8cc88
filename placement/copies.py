"""Proactive placement, run by the reconcile loop: copies added or dropped before any miss.

Three jobs, at most `settings.max_actions_per_pass` actions per pass (no reload storm):
- a dead pod's RECENTLY USED models (within `replace_window_s`) that have no other live copy
  are re-placed at once, most recently used first, and only where they fit without evicting
  anything ("replaced"); those the per-pass limit leaves over are re-placed in later passes;
- a model registered with min_copies keeps that many copies, idle or not ("copy_added");
- with router telemetry, a model whose request rate per copy exceeds `copy_rate_per_s` gets
  another copy on another pod with free room, up to max_copies ("copy_added"); below half
  that rate a copy is dropped, never the last LOADED one, never below min_copies, never one loaded
  less than `min_residency_s` ago ("copy_dropped").
Every action is one fenced write: the assignment and its Decision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh import types
from mesh.errors import NoCapacity, Unavailable
from mesh.kv.etcd import delete_op, put_op
from placement import planner
from placement.controller import Controller

log = logging.getLogger(__name__)


VIEW_WAIT_S = 5.0  # bound on waiting for the pass's own write to reach the view


class Proactive:
    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        self.pending: list[str] = []  # dead pods' models not re-placed yet (budget ran out)

    def live_copies(self, model_id: str) -> list[str]:
        return sorted(i for i in self.state.assigned_instances(model_id) if i in self.state.instances)

    def _should_replace(self, model_id: str, now_ms: int, window_ms: int) -> bool:
        return (model_id in self.state.models and not self.live_copies(model_id)
                and now_ms - self.ctl.last_used_ms(model_id) <= window_ms)

    def recently_used_on_dead_pods(self, dead: dict[str, list[str]]) -> list[str]:
        """Models on dead pods, used within the window, with no live copy: most recent first."""
        window_ms = int(self.ctl.settings.replace_window_s * 1000)
        if not window_ms:
            return []
        now = self.ctl.clock.unix_ms()
        out = {m: self.ctl.last_used_ms(m) for models in dead.values() for m in models
               if self._should_replace(m, now, window_ms)}
        return sorted(out, key=lambda m: (-out[m], m))

    def _replacements(self, replace: list[str]) -> list[str]:
        """This pass's re-placements and the ones earlier passes had no budget for, still due."""
        window_ms = int(self.ctl.settings.replace_window_s * 1000)
        now = self.ctl.clock.unix_ms()
        due = {m for m in [*replace, *self.pending] if self._should_replace(m, now, window_ms)}
        return sorted(due, key=lambda m: (-self.ctl.last_used_ms(m), m))

    async def run(self, replace: list[str]) -> int:
        """One pass (telemetry already refreshed by the caller); returns the actions taken.

        After each write the pass waits until the view shows it: etcd's watch lags the write,
        and planning the next action on a view without it would double-book a pod's free room
        or count a copy twice."""
        budget = self.ctl.settings.max_actions_per_pass
        done = 0
        queue = self._replacements(replace)
        self.pending = []
        for n, model_id in enumerate(queue):
            if done >= budget:
                self.pending = queue[n:]
                return done
            done += await self._add(model_id, "replaced", "its pod died and it was used recently", evict=False)
        for model_id, spec in sorted(self.state.models.items()):
            if done >= budget:
                break
            have = len(self.live_copies(model_id))
            if have < spec.min_copies:
                done += await self._add(model_id, "copy_added",
                                        f"min_copies is {spec.min_copies}, {have} live", evict=True)
                continue
            done += await self._scale(model_id, spec, have)
        return done

    async def _scale(self, model_id: str, spec: types.ModelSpec, have: int) -> int:
        s = self.ctl.settings
        act = (self.ctl.last_activity or {}).get(model_id)
        if not s.copy_rate_per_s or act is None or have == 0:
            return 0  # telemetry unavailable or scaling off: a gap is not idleness
        most = spec.max_copies or s.max_copies
        rate = act.rate_per_s
        if rate / have > s.copy_rate_per_s and have < most:
            return await self._add(model_id, "copy_added", f"{rate:.2f} req/s over {have} copies exceeds "
                                   f"{s.copy_rate_per_s:g} per copy", evict=False)
        if have > max(1, spec.min_copies) and rate / (have - 1) < s.copy_rate_per_s / 2:
            return await self._drop(model_id, f"cooled to {rate:.2f} req/s; {have - 1} copies suffice")
        return 0

    async def _add(self, model_id: str, action: str, why: str, evict: bool) -> int:
        spec = self.state.models.get(model_id)
        if spec is None:
            return 0
        stats = self.state.stats.get(model_id)
        predicted = (stats.size_bytes if stats else 0) or self.ctl.settings.default_model_bytes
        try:
            plan = planner.plan(model_id, predicted, self.ctl.pod_views(), now_ms=self.ctl.clock.unix_ms(),
                                rules=self.ctl.rules, evict=evict, frequency=self.ctl.book.frequency(model_id))
        except (NoCapacity, Unavailable) as exc:
            log.info("no %s for model %s: %s", action, model_id, exc)
            return 0
        keys = self.state.keys
        ops = [delete_op(keys.assignment(plan.instance_id, v)) for v in plan.victims]
        for victim, reason in zip(plan.victims, plan.victim_reasons, strict=False):
            ops.append(self.ctl.decision_op(victim, "evicted", plan.instance_id, reason))
        assignment = self.ctl.assignment_for(spec, plan.instance_id, predicted)
        ops.append(put_op(keys.assignment(plan.instance_id, model_id), types.encode(assignment)))
        ops.append(self.ctl.decision_op(model_id, action, plan.instance_id, f"{why}; {plan.reason}"))
        if not await self.ctl.leader.write(ops):
            return 0
        await self._seen(lambda: model_id in self.state.assignments.get(plan.instance_id, {}), plan.instance_id)
        for victim in plan.victims:
            self.ctl.book.evicted(victim)
        self.ctl.metrics.evictions.labels("capacity").inc(len(plan.victims))
        return 1

    async def _drop(self, model_id: str, why: str) -> int:
        now = self.ctl.clock.unix_ms()
        guard = int(self.ctl.settings.min_residency_s * 1000)
        loaded = []
        for instance_id in self.live_copies(model_id):
            copy = self.state.copies.get(model_id, {}).get(instance_id)
            if copy is not None and copy.state is types.CopyState.LOADED:
                loaded.append((copy.updated_unix_ms, instance_id))
        # Never the last READY copy: a copy still loading does not serve yet.
        candidates = [c for c in loaded if now - c[0] >= guard]
        if len(loaded) < 2 or not candidates:
            return 0
        _, instance_id = max(candidates)  # the newest copy goes: the older ones are warm
        ops = [delete_op(self.state.keys.assignment(instance_id, model_id)),
               self.ctl.decision_op(model_id, "copy_dropped", instance_id, why)]
        if not await self.ctl.leader.write(ops):
            return 0
        await self._seen(lambda: model_id not in self.state.assignments.get(instance_id, {}), instance_id)
        self.ctl.metrics.evictions.labels("cooled").inc()
        return 1

    async def _seen(self, written: Callable[[], bool], instance_id: str) -> None:
        """Waits (bounded) until the view shows this pass's write, or the pod is gone."""
        try:
            await self.state.wait_for(lambda: written() or instance_id not in self.state.instances, VIEW_WAIT_S)
        except TimeoutError:
            log.warning("placement's own write on %s not seen after %.0fs; the next pass re-reads",
                        instance_id, VIEW_WAIT_S)
