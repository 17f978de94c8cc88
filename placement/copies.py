"""Proactive placement, run by the reconcile loop: copies added or dropped before any miss.

Four jobs, at most `settings.max_actions_per_pass` loads or drops per pass (no reload storm):
- a DRAINING pod (InstanceRecord.draining, set on SIGTERM) is never a candidate; each model
  assigned to it that was used within `replace_window_s` (telemetry or the pod's own recency)
  or has min_copies first gets a copy on another pod (evicting if need be, "copy_added"), and
  the draining pod's assignment goes once another LOADED copy exists ("drained"); a model
  not used recently loses it at once. The pod stops when its assignments are all gone;
- a dead pod's RECENTLY USED models (within `replace_window_s`) that have no other live copy
  are re-placed at once, most recently used first, and only where they fit without evicting
  anything ("replaced"); those the per-pass limit leaves over are re-placed in later passes;
- a model registered with min_copies keeps that many copies, idle or not ("copy_added");
- with router telemetry, a model whose request rate per copy exceeds `copy_rate_per_s` gets
  another copy on another pod with free room, up to max_copies ("copy_added"); below half
  that rate a copy is dropped, never the last LOADED one, never below min_copies, never one loaded
  less than `copy_guard_s` ago ("copy_dropped").
Every action is an intent to the decider (placement/decider.py): one fenced write of the
assignment and its Decision, planned against the ledger, so actions of one pass never
double-book a pod even before the view shows the earlier ones.
"""

from __future__ import annotations

import logging

from mesh import types
from mesh.kv import keys as k
from placement.controller import Controller
from placement.decider import Place, Unassign

log = logging.getLogger(__name__)


class Proactive:
    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        self.ledger = controller.ledger
        self.pending: list[str] = []  # dead pods' models not re-placed yet (budget ran out)
        # Models registered with min_copies, kept by the change hook: a pass looks at those and
        # (with copy scaling on) the ones telemetry saw, never at every registered model.
        self._kept = {m for m, spec in self.state.models.items() if spec.min_copies > 0}
        self.state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.MODELS and len(ids) == 1:
            spec = self.state.models.get(ids[0])
            if spec is not None and spec.min_copies > 0:
                self._kept.add(ids[0])
            else:
                self._kept.discard(ids[0])

    def live_copies(self, model_id: str) -> list[str]:
        """Live pods assigned the model, draining ones excluded (their copies are leaving)."""
        draining = self.ledger.draining()
        return [i for i in self.ledger.live_copies(model_id) if i not in draining]

    def _recent(self, model_id: str, now_ms: int, window_ms: int) -> bool:
        return bool(window_ms) and now_ms - self.ctl.last_used_ms(model_id) <= window_ms

    def _should_replace(self, model_id: str, now_ms: int, window_ms: int) -> bool:
        return (model_id in self.state.models and not self.live_copies(model_id)
                and self._recent(model_id, now_ms, window_ms))
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
        """One pass (telemetry already refreshed by the caller); returns the actions taken."""
        budget = self.ctl.settings.max_actions_per_pass
        done = await self.drain(budget)
        queue = self._replacements(replace)
        self.pending = []
        for n, model_id in enumerate(queue):
            if done >= budget:
                self.pending = queue[n:]
                return done
            done += await self._add(model_id, "replaced", "its pod died and it was used recently", evict=False)
        for model_id in self._candidates():
            if done >= budget:
                break
            spec = self.state.models[model_id]
            have = len(self.live_copies(model_id))
            if have < spec.min_copies:
                done += await self._add(model_id, "copy_added",
                                        f"min_copies is {spec.min_copies}, {have} live", evict=True)
                continue
            done += await self._scale(model_id, spec, have)
        return done

    def _candidates(self) -> list[str]:
        """The registered models a pass may act on, in id order: those with min_copies, and
        with copy scaling on the ones router telemetry reports (_scale needs their rate)."""
        out = set(self._kept)
        if self.ctl.settings.copy_rate_per_s and self.ctl.last_activity is not None:
            out.update(self.ctl.last_activity)
        return sorted(m for m in out if m in self.state.models)

    async def drain(self, budget: int) -> int:
        """Moves draining pods' models: returns the copies added (deletions are not counted)."""
        draining = sorted(i for i in self.ledger.draining() if i in self.state.instances)
        if not draining:
            return 0
        await self.ctl.gather_usage(draining)  # the pod's own recency of its models
        now = self.ctl.clock.unix_ms()
        window_ms = int(self.ctl.settings.replace_window_s * 1000)
        done = 0
        for instance_id in draining:
            release: list[tuple[str, str, str]] = []
            for model_id in sorted(self.ledger.assignments(instance_id)):
                spec = self.state.models.get(model_id)
                if spec is None:
                    continue  # unregistered: the clean-up deletes it
                ready = [c.instance_id for c in self.state.ready_copies(model_id)
                         if c.instance_id != instance_id and not self.state.instances[c.instance_id].draining]
                wanted = spec.min_copies > 0 or self._recent(model_id, now, window_ms)
                if ready:
                    release.append((instance_id, model_id, f"pod {instance_id} is draining; "
                                    f"a LOADED copy is on {ready[0]}"))
                elif not wanted:
                    release.append((instance_id, model_id, f"pod {instance_id} is draining and the model "
                                    "was not used recently"))
                elif not self.live_copies(model_id) and done < budget:
                    why = "has min_copies" if spec.min_copies else "was used recently"
                    done += await self._add(model_id, "copy_added",
                                            f"its pod {instance_id} is draining and it {why}", evict=True)
            if release and await self.ctl.decider.unassign(Unassign(release, action="drained")):
                for _, model_id, why in release:
                    log.info("released model %s from draining pod %s: %s", model_id, instance_id, why)
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
        if model_id not in self.state.models:
            return 0
        placed = await self.ctl.decider.add_copy(Place(model_id, action=action, why=why, evict=evict))
        return int(placed is not None)

    async def _drop(self, model_id: str, why: str) -> int:
        now = self.ctl.clock.unix_ms()
        guard = int(self.ctl.settings.copy_guard_s * 1000)
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
        if not await self.ctl.decider.unassign(Unassign([(instance_id, model_id, why)], action="copy_dropped")):
            return 0
        self.ctl.metrics.evictions.labels("cooled").inc()
        return 1
