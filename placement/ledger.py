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

INCREMENTAL: the ledger keeps one entry per (pod, model) it books — the assignment as the
ledger knows it, its copy report, its booked bytes — and per pod the sums (booked bytes,
measured bytes, reservations) and the resident set, updated on each change the view shows
(MeshState's change hook) and on each own write recorded or expired. A decision costs O(pods)
plus, only when it must evict, the candidates on the pods it examines; nothing rescans every
copy (the 10,000-model fleet stalled at ~4 placements/s when every miss rebuilt all pods'
views). The recency, value, frequency and pinned status of each model change without any
state change (telemetry, the GDSF book), so they are read when a view's models are built,
on demand. An entry whose size falls back to the prior (an assignment with no predicted
bytes) is re-sized at every view: the prior moves with every measurement.
tests/unit/placement/test_ledger_incremental.py checks, over random sequences of changes,
that the views equal a rebuild from scratch.

`fence(pod)` gives the compares that make etcd reject a plan made on a stale ledger: no key
under assignments/<pod>/ may have changed after the revision the plan was made at, except the
keys the decider itself wrote since (known to the ledger, and only the leader writes them).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

from aetcd.rpc import rpc_pb2

from mesh.kv import keys as k
from mesh.kv.etcd import MOD
from mesh.kv.keys import prefix_end
from mesh.kv.store import LESS, range_compare
from mesh.types import Assignment, CopyRecord, CopyState
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


@dataclasses.dataclass
class _Entry:
    """One model the ledger books on one pod."""

    assignment: Assignment
    copy: CopyRecord | None  # its report; None also while an own write of it is unseen
    bytes: int  # booked: the measurement, the reservation, or 0 for a failed load
    loaded: bool  # confirmed (LOADED / UNLOADING, or FAILED): no longer reserved
    measured: int  # the copy's measured size when LOADED / UNLOADING, else 0
    floating: bool  # `bytes` falls back to the prior: re-sized at every view
    tenant: str | None = ""  # its ModelSpec.tenant (re-booked when the spec changes); None: unregistered


@dataclasses.dataclass
class _Pod:
    """One pod's entries and their sums (a pod's record may be gone: dead pods' entries wait
    for their assignments to be deleted, and count nowhere meanwhile)."""

    entries: dict[str, _Entry] = dataclasses.field(default_factory=dict)
    booked: int = 0  # bytes of the entries that are not floating
    loaded_bytes: int = 0  # of those, the loaded ones'
    measured: int = 0
    reserved: int = 0  # entries not loaded (in flight)
    floating: set[str] = dataclasses.field(default_factory=set)
    tenants: dict[str | None, int] = dataclasses.field(default_factory=dict)  # tenant -> bytes (not floating)
    version: int = 0  # bumped on every change: a view's lazily built models check it


class _Models(Sequence[planner.PodModel]):
    """A pod view's models, built on first use (only a plan that evicts, or the clean-up,
    walks them); valid until the pod's next change — the decider plans synchronously."""

    def __init__(self, ledger: Ledger, instance_id: str, pod: _Pod, usage: dict[str, Usage] | None) -> None:
        self._args = (ledger, instance_id, pod, usage)
        self._version = pod.version
        self._built: tuple[planner.PodModel, ...] | None = None

    def _all(self) -> tuple[planner.PodModel, ...]:
        if self._built is None:
            ledger, instance_id, pod, usage = self._args
            if pod.version != self._version:
                raise RuntimeError(f"a view of pod {instance_id} was used after the ledger changed")
            self._built = ledger._build(instance_id, pod, usage)
        return self._built

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[planner.PodModel]:
        return iter(self._all())

    @overload
    def __getitem__(self, index: int) -> planner.PodModel: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[planner.PodModel, ...]: ...
    def __getitem__(self, index: int | slice) -> planner.PodModel | tuple[planner.PodModel, ...]:
        return self._all()[index]

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))


class Ledger:
    track_own_writes = True  # tests switch it off to show what double-booking looks like

    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        self.keys = controller.state.keys
        self.prior = Prior(self.state, controller.settings)
        self._own: dict[str, _Own] = {}
        self._pods: dict[str, _Pod] = {}
        self._where: dict[str, set[str]] = {}  # model -> pods the ledger books it on
        self.rebuild()
        self.state.on_change(self._on_change)

    # -- keeping the entries current ----------------------------------------------------------

    def rebuild(self) -> None:
        """Every entry from scratch (at start; the tests compare against it)."""
        for pod in self._pods.values():
            pod.version += 1  # views taken before are stale
        self._pods, self._where = {}, {}
        pairs = {(i, m) for i, models in self.state.assignments.items() for m in models}
        pairs |= {(own.instance_id, own.model_id) for own in self._own.values()}
        for instance_id, model_id in sorted(pairs):
            self._refresh(instance_id, model_id)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        if section == k.ASSIGNMENTS and len(ids) == 2:
            self._refresh(ids[0], ids[1])
        elif section == k.COPIES and len(ids) == 2:
            self._refresh(ids[1], ids[0])
        elif section == k.MODELS and len(ids) == 1:
            for instance_id in sorted(self._where.get(ids[0], ())):  # its tenant may have changed
                self._refresh(instance_id, ids[0])

    def _refresh(self, instance_id: str, model_id: str) -> None:
        """Re-books (instance, model) from the view and the own writes."""
        pod = self._pods.get(instance_id)
        old = pod.entries.pop(model_id, None) if pod is not None else None
        if pod is not None and old is not None:
            self._count(pod, model_id, old, -1)
        entry = self._entry(instance_id, model_id)
        if entry is not None:
            pod = pod if pod is not None else self._pods.setdefault(instance_id, _Pod())
            pod.entries[model_id] = entry
            self._count(pod, model_id, entry, 1)
            self._where.setdefault(model_id, set()).add(instance_id)
        elif old is not None:
            where = self._where.get(model_id)
            if where is not None:
                where.discard(instance_id)
                if not where:
                    del self._where[model_id]
        if pod is not None:
            pod.version += 1  # (an emptied pod's sums stay: views taken of it must see changes)

    @staticmethod
    def _count(pod: _Pod, model_id: str, entry: _Entry, sign: int) -> None:
        if entry.floating:
            (pod.floating.add if sign > 0 else pod.floating.discard)(model_id)
        else:
            pod.booked += sign * entry.bytes
            pod.loaded_bytes += sign * entry.bytes * entry.loaded
            pod.tenants[entry.tenant] = pod.tenants.get(entry.tenant, 0) + sign * entry.bytes
            if not pod.tenants[entry.tenant]:
                del pod.tenants[entry.tenant]
        pod.measured += sign * entry.measured
        pod.reserved += sign * (not entry.loaded)

    def _entry(self, instance_id: str, model_id: str) -> _Entry | None:
        st = self.state
        akey = self.keys.assignment(instance_id, model_id)
        own = self._own.get(akey)
        assignment = own.record if own is not None else st.assignments.get(instance_id, {}).get(model_id)
        if assignment is None:
            return None
        copy = None if own is not None else st.copies.get(model_id, {}).get(instance_id)
        state = copy.state if copy is not None else None
        spec = st.models.get(model_id)
        tenant = spec.tenant if spec is not None else None
        if copy is not None and state in (CopyState.LOADED, CopyState.UNLOADING):
            size = copy.size_bytes or assignment.predicted_bytes
            return _Entry(assignment, copy, size, True, copy.size_bytes, floating=not size, tenant=tenant)
        if (copy is not None and state is CopyState.FAILED
                and st.mod_revision(self.keys.copy(model_id, instance_id)) > st.mod_revision(akey)):
            return _Entry(assignment, copy, 0, True, 0, floating=False, tenant=tenant)  # holds nothing
        # in flight: the reservation
        size = assignment.predicted_bytes
        return _Entry(assignment, copy, size, False, 0, floating=not size, tenant=tenant)

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
            self._refresh(instance_id, model_id)

    def expire(self) -> None:
        """Forgets own writes the view now shows."""
        now = time.monotonic()
        for key, own in list(self._own.items()):
            rev = self.state.mod_revision(key)
            seen = rev > own.since or (own.record is None and rev == 0)
            if seen or now - own.at > OWN_TTL_S:
                del self._own[key]
                self._refresh(own.instance_id, own.model_id)

    def unseen(self) -> int:
        return len(self._own)

    # -- assignments as the ledger knows them -------------------------------------------------

    def assignments(self, instance_id: str) -> dict[str, Assignment]:
        pod = self._pods.get(instance_id)
        return {m: e.assignment for m, e in pod.entries.items()} if pod is not None else {}

    def assigned_instances(self, model_id: str) -> list[str]:
        return sorted(self._where.get(model_id, ()))

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
        return sum(pod.reserved for i, pod in self._pods.items() if i in self.state.instances)

    def _floating(self, pod: _Pod) -> int:
        return sum(self.size(m).bytes for m in pod.floating)

    def pod_view(self, instance_id: str, usage: dict[str, Usage] | None = None) -> planner.PodView:
        """A live pod's capacity, its assigned models' bytes (measured or reserved), recency and
        in-flight work, and the bytes it holds beyond them. The sums come from the pod's
        aggregates; its models are built only when walked (_build)."""
        inst = self.state.instances[instance_id]
        pod = self._pods.setdefault(instance_id, _Pod())
        held = max(0, inst.used_bytes - pod.measured)
        return planner.PodView(instance_id, inst.capacity_bytes, _Models(self, instance_id, pod, usage),
                               held_bytes=held, booked_bytes=pod.booked + self._floating(pod),
                               model_ids=pod.entries.keys())

    def _build(self, instance_id: str, pod: _Pod, usage: dict[str, Usage] | None) -> tuple[planner.PodModel, ...]:
        """The pod's models as the planner sees them. Recency: the newer of router telemetry and
        the pod's GetUsage answer, else the copy's last update. Value and frequency: the GDSF
        book. Pinned: the model has no more live copies than its registered min_copies."""
        ctl, st = self.ctl, self.state
        activity = ctl.last_activity
        models = []
        for model_id in sorted(pod.entries):
            entry = pod.entries[model_id]
            copy, assignment = entry.copy, entry.assignment
            size = self.size(model_id).bytes if entry.floating else entry.bytes
            used = (usage or {}).get(model_id)
            fallback_ms = copy.updated_unix_ms if copy else assignment.assigned_unix_ms
            act = (activity or {}).get(model_id)
            last_used = max(used.last_used_ms if used else fallback_ms, act.last_used_ms if act else 0)
            spec = st.models.get(model_id)
            models.append(
                planner.PodModel(
                    model_id,
                    size,
                    last_used_ms=last_used,
                    in_flight=used.in_flight if used else 0,
                    loaded=entry.loaded,
                    loaded_unix_ms=copy.updated_unix_ms if copy else assignment.assigned_unix_ms,
                    value=ctl.book.value(model_id) if activity is not None else 0.0,
                    frequency=ctl.frequency(model_id),
                    pinned=(spec is not None and spec.min_copies > 0
                            and 0 < len(self.live_copies(model_id)) <= spec.min_copies),
                    tenant=entry.tenant or "",
                )
            )
        return tuple(models)

    def tenant_bytes(self, tenant: str) -> int:
        """What the ledger books for `tenant`'s copies on live pods (measured or reserved)."""
        total = 0
        for instance_id, pod in self._pods.items():
            if instance_id in self.state.instances:
                total += pod.tenants.get(tenant, 0)
                total += sum(self.size(m).bytes for m in pod.floating if pod.entries[m].tenant == tenant)
        return total

    def measured_use(self, instance_id: str) -> int:
        """The pod's measured use: its LOADED copies' sizes, or its own report when larger."""
        inst = self.state.instances[instance_id]
        pod = self._pods.get(instance_id) or _Pod()
        floating = sum(self.size(m).bytes for m in pod.floating if pod.entries[m].loaded)
        return max(0, inst.used_bytes - pod.measured) + pod.loaded_bytes + floating

    # -- the fence ----------------------------------------------------------------------------

    def fence(self, instance_id: str) -> list[rpc_pb2.Compare] | None:
        """Compares that hold only if no key under assignments/<pod>/ changed after the view's
        revision, own unseen puts excepted; None when there are too many of those to fence."""
        prefix = self.keys.assignments_of(instance_id)
        below = self.state.view.revision + 1
        own = sorted(key for key, o in self._own.items() if o.instance_id == instance_id and o.record is not None)
        if len(own) > MAX_FENCE_RANGES:
            return None
        bounds: list[tuple[str, bytes]] = []
        start = prefix
        for key in own:
            bounds.append((start, key.encode()))
            start = key + "\0"
        bounds.append((start, prefix_end(prefix.encode())))
        return [range_compare(a, b, MOD, below, LESS) for a, b in bounds if a.encode() < b]
