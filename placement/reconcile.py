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
bounded per pass. Every deletion and placement is an intent to the decider (decider.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mesh.types import CopyState
from placement.controller import Controller
from placement.copies import Proactive
from placement.decider import Unassign

log = logging.getLogger(__name__)

FAILED_GRACE_MS = 30_000


class Reconciler:
    def __init__(self, controller: Controller, interval_s: float = 5.0, debounce_s: float = 0.05) -> None:
        self.controller = controller
        self.state = controller.state
        self.interval_s = interval_s
        self.debounce_s = debounce_s
        self.proactive = Proactive(controller)
        self._dirty = asyncio.Event()
        self.state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        self._dirty.set()

    async def run(self) -> None:
        """Runs until cancelled (under the Supervisor)."""
        await self.state.view.wait_synced()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.interval_s)
            await asyncio.sleep(self.debounce_s)  # let a burst of changes land first
            self._dirty.clear()
            if self.controller.leader.is_leader:
                await self.reconcile_once()

    def stale_assignments(self) -> dict[str, list[tuple[str, str]]]:
        """instance id -> [(model id, reason)] for unregistered models, dead pods, and copies
        that FAILED more than FAILED_GRACE_MS ago (EnsureLoaded handles a fresh failure itself;
        a failed proactive copy would otherwise hold its assignment, and count as a copy,
        forever)."""
        out: dict[str, list[tuple[str, str]]] = {}
        now = self.controller.clock.unix_ms()
        for instance_id, models in self.state.assignments.items():
            alive = instance_id in self.state.instances
            for model_id in sorted(models):
                copy = self.state.copies.get(model_id, {}).get(instance_id)
                if not alive:
                    out.setdefault(instance_id, []).append((model_id, "dead_pod"))
                elif model_id not in self.state.models:
                    out.setdefault(instance_id, []).append((model_id, "unregistered"))
                elif copy is not None and copy.state is CopyState.FAILED and now - copy.updated_unix_ms > FAILED_GRACE_MS:
                    out.setdefault(instance_id, []).append((model_id, "failed_load"))
        return out

    def overcommitted(self) -> list[str]:
        """Live pods whose measured use exceeds their capacity (placement/ledger.py)."""
        ledger = self.controller.ledger
        return sorted(i for i, inst in self.state.instances.items() if ledger.measured_use(i) > inst.capacity_bytes)

    async def reconcile_once(self) -> int:
        """One pass; returns how many assignments it deleted."""
        deleted = 0
        # Telemetry first: which of a dead pod's models were used recently is read from it.
        await self.controller.refresh_activity()
        stale_all = self.stale_assignments()
        dead = {i: [m for m, why in items if why == "dead_pod"] for i, items in stale_all.items()}
        replace = self.proactive.recently_used_on_dead_pods(dead)
        for instance_id, stale in sorted(stale_all.items()):
            if await self._delete(instance_id, stale):
                deleted += len(stale)
        await self.controller.usage.forget({i.address for i in self.state.instances.values()})
        for instance_id in self.overcommitted():
            deleted += await self.controller.decider.relieve(instance_id)
        await self.proactive.run(replace)
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
