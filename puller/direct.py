"""Direct loads: placement's Runtime/Load, started before the pod's etcd watch shows the write.

The placement leader calls Load right after its fenced transaction assigning a model to this
pod (and deleting the victims' assignments) succeeded, carrying the Assignment record exactly
as written. Waiting for the pod's watch instead costs a few milliseconds on every miss. The
call does not bypass the state machine: it sets a per-model OVERRIDE of what the watched view
says (the assignment, or "unassigned" for each victim) and converges those models through
their usual slots (puller/modelstate.py), so there is still one queue, one load and one unload
per model. The watch delivering the same write later confirms the override (the record's bytes
are equal, or the victim's key is deleted) and drops it; converging again is then a no-op.

An override the watch does not confirm within `confirm_s` (a snapshot after a reconnect
skipped the key's intermediate states, or the write was undone before the pod saw it) is
dropped, and the model converges on what etcd says: a copy loaded for an assignment that is
not there is unloaded like any other. Only confirmations drop an override early: watch events
arrive in revision order, so an event that differs from the override is older than the write
the override stands for, never newer.

A victim gets an override only if the pod might still serve it: its key is in the view, or a
direct load put it here. A victim the view already lacks was deleted before the call arrived,
and no later delete event would confirm an override for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from mesh import types
from mesh.errors import InvalidArgument, Unavailable
from mesh.kv.etcd import Event
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.types import Assignment, CopyRecord, CopyState
from puller.modelstate import ModelSlot, same_artifact
from puller.records import Publisher

log = logging.getLogger(__name__)

CONFIRM_S = 10.0  # an override the watch has not confirmed after this is dropped


class Pod(Protocol):
    """What direct loads need of the agent (puller.agent.Agent)."""

    instance_id: str
    keys: Keys
    view: View
    slots: dict[str, ModelSlot]
    publisher: Publisher
    stopping: bool

    def converge(self, model_ids: set[str] | None = None) -> None: ...


@dataclasses.dataclass
class _Override:
    raw: bytes | None  # the record's bytes as placement wrote them; None: deleted (a victim)
    assignment: Assignment | None
    until: float  # monotonic deadline for the watch to confirm it


class DirectLoads:
    def __init__(self, pod: Pod, confirm_s: float = CONFIRM_S) -> None:
        self.pod = pod
        self.confirm_s = confirm_s
        self._overrides: dict[str, _Override] = {}
        self._changed = asyncio.Event()  # replaced on every copy state change (waiters' wake-up)
        self.dropped = 0  # overrides the watch never confirmed (tests, logs)

    # -- what the agent asks ------------------------------------------------------------------

    def lookup(self, model_id: str) -> tuple[bool, Assignment | None]:
        """(overridden, the assignment to follow) for one model."""
        override = self._overrides.get(model_id)
        if override is None:
            return False, None
        return True, override.assignment

    def apply(self, desired: dict[str, Assignment]) -> dict[str, Assignment]:
        """The view's assignments of this pod with the overrides applied."""
        for model_id, override in self._overrides.items():
            if override.assignment is None:
                desired.pop(model_id, None)
            else:
                desired[model_id] = override.assignment
        return desired

    def pending(self) -> int:
        return len(self._overrides)

    def confirm(self, events: Iterable[Event]) -> None:
        """The watch delivered these assignment events: drop the overrides they confirm."""
        for ev in events:
            model_id = ev.key.rsplit("/", 1)[-1]
            override = self._overrides.get(model_id)
            if override is not None and override.raw == ev.value:
                del self._overrides[model_id]

    def copy_changed(self) -> None:
        """A slot changed state: wake whoever waits for a direct load's outcome."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- placement's call ---------------------------------------------------------------------

    async def load(self, raw: bytes, unassigned: Sequence[str], timeout_s: float | None) -> CopyRecord:
        """Starts the assignment `raw` (and the victims' unloads) now; returns the copy record
        once the copy serves (LOADED) or failed (FAILED). Raises InvalidArgument for a record
        that is not an assignment of this pod, Unavailable when the pod is stopping or the load
        was cancelled (the assignment changed or went), TimeoutError when `timeout_s` (None:
        no limit) passes first; the load itself goes on."""
        pod = self.pod
        if pod.stopping:
            raise Unavailable("this runtime pod is stopping")
        try:
            assignment = types.decode(Assignment, raw)
        except ValueError as exc:
            raise InvalidArgument(f"malformed assignment: {exc}") from None
        if assignment.instance_id != pod.instance_id or not assignment.model_id:
            raise InvalidArgument(f"assignment of model '{assignment.model_id}' is for pod "
                                  f"'{assignment.instance_id}', not this pod ('{pod.instance_id}')")
        until = time.monotonic() + self.confirm_s
        touched = {assignment.model_id}
        for victim in unassigned:
            if victim == assignment.model_id:
                continue
            known = pod.view.get(pod.keys.assignment(pod.instance_id, victim)) is not None
            direct = self._overrides.get(victim)
            if known or (direct is not None and direct.assignment is not None):
                self._overrides[victim] = _Override(None, None, until)
                touched.add(victim)
        if pod.view.get(pod.keys.assignment(pod.instance_id, assignment.model_id)) == raw:
            self._overrides.pop(assignment.model_id, None)  # the watch was faster: nothing to override
        else:
            self._overrides[assignment.model_id] = _Override(raw, assignment, until)
        asyncio.get_running_loop().call_later(self.confirm_s + 0.05, self._expire)
        pod.converge(touched)
        async with asyncio.timeout(timeout_s):
            return await self._outcome(assignment)

    async def _outcome(self, assignment: Assignment) -> CopyRecord:
        model_id = assignment.model_id
        while True:
            changed = self._changed
            slot = self.pod.slots.get(model_id)
            record = self.pod.publisher.copies.get(model_id)
            if slot is not None and record is not None:
                if slot.state is CopyState.LOADED and same_artifact(slot.assignment, assignment):
                    return record
                if slot.state is CopyState.FAILED and slot.failed_for == assignment:
                    return record
            overridden, current = self.lookup(model_id)
            if not overridden:
                current = self._viewed(model_id)
            if not same_artifact(current, assignment) and (slot is None or slot.state is not CopyState.LOADING):
                raise Unavailable(f"the load of model '{model_id}' was cancelled: its assignment changed or went")
            await changed.wait()

    def _viewed(self, model_id: str) -> Assignment | None:
        value = self.pod.view.get(self.pod.keys.assignment(self.pod.instance_id, model_id))
        if value is None:
            return None
        try:
            return types.decode(Assignment, value)
        except ValueError:
            return None

    def _expire(self) -> None:
        now = time.monotonic()
        gone = {m for m, o in self._overrides.items() if o.until <= now}
        for model_id in sorted(gone):
            override = self._overrides.pop(model_id)
            log.warning("model %s: placement's direct %s was not confirmed by the assignment watch within "
                        "%.0fs; following etcd", model_id, "unload" if override.raw is None else "load",
                        self.confirm_s)
        if gone:
            self.dropped += len(gone)
            self.pod.converge(gone)
            self.copy_changed()
