"""The decider's ledger: what every live pod holds and is about to hold, in bytes.

State = the watched view (MeshState) + the decider's OWN writes the view has not shown yet
(etcd's watch lags the write: planning on the view alone double-books a pod's room). Per pod:
- capacity (InstanceRecord.capacity_bytes);
- measured use: each LOADED copy's measured size, and the pod's own report of its use
  (InstanceRecord.used_bytes, the ground truth once reported) where it exceeds their sum —
  that excess is memory no assigned copy accounts for (copies still unloading) and is held;
- reservations: an assignment not yet confirmed (no copy report, LOADING, or a FAILED report
  older than the assignment) is booked at its PREDICTED bytes (Assignment.predicted_bytes,
  from placement/prior.py) from the moment the decider writes it, until the pod reports the
  copy LOADED (then its measurement replaces it) or FAILED (then 0), or the assignment or the
  pod goes. The reservation lives in etcd (the assignment record), so a new leader's ledger
  rebuilds it from the view.

`fence(pod)` gives the compares that make etcd reject a plan made on a stale ledger: no key
under assignments/<pod>/ may have changed after the revision the plan was made at, except the
keys the decider itself wrote since (known to the ledger, and only the leader writes them).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aetcd.rpc import rpc_pb2

from mesh.kv.etcd import MOD
from mesh.kv.keys import prefix_end
from mesh.kv.store import LESS, range_compare
from mesh.types import Assignment, CopyState
from placement import planner
from placement.prior import Prior, Size
from placement.usage import Usage

if TYPE_CHECKING:
    from placement.controller import Controller

OWN_TTL_S = 30.0  # an own write the view never confirms (deleted meanwhile) is dropped after this
MAX_FENCE_RANGES = 64  # more own unseen writes on one pod than this: wait for the view instead


@dataclasses.dataclass
class _Own:
    instance_id: str
    model_id: str
    record: Assignment | None  # None: our delete
    since: int  # the view's revision when we wrote it: the write itself is later
    at: float  # monotonic time of the write


class Ledger:
    track_own_writes = True  # tests switch it off to show what double-booking looks like

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        self.keys = controller.state.keys
        self.prior = Prior(self.state, controller.settings)
        self._own: dict[str, _Own] = {}

    # -- own writes ---------------------------------------------------------------------------

    def record(self, changes: Iterable[tuple[str, str, Assignment | None]], since: int) -> None:
        """The decider wrote these (instance, model, assignment or None for a delete) in a
        transaction sent when the view was at revision `since` (read BEFORE sending: the watch
        may deliver the write before the transaction's answer arrives)."""
        if not self.track_own_writes:
            return
        now = time.monotonic()
        for instance_id, model_id, record in changes:
            self._own[self.keys.assignment(instance_id, model_id)] = _Own(instance_id, model_id, record, since, now)

    def expire(self) -> None:
        """Forgets own writes the view now shows."""
        now = time.monotonic()
        for key, own in list(self._own.items()):
            rev = self.state.mod_revision(key)
            seen = rev > own.since or (own.record is None and rev == 0)
            if seen or now - own.at > OWN_TTL_S:
                del self._own[key]

    def unseen(self) -> int:
        return len(self._own)

    # -- assignments as the ledger knows them -------------------------------------------------

    def assignments(self, instance_id: str) -> dict[str, Assignment]:
        out = dict(self.state.assignments.get(instance_id, {}))
        for own in self._own.values():
            if own.instance_id == instance_id:
                if own.record is None:
                    out.pop(own.model_id, None)
                else:
                    out[own.model_id] = own.record
        return out

    def assigned_instances(self, model_id: str) -> list[str]:
        out = set(self.state.assigned_instances(model_id))
        for own in self._own.values():
            if own.model_id == model_id:
                if own.record is None:
                    out.discard(own.instance_id)
                else:
                    out.add(own.instance_id)
        return sorted(out)

    def live_copies(self, model_id: str) -> list[str]:
        """Live pods assigned the model (copies loading or loaded), own unseen writes included."""
        return [i for i in self.assigned_instances(model_id) if i in self.state.instances]

    def draining(self) -> set[str]:
        return {i for i, inst in self.state.instances.items() if inst.draining}

    def kinds(self, exclude: Iterable[str] = ()) -> set[str]:
        skip = set(exclude)
        return {inst.device for i, inst in self.state.instances.items() if i not in skip} or {"cpu"}

    def size(self, model_id: str, exclude: Iterable[str] = ()) -> Size:
        """What to book for the model on the pods that could take it (see prior.py)."""
        return self.prior.size(model_id, self.kinds(exclude))

    # -- the pods as the planner sees them ----------------------------------------------------

    def pod_views(self, usage: dict[str, dict[str, Usage]] | None = None) -> list[planner.PodView]:
        self.expire()
        return [self.pod_view(i, (usage or {}).get(i)) for i in sorted(self.state.instances)]

    def in_flight(self) -> int:
        """Assignments on live pods still reserved (not confirmed LOADED or FAILED)."""
        self.expire()
        return sum(1 for i in self.state.instances for m in self.pod_view(i).models if not m.loaded)

    def pod_view(self, instance_id: str, usage: dict[str, Usage] | None = None) -> planner.PodView:
        """A live pod's capacity, its assigned models' bytes (measured or reserved), recency and
        in-flight work, and the bytes it holds beyond them.

        Recency: the newer of router telemetry and the pod's GetUsage answer, else the copy's
        last update. Value and frequency: the GDSF book. Pinned: the model has no more live
        copies than its registered min_copies.
        """
        ctl, st = self.ctl, self.state
        inst = st.instances[instance_id]
        models = []
        measured = 0
        for model_id, assignment in sorted(self.assignments(instance_id).items()):
            akey = self.keys.assignment(instance_id, model_id)
            copy = None if akey in self._own else st.copies.get(model_id, {}).get(instance_id)
            state = copy.state if copy is not None else None
            if copy is not None and state in (CopyState.LOADED, CopyState.UNLOADING):
                size, loaded = copy.size_bytes or assignment.predicted_bytes or self.size(model_id).bytes, True
                measured += copy.size_bytes
            elif (copy is not None and state is CopyState.FAILED
                  and st.mod_revision(self.keys.copy(model_id, instance_id)) > st.mod_revision(akey)):
                size, loaded = 0, True  # a failed load holds nothing
            else:  # in flight: the reservation
                size, loaded = assignment.predicted_bytes or self.size(model_id).bytes, False
            used = (usage or {}).get(model_id)
            fallback_ms = copy.updated_unix_ms if copy else assignment.assigned_unix_ms
            act = (ctl.last_activity or {}).get(model_id)
            last_used = max(used.last_used_ms if used else fallback_ms, act.last_used_ms if act else 0)
            spec = st.models.get(model_id)
            models.append(
                planner.PodModel(
                    model_id,
                    size,
                    last_used_ms=last_used,
                    in_flight=used.in_flight if used else 0,
                    loaded=loaded,
                    loaded_unix_ms=copy.updated_unix_ms if copy else assignment.assigned_unix_ms,
                    value=ctl.book.value(model_id) if ctl.last_activity is not None else 0.0,
                    frequency=ctl.frequency(model_id),
                    pinned=(spec is not None and spec.min_copies > 0  # live_copies scans every pod
                            and 0 < len(self.live_copies(model_id)) <= spec.min_copies),
                )
            )
        held = max(0, inst.used_bytes - measured)
        return planner.PodView(instance_id, inst.capacity_bytes, tuple(models), held_bytes=held)

    def measured_use(self, instance_id: str) -> int:
        """The pod's measured use: its LOADED copies' sizes, or its own report when larger."""
        pod = self.pod_view(instance_id)
        return pod.held_bytes + sum(m.bytes for m in pod.models if m.loaded)

    # -- the fence ----------------------------------------------------------------------------

    def fence(self, instance_id: str) -> list[rpc_pb2.Compare] | None:
        """Compares that hold only if no key under assignments/<pod>/ changed after the view's
        revision, own unseen puts excepted; None when there are too many of those to fence."""
        prefix = self.keys.assignments_of(instance_id)
        below = self.state.view.revision + 1
        own = sorted(k for k, o in self._own.items() if o.instance_id == instance_id and o.record is not None)
        if len(own) > MAX_FENCE_RANGES:
            return None
        bounds: list[tuple[str, bytes]] = []
        start = prefix
        for key in own:
            bounds.append((start, key.encode()))
            start = key + "\0"
        bounds.append((start, prefix_end(prefix.encode())))
        return [range_compare(a, b, MOD, below, LESS) for a, b in bounds if a.encode() < b]
