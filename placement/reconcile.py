"""The leader's clean-up loop: assignments that should no longer exist are deleted (fenced).

Runs after state changes (debounced) and every few seconds as a safety net, only while this
replica leads. Three cases:
- the model was unregistered: its assignments go, whatever their copies' state — the pod
  stops a load in progress and unloads;
- the pod is dead (its instance record expired with its lease): its assignments go; its
  copies went with the lease, and the next miss re-places the model on a live pod;
- the pod is overcommitted (its measured use — its LOADED copies' sizes, or its own report
  when larger — exceeds its capacity, e.g. a model measured bigger than its prior): the least
  recently used loaded models go (planner.overcommit_victims), never the newest, an in-flight
  one or a copy still LOADING — deleting a loading copy would only waste the load and the miss
  waiting for it.
Then the proactive pass (copies.py): draining pods' models are moved, a dead pod's recently
used models are re-placed, min_copies kept, hot models copied and cooled copies dropped —
bounded per pass; then models idle past their TTL are unloaded (idle.py, scale to zero).
Every deletion and placement is an intent to the decider (decider.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mesh.kv import keys as k
from mesh.types import CopyState
from placement.controller import Controller
from placement.copies import Proactive
from placement.decider import Unassign
from placement.idle import IdleUnloader

log = logging.getLogger(__name__)

FAILED_GRACE_MS = 30_000
# The loop reads router telemetry at most this often (a pass runs after every burst of changes:
# with 10,000 models, reading and folding in every model's activity on each pass was half of
# placement's CPU in bench/fleet.py). Routers flush it every second anyway; an evicting miss
# reads it itself (decider.place), and a pass that finds a dead pod always does.
ACTIVITY_REFRESH_S = 1.0


class Reconciler:
    def __init__(self, controller: Controller, interval_s: float = 5.0, debounce_s: float = 0.05) -> None:
        self.controller = controller
        self.state = controller.state
        self.interval_s = interval_s
        self.debounce_s = debounce_s
        self.proactive = Proactive(controller)
        self.idle = IdleUnloader(controller)
        self._dirty = asyncio.Event()
        self._refreshed_at = float("-inf")  # monotonic time of the loop's last telemetry read
        # (instance, model) assignments to look at in the next pass: every one at start, then
        # those a change may have made stale, and the ones found stale or FAILED but still in
        # their grace time (kept until their assignment goes or they check out clean). A pass
        # then costs O(changed), not O(every assignment) — 10,000 of them in the fleet run.
        self._suspects: set[tuple[str, str]] = {(i, m) for i, ms in self.state.assignments.items() for m in ms}
        self.state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        self._dirty.set()
        if section == k.ASSIGNMENTS and len(ids) == 2:
            self._suspects.add((ids[0], ids[1]))
        elif section == k.COPIES and len(ids) == 2:
            self._suspects.add((ids[1], ids[0]))
        elif section == k.INSTANCES and len(ids) == 1 and ids[0] not in self.state.instances:
            # only a pod's death makes its assignments stale (its record changes on every load)
            self._suspects.update((ids[0], m) for m in self.state.assignments.get(ids[0], {}))
        elif section == k.MODELS and len(ids) == 1 and ids[0] not in self.state.models:
            self._suspects.update((i, ids[0]) for i, ms in self.state.assignments.items() if ids[0] in ms)

    async def run(self) -> None:
        """Runs until cancelled (under the Supervisor)."""
        await self.state.view.wait_synced()
        while True:
            # asyncio.timeout: 3.11's wait_for can swallow a cancellation (mesh/kv/view.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._dirty.wait()
            await asyncio.sleep(self.debounce_s)  # let a burst of changes land first
            self._dirty.clear()
            if self.controller.leader.is_leader:
                now = time.monotonic()
                refresh = now - self._refreshed_at >= ACTIVITY_REFRESH_S
                await self.reconcile_once(refresh=refresh)
                if refresh:
                    self._refreshed_at = now

    def stale_assignments(self) -> dict[str, list[tuple[str, str]]]:
        """instance id -> [(model id, reason)] for unregistered models, dead pods, and copies
        that FAILED more than FAILED_GRACE_MS ago (EnsureLoaded handles a fresh failure itself;
        a failed proactive copy would otherwise hold its assignment, and count as a copy,
        forever)."""
        out: dict[str, list[tuple[str, str]]] = {}
        now = self.controller.clock.unix_ms()
        keep: set[tuple[str, str]] = set()
        for instance_id, model_id in sorted(self._suspects):
            if model_id not in self.state.assignments.get(instance_id, {}):
                continue  # gone: nothing to clean
            copy = self.state.copies.get(model_id, {}).get(instance_id)
            failed = copy is not None and copy.state is CopyState.FAILED
            if instance_id not in self.state.instances:
                out.setdefault(instance_id, []).append((model_id, "dead_pod"))
            elif model_id not in self.state.models:
                out.setdefault(instance_id, []).append((model_id, "unregistered"))
            elif copy is not None and failed and now - copy.updated_unix_ms > FAILED_GRACE_MS:
                out.setdefault(instance_id, []).append((model_id, "failed_load"))
            elif not failed:
                continue  # clean: looked at again only after a change to it
            keep.add((instance_id, model_id))
        self._suspects = keep
        return out

    def overcommitted(self) -> list[str]:
        """Live pods whose measured use exceeds their capacity (placement/ledger.py)."""
        ledger = self.controller.ledger
        return sorted(i for i, inst in self.state.instances.items() if ledger.measured_use(i) > inst.capacity_bytes)

    async def reconcile_once(self, refresh: bool = True) -> int:
        """One pass; returns how many assignments it deleted. `refresh` False reuses the last
        telemetry read unless a pod died (the loop reads it at most every ACTIVITY_REFRESH_S)."""
        deleted = 0
        stale_all = self.stale_assignments()
        dead = {i: [m for m, why in items if why == "dead_pod"] for i, items in stale_all.items()}
        if refresh or any(dead.values()):
            # Telemetry first: which of a dead pod's models were used recently is read from it.
            await self.controller.refresh_activity()
        replace = self.proactive.recently_used_on_dead_pods(dead)
        for instance_id, stale in sorted(stale_all.items()):
            if await self._delete(instance_id, stale):
                deleted += len(stale)
        await self.controller.usage.forget({i.address for i in self.state.instances.values()})
        for instance_id in self.overcommitted():
            deleted += await self.controller.decider.relieve(instance_id)
        await self.proactive.run(replace)
        if refresh:  # scale to zero (idle.py): judged on a fresh telemetry read only
            deleted += await self.idle.run()
        return deleted

    async def _delete(self, instance_id: str, items: list[tuple[str, str]]) -> bool:
        """Deletes through the decider, in transactions etcd accepts (it caps one at 128
        operations; a dead pod may have held hundreds of models). Deletes are idempotent, so
        a pass cut short is finished by the next one."""
        if not await self.controller.decider.unassign(Unassign([(instance_id, m, why) for m, why in items])):
            return False
        for model_id, reason in items:
            log.info("removed assignment of model %s on %s: %s", model_id, instance_id, reason)
        return True
