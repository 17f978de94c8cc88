"""VModels in etcd: SetVModel / GetVModel / ListVModels / DeleteVModel, and the zero-downtime switch.

Records live at keys.vmodel(<internal name>) (mesh/types.py VModelRecord); every write is a
compare-and-swap on the key's mod_revision, and is answered once this router's watched view
shows it (read your writes, as router/registry.py). A vmodel belongs to a tenant like a model
(internal name `<tenant>:<name>`) and names that tenant's models only; another tenant's
vmodel answers exactly as an absent one.

The switch. A SetVModel whose targets are all already routed to (a weight change, a target
dropped) takes effect at once. One that adds a target writes it as `pending` first (requests
keep going to `active`), makes each new target ready with as many copies as the busiest
current target has ready (at most one per live pod) through the router's ordinary miss path —
placement's EnsureLoaded, asked again with the pods that already hold a copy excluded for
each further copy (router/miss.py, placement/controller.py) — and only then moves `pending`
to `active` with a compare-and-swap on the revision it wrote. The old targets stay loaded until
placement finds them idle: they are ordinary models.

Who completes the switch: the router handling SetVModel, within the caller's deadline. It is
the one process that already holds the caller's intent and deadline, needs no new loop or
leader-side state (the placement leader's reconcile is another helper's ground and would need
its own deadline and error reporting), and every failure leaves a safe state: past the
deadline (or if this router dies) the record keeps `pending` with a note, traffic stays on
`active`, and the same SetVModel again (any router) resumes the switch — retrying is always
safe, as for RegisterModel — and every router's `sweep` completes a pending switch whose new
targets are ready with the copies wanted (it loads nothing itself). A target that cannot be loaded abandons the switch (pending
cleared, the reason kept in `switch_note`) and answers FAILED_PRECONDITION. Two SetVModels
racing: the compare-and-swap lets one win, the other answers ABORTED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping

from mesh import errors, types
from mesh.clock import Clock
from mesh.errors import Conflict, DeadlineExceeded, InvalidArgument, Kind, MeshError, NotFound, Unavailable
from mesh.kv.etcd import MOD, EtcdClient, compare, put_op
from mesh.kv.keys import Keys
from mesh.rollout import Rollout
from mesh.state import MeshState
from mesh.types import VModelRecord
from router import vmodels
from router.auth import Principal
from router.miss import MissHandler
from router.registry import check_model_id, unknown_model
from router.table import RouteTable
from router.tenancy import SEP, Namespace, internal_id
from router.vmodels import Wanted

CAS_ATTEMPTS = 5
SWEEP_S = 5.0  # how often every router looks for pending switches whose targets are ready
log = logging.getLogger(__name__)
_LOAD_FAILED = frozenset({Kind.FAILED_PRECONDITION, Kind.NOT_FOUND, Kind.INVALID_ARGUMENT})


@dataclasses.dataclass(frozen=True)
class VModelView:
    """A vmodel as its caller may see it: ids as the caller knows them."""

    name: str
    active: Mapping[str, int]
    pending: Mapping[str, int]
    sticky_header: str
    tags: tuple[tuple[str, str, str], ...]  # (header, value, model id)
    ready: Mapping[str, int]  # model id -> ready copies (active, pending and tag targets)
    switch_note: str = ""
    updated_unix_ms: int = 0
    switch_started_unix_ms: int = 0
    rollout: Rollout | None = None  # the last rollout started, its model ids as the caller knows them


class VModelStore:
    def __init__(self, client: EtcdClient, keys: Keys, state: MeshState, table: RouteTable, miss: MissHandler,
                 namespace: Namespace, clock: Clock, default_deadline_s: float) -> None:
        self.client = client
        self.keys = keys
        self.state = state
        self.table = table
        self.miss = miss
        self.namespace = namespace
        self.clock = clock
        self.default_deadline_s = default_deadline_s

    # -- reads --------------------------------------------------------------------------------

    def get(self, principal: Principal, name: str) -> VModelView:
        record = self.namespace.vmodel(principal, name)
        if record is None:
            raise self._unknown(name)
        return self.view_of(principal, record)

    def list(self, principal: Principal) -> list[VModelView]:
        shown = [self.view_of(principal, r) for r in self.state.vmodels.values()
                 if principal.admin or r.tenant == principal.tenant]
        return sorted(shown, key=lambda v: v.name)

    def view_of(self, principal: Principal, record: VModelRecord) -> VModelView:
        def show(model_id: str) -> str:
            return model_id if principal.admin else model_id.partition(SEP)[2] or model_id

        return VModelView(
            name=show(record.name),
            active={show(m): w for m, w in sorted(record.active.items())},
            pending={show(m): w for m, w in sorted(record.pending.items())},
            sticky_header=record.sticky_header,
            tags=tuple((h, v, show(m)) for h, routes in sorted(record.tags.items()) for v, m in sorted(routes.items())),
            ready={show(m): len(self.table.ready(m)) for m in sorted(vmodels.targets_of(record))},
            switch_note=record.switch_note,
            updated_unix_ms=record.updated_unix_ms,
            switch_started_unix_ms=record.switch_started_unix_ms,
            rollout=self._shown_rollout(record, show),
        )

    @staticmethod
    def _shown_rollout(record: VModelRecord, show: Callable[[str], str]) -> Rollout | None:
        ro = Rollout.from_record(record.rollout)
        return dataclasses.replace(ro, stable=show(ro.stable), candidate=show(ro.candidate)) if ro else None

    def _unknown(self, name: str) -> MeshError:
        if not self.state.view.connected:
            return Unavailable(f"vmodel {errors.quote_id(name)} is not known to this router right now (its view "
                               "of etcd is not connected); retry")
        return NotFound(f"vmodel {errors.quote_id(name)} does not exist; create it with `mesh alias set`")

    # -- writes -------------------------------------------------------------------------------

    async def delete(self, principal: Principal, name: str, budget_s: float | None = None) -> bool:
        """Deletes the vmodel; unknown names (and another tenant's: the same answer) succeed."""
        tenant, public = self._owner(principal, name)
        internal = internal_id(tenant, public)
        existing = self.state.vmodels.get(internal)
        if existing is not None and existing.tenant != tenant:
            return False
        deadline = self._deadline(budget_s)
        existed = await self.client.delete(self.keys.vmodel(internal)) > 0
        await self._until(lambda: internal not in self.state.vmodels, deadline,
                          f"vmodel {errors.quote_id(name)} is deleted, but this router still shows it; retry shortly")
        return existed

    async def set(self, principal: Principal, wanted: Wanted, budget_s: float | None = None) -> VModelView:
        """Creates or changes a vmodel (see the module docstring for the switch)."""
        deadline = self._deadline(budget_s)
        tenant, public = self._owner(principal, wanted.name)
        vmodels.check_shape(wanted)
        internal = internal_id(tenant, public)
        if self.namespace.lookup(Principal(tenant=tenant), public) is not None:
            raise InvalidArgument(f"a model is registered as {errors.quote_id(wanted.name)}: give the vmodel "
                                  "a name of its own")
        desired = {self._target(principal, tenant, m): w for m, w in wanted.targets}
        tags: dict[str, dict[str, str]] = {}
        for header, value, model_id in wanted.tags:
            tags.setdefault(header, {})[value] = self._target(principal, tenant, model_id)
        key = self.keys.vmodel(internal)
        for _ in range(CAS_ATTEMPTS):
            kv = await self.client.get(key)
            current = types.decode(VModelRecord, kv.value) if kv is not None else None
            running = Rollout.from_record(current.rollout) if current is not None else None
            if running is not None and running.running:
                raise MeshError(f"vmodel {errors.quote_id(wanted.name)} has a rollout running, which sets its "
                                "weights: abort it first (`mesh alias rollout NAME --abort`)",
                                kind=Kind.FAILED_PRECONDITION)
            now = self.clock.unix_ms()
            base = current or VModelRecord(name=internal, tenant=tenant)
            record = dataclasses.replace(base, sticky_header=wanted.sticky_header, tags=tags, updated_unix_ms=now)
            added = [m for m, w in desired.items() if w > 0 and (current is None or current.active.get(m, 0) <= 0)]
            if current is None or not added:
                record = dataclasses.replace(record, active=desired, pending={}, switch_note="",
                                             switch_started_unix_ms=0)
            elif dict(current.pending) != desired:
                record = dataclasses.replace(record, pending=desired, switch_note="", switch_started_unix_ms=now)
            try:
                revision = await self._cas(key, kv.mod_revision if kv else 0, record)
            except Conflict:
                continue
            await self._visible(revision, deadline, wanted.name)
            if record.pending:
                await self._switch(wanted.name, key, record, deadline)
            return self.view_of(principal, self.state.vmodels.get(internal, record))
        raise Conflict(f"vmodel {errors.quote_id(wanted.name)} kept changing while setting it; retry")

    async def _switch(self, name: str, key: str, record: VModelRecord, deadline: float) -> None:
        """Makes the pending targets ready, then moves them to active (module docstring)."""
        pending = dict(record.pending)
        added = [m for m, w in sorted(pending.items()) if w > 0 and record.active.get(m, 0) <= 0]
        wanted = self._copies_wanted(record)
        notes = []
        try:
            for model_id in added:
                got = await self._warm(model_id, wanted, deadline)
                if got < wanted:
                    notes.append(f"{self._show_note(model_id)}: {got} of {wanted} copies (no room for more)")
        except MeshError as exc:
            note = exc.message
            if exc.kind in _LOAD_FAILED or isinstance(exc, NotFound):
                await self._finish(key, pending, lambda r: dataclasses.replace(
                    r, pending={}, switch_note=f"switch abandoned: {note}"[:500]), deadline)
                raise MeshError(f"vmodel {errors.quote_id(name)} stays on its current targets: {note}",
                                kind=Kind.FAILED_PRECONDITION) from None
            await self._finish(key, pending, lambda r: dataclasses.replace(r, switch_note=f"pending: {note}"[:500]),
                               deadline, strict=False)
            if isinstance(exc, DeadlineExceeded):
                raise DeadlineExceeded(
                    f"vmodel {errors.quote_id(name)}: the new target is not ready yet ({note}); traffic stays on "
                    "the current targets; call SetVModel again with the same spec to resume") from None
            raise
        await self._finish(key, pending, self._activate(pending, "; ".join(notes)), deadline)

    def _activate(self, pending: dict[str, int], note: str = "") -> Callable[[VModelRecord], VModelRecord]:
        """The change completing a switch: the pending targets become the active ones."""
        return lambda r: dataclasses.replace(r, active=pending, pending={}, switch_note=note,
                                             switch_started_unix_ms=0, updated_unix_ms=self.clock.unix_ms())

    def _show_note(self, model_id: str) -> str:
        return model_id.partition(SEP)[2] or model_id

    def _copies_wanted(self, record: VModelRecord) -> int:
        """As many copies as the busiest current target has ready, at least one, at most one
        per live pod that is not draining."""
        current = max((len(self.table.ready(m)) for m, w in record.active.items() if w > 0), default=0)
        pods = sum(1 for inst in self.state.instances.values() if not inst.draining)
        return max(1, min(current, pods))

    async def _warm(self, model_id: str, copies: int, deadline: float) -> int:
        """Loads `model_id` until this router's table shows `copies` ready copies; returns how
        many it got (fewer only when placement has no room for another)."""
        while True:
            ready = self.table.ready(model_id)
            if len(ready) >= copies:
                return len(ready)
            holders = frozenset(c.instance_id for c in ready)
            try:
                await self.miss.ensure(model_id, deadline, holders)
            except MeshError as exc:
                if ready and exc.kind in (Kind.RESOURCE_EXHAUSTED, Kind.FAILED_PRECONDITION):
                    return len(ready)  # no pod can take one more: switch with those there are
                raise
            try:  # placement answered: wait for this router's table to show the new copy
                async with asyncio.timeout_at(deadline):
                    await self.state.wait_for(self._more_than(model_id, len(ready)), None)
            except TimeoutError:
                raise DeadlineExceeded(f"{len(ready)} of {copies} copies ready") from None

    def _more_than(self, model_id: str, had: int) -> Callable[[], bool]:
        return lambda: len(self.table.ready(model_id)) > had

    async def _finish(self, key: str, pending: Mapping[str, int], change: Callable[[VModelRecord], VModelRecord],
                      deadline: float,
                      strict: bool = True) -> None:
        """Applies `change` to the record if its pending switch is still `pending` (CAS);
        raises Conflict when another SetVModel replaced it (strict) or ignores it."""
        for _ in range(CAS_ATTEMPTS):
            kv = await self.client.get(key)
            current = types.decode(VModelRecord, kv.value) if kv is not None else None
            if current is not None and not current.pending and dict(current.active) == dict(pending):
                return  # another router finished this very switch (the same SetVModel, retried)
            if current is None or dict(current.pending) != dict(pending):
                if strict:
                    raise Conflict("the vmodel was changed or deleted by another call during the switch; "
                                   "get it to see where it stands")
                return
            try:
                revision = await self._cas(key, kv.mod_revision if kv else 0, change(current))
            except Conflict:
                continue
            await self._visible(revision, deadline, current.name, strict)
            return

    async def _cas(self, key: str, mod_revision: int, record: VModelRecord) -> int:
        ok, revision = await self.client.txn([compare(key, MOD, mod_revision)], [put_op(key, types.encode(record))])
        if not ok:
            raise Conflict("vmodel changed concurrently")
        return revision

    # -- completing switches left pending ------------------------------------------------------

    async def sweep(self) -> None:
        """Completes switches whose SetVModel router went away (or gave up at its deadline) once
        their new targets are ready with the copies wanted (run under a Supervisor, on every
        router: the compare-and-swap lets one win, and a switch still being run by its
        SetVModel is completed the same way by whichever gets there first). It never loads
        anything itself: a switch whose targets are not ready waits for SetVModel again."""
        while True:
            await asyncio.sleep(SWEEP_S)
            if self.state.view.connected:
                await self.complete_ready()

    async def complete_ready(self) -> int:
        """One pass of `sweep`; returns how many switches it completed."""
        done = 0
        for internal, record in list(self.state.vmodels.items()):
            if not record.pending or not self._pending_ready(record):
                continue
            pending = dict(record.pending)
            try:
                await self._finish(self.keys.vmodel(internal), pending, self._activate(pending),
                                   self._deadline(None), strict=False)
                done += 1
            except MeshError as exc:
                log.info("vmodel %s: completing its switch failed (%s); next sweep retries", internal, exc.message)
        return done

    def _pending_ready(self, record: VModelRecord) -> bool:
        wanted = self._copies_wanted(record)
        return all(len(self.table.ready(m)) >= wanted for m, w in record.pending.items()
                   if w > 0 and record.active.get(m, 0) <= 0)

    # -- helpers ------------------------------------------------------------------------------

    def _owner(self, principal: Principal, name: str) -> tuple[str, str]:
        """(tenant, public name): an admin names another tenant's vmodel `tenant:name`."""
        tenant, public = principal.tenant, name
        if principal.admin and SEP in name:
            tenant, _, public = name.partition(SEP)
        check_model_id(public)
        return tenant, public

    def _target(self, principal: Principal, tenant: str, model_id: str) -> str:
        """The internal id of a target the caller named; NOT_FOUND for an absent model (and
        another tenant's: the same answer), INVALID_ARGUMENT for a vmodel's name or (admins)
        another tenant's model."""
        spec = self.namespace.lookup(principal, model_id)
        if spec is None and principal.admin and SEP not in model_id:
            spec = self.state.models.get(internal_id(tenant, model_id))
        if spec is None:
            if self.namespace.vmodel(principal, model_id) is not None:
                raise InvalidArgument(f"target {errors.quote_id(model_id)} is a vmodel: a vmodel's targets are models")
            if principal.admin or SEP not in model_id:  # a malformed id: INVALID_ARGUMENT, not NOT_FOUND
                check_model_id(model_id.partition(SEP)[2] or model_id)
            raise unknown_model(self.state, model_id)
        if spec.tenant != tenant:
            raise InvalidArgument(f"target {errors.quote_id(model_id)} is another tenant's model: a vmodel names "
                                  "models of its own tenant only")
        return spec.model_id

    def _deadline(self, budget_s: float | None) -> float:
        budget = self.default_deadline_s if budget_s is None else budget_s
        return asyncio.get_running_loop().time() + budget

    async def _visible(self, revision: int, deadline: float, name: str, strict: bool = True) -> None:
        view = self.state.view
        await self._until(lambda: view.revision >= revision, deadline,
                          f"vmodel {errors.quote_id(name)} is written, but this router does not show it yet; "
                          "retry shortly", strict)

    async def _until(self, done: Callable[[], bool], deadline: float, not_yet: str, strict: bool = True) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await self.state.wait_for(done, max(remaining - min(0.2, remaining / 10), 0.001))
        except TimeoutError:
            if strict:
                raise Unavailable(not_yet) from None

