"""StartRollout / AbortRollout: a router starts and stops a vmodel's rollout (mesh/rollout.py).

Starting: the vmodel must have one weighted target (the stable one), no pending switch and no
running rollout, and the mesh must have Redis (routers record the rollout's figures there,
the placement leader judges them). The candidate is made ready with as many copies as the
stable one has (the switch's own `_warm`: placement's ordinary EnsureLoaded), then one
compare-and-swap writes the rollout (RUNNING, step 0), the first step's weights and the
rollout's tag route; the call answers once this router's view shows it. From there the
placement leader (placement/rollouts.py) moves the steps, promotes or rolls back.

Aborting: one compare-and-swap puts all traffic back on the stable target, drops the tag
route and records ABORTED. A SetVModel while a rollout runs is refused (router/vmodel_store.py):
the rollout owns the weights until it ends.
"""

from __future__ import annotations

import dataclasses

from mesh import errors, rollout, types
from mesh.errors import Conflict, InvalidArgument, Kind, MeshError, NotFound
from mesh.rollout import Rollout
from mesh.types import VModelRecord
from router.auth import Principal
from router.tenancy import internal_id
from router.vmodel_store import _LOAD_FAILED, CAS_ATTEMPTS, VModelStore, VModelView
from router.vmodels import RolloutWanted, check_rollout


def _failed(name: str, why: str) -> MeshError:
    return MeshError(f"vmodel {errors.quote_id(name)}: {why}", kind=Kind.FAILED_PRECONDITION)


class RolloutStore:
    def __init__(self, store: VModelStore, telemetry: bool) -> None:
        """`telemetry`: the mesh has Redis (MESH_REDIS_URL), which rollouts are judged by."""
        self.store = store
        self.telemetry = telemetry

    async def start(self, principal: Principal, wanted: RolloutWanted, budget_s: float | None = None) -> VModelView:
        s = self.store
        deadline = s._deadline(budget_s)
        wanted = check_rollout(wanted)
        tenant, public = s._owner(principal, wanted.vmodel)
        internal = internal_id(tenant, public)
        record = s.namespace.vmodel(principal, wanted.vmodel)
        if record is None or record.name != internal:
            raise s._unknown(wanted.vmodel)
        if not self.telemetry:
            raise _failed(wanted.vmodel, "rollouts are judged by request telemetry, and this mesh has none: "
                                         "configure Redis (MESH_REDIS_URL) on routers and placement")
        candidate = s._target(principal, tenant, wanted.candidate)
        stable = self._stable(wanted.vmodel, record, candidate)
        try:
            await s._warm(candidate, s._copies_wanted(record), deadline)
        except MeshError as exc:
            if exc.kind in _LOAD_FAILED or isinstance(exc, NotFound):
                raise _failed(wanted.vmodel, f"the candidate cannot be made ready, no traffic moved: "
                                             f"{exc.message}") from None
            raise
        key = s.keys.vmodel(internal)
        for _ in range(CAS_ATTEMPTS):
            kv = await s.client.get(key)
            current = types.decode(VModelRecord, kv.value) if kv is not None else None
            if current is None:
                raise s._unknown(wanted.vmodel)
            if self._stable(wanted.vmodel, current, candidate) != stable:
                raise Conflict(f"vmodel {errors.quote_id(wanted.vmodel)} changed while its candidate was "
                               "loading; get it and start again")
            routed = current.tags.get(wanted.tag_header, {}).get(wanted.tag_value) if wanted.tag_header else None
            if routed is not None and routed != candidate:
                raise InvalidArgument(f"tag {wanted.tag_header}={wanted.tag_value[:80]!r} already routes elsewhere on "
                                      "this vmodel: give the rollout a tag of its own")
            now = s.clock.unix_ms()
            ro = Rollout(
                stable=stable, candidate=candidate, steps=list(wanted.steps), dwell_s=wanted.dwell_s,
                max_error_rate=wanted.max_error_rate, max_p99_ratio=wanted.max_p99_ratio,
                min_requests=wanted.min_requests, tag_header=wanted.tag_header, tag_value=wanted.tag_value,
                step_started_unix_ms=now, started_unix_ms=now,
                reason=f"step 1 of {len(wanted.steps)}: {wanted.steps[0]}% to the candidate")
            new = dataclasses.replace(
                current, active=ro.weights(), rollout=ro.to_record(), updated_unix_ms=now,
                tags=rollout.with_tag(current.tags, ro.tag_header, ro.tag_value, candidate))
            try:
                revision = await s._cas(key, kv.mod_revision if kv else 0, new)
            except Conflict:
                continue
            await s._visible(revision, deadline, wanted.vmodel)
            return s.view_of(principal, s.state.vmodels.get(internal, new))
        raise Conflict(f"vmodel {errors.quote_id(wanted.vmodel)} kept changing while starting its rollout; retry")

    def _stable(self, name: str, record: VModelRecord, candidate: str) -> str:
        """The vmodel's one weighted target; FAILED_PRECONDITION when a rollout cannot start."""
        ro = Rollout.from_record(record.rollout)
        if ro is not None and ro.running:
            raise _failed(name, "a rollout is already running: abort it first (`mesh alias rollout NAME --abort`)")
        if record.pending:
            raise _failed(name, "a switch is pending (SetVModel): let it complete, or set the vmodel again")
        weighted = [m for m, w in record.active.items() if w > 0]
        if len(weighted) != 1:
            raise _failed(name, f"a rollout moves traffic from one model, and this vmodel splits it over "
                                f"{len(weighted)}: set it to one target first")
        if weighted[0] == candidate:
            raise InvalidArgument(f"vmodel {errors.quote_id(name)} already sends all traffic to the candidate")
        return weighted[0]

    async def abort(self, principal: Principal, name: str, budget_s: float | None = None) -> VModelView:
        s = self.store
        deadline = s._deadline(budget_s)
        tenant, public = s._owner(principal, name)
        internal = internal_id(tenant, public)
        record = s.namespace.vmodel(principal, name)
        if record is None or record.name != internal:
            raise s._unknown(name)
        key = s.keys.vmodel(internal)
        for _ in range(CAS_ATTEMPTS):
            kv = await s.client.get(key)
            current = types.decode(VModelRecord, kv.value) if kv is not None else None
            if current is None:
                raise s._unknown(name)
            ro = Rollout.from_record(current.rollout)
            if ro is None or not ro.running:
                raise _failed(name, "no rollout is running" + (f" (the last one {ro.state.replace('_', ' ')})"
                                                               if ro else ""))
            new = aborted(current, ro, s.clock.unix_ms())
            try:
                revision = await s._cas(key, kv.mod_revision if kv else 0, new)
            except Conflict:
                continue
            await s._visible(revision, deadline, name)
            return s.view_of(principal, s.state.vmodels.get(internal, new))
        raise Conflict(f"vmodel {errors.quote_id(name)} kept changing while aborting its rollout; retry")


def aborted(record: VModelRecord, ro: Rollout, now_ms: int) -> VModelRecord:
    """`record` with its running rollout `ro` aborted: all traffic on the stable target."""
    history = [*ro.history, {"percent": ro.percent, "started_unix_ms": ro.step_started_unix_ms,
                             "ended_unix_ms": now_ms, "outcome": rollout.ABORTED, "figures": dict(ro.figures)}]
    done = dataclasses.replace(ro, state=rollout.ABORTED, finished_unix_ms=now_ms, reason="aborted (AbortRollout)",
                               history=history[-rollout.HISTORY_LIMIT:])
    return dataclasses.replace(record, active=done.weights(), rollout=done.to_record(), updated_unix_ms=now_ms,
                               tags=rollout.without_tag(record.tags, ro))

