"""The one decider: every assignment placement writes is planned and written here, in turn.

EnsureLoaded (controller.py), proactive copies, min_copies, re-placements and draining
(copies.py) and the clean-up (reconcile.py) SUBMIT INTENTS — place a model, add a copy, remove
assignments, relieve an overcommitted pod — to one worker task, which owns the ledger
(ledger.py): it plans each intent with the pure planner against ledger state (the view plus its
own writes the view has not shown yet, with the predicted bytes of assignments in flight
reserved), writes the result in one transaction fenced twice — by the leader key (Leader.write)
and by the target pod's assignment prefix (ledger.fence) — and records the write in the ledger
before taking the next intent. So two misses can never book the same free bytes, and a plan
made on a stale view is rejected by etcd, not applied.

The worker never waits on anything but etcd: an intent that needs the pods' GetUsage answers
(victims must be chosen) or a fresher view (a fence failed) is handed back to its submitter,
which fetches or waits and submits again. An EnsureLoaded intent is taken as soon as the
worker is free (no batching delay on the miss path).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.errors import NoCapacity, NotFound, Unavailable, model_not_found
from mesh.kv.etcd import MAX_TXN_OPS, delete_op, put_op
from mesh.types import Assignment
from placement import planner, tenancy
from placement.ledger import Ledger
from placement.usage import Usage

if TYPE_CHECKING:
    from placement.controller import Controller

log = logging.getLogger(__name__)

ROOM_RECHECK_S = 1.0  # while waiting for room, plan again at least this often
REPLANS = 8  # fence failures / usage fetches before an intent gives up (UNAVAILABLE)
VIEW_WAIT_S = 1.0  # bound on waiting for the view to move after a fence failure
TXN_CHUNK = 100  # deletions per transaction (< MAX_TXN_OPS, leaving room for the decisions)


class _NeedUsage(Exception):
    """The plan evicts: choose victims again with the pods' GetUsage answers."""


class _Stale(Exception):
    """A pod fence failed (or too many own writes are unseen): re-plan on a fresher view."""


@dataclasses.dataclass
class Place:
    """Put a copy of `model_id` on some pod. action: placed | copy_added | replaced."""

    model_id: str
    action: str = "placed"
    why: str = ""
    evict: bool = True
    exclude: frozenset[str] = frozenset()
    usage: dict[str, dict[str, Usage]] | None = None


@dataclasses.dataclass
class Unassign:
    """Delete assignments [(instance, model, reason)], with an optional Decision per model."""

    items: list[tuple[str, str, str]]
    action: str = ""  # a Decision with this action and the item's reason; "" for none


@dataclasses.dataclass
class Relieve:
    """Evict from a pod whose measured use exceeds its capacity."""

    instance_id: str
    usage: dict[str, Usage] | None = None


Intent = Place | Unassign | Relieve


@dataclasses.dataclass(frozen=True)
class Placed:
    """A Place intent written: the pod, the assignment record's bytes as written, and the
    victims whose assignments on that pod the same write (or the chunks before it) deleted."""

    instance_id: str
    assignment: bytes
    victims: tuple[str, ...] = ()


class Decider:
    def __init__(self, controller: Controller) -> None:
        self.ctl = controller
        self.state = controller.state
        self.keys = controller.state.keys
        self.ledger = Ledger(controller)
        self._queue: asyncio.Queue[tuple[Intent, asyncio.Future[Any]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._changes = 0  # bumped on every state change: "has anything moved since?"
        self.state.on_change(self._on_change)

    def _on_change(self, section: str, ids: tuple[str, ...]) -> None:
        self._changes += 1

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            fut.cancel()

    # -- submitting -----------------------------------------------------------------------------

    async def _submit(self, intent: Intent) -> Any:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="placement-decider")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((intent, fut))
        return await fut

    async def _until_decided(self, intent: Place | Relieve, fetch_usage: Callable[[], Awaitable[None]]) -> Any:
        for _ in range(REPLANS):
            try:
                return await self._submit(intent)
            except _NeedUsage:
                await fetch_usage()
            except _Stale:
                await self._view_moves()
        raise Unavailable("placement could not make a plan the pods' assignments did not overtake; retry")

    async def place(self, intent: Place) -> Placed:
        """Plans and writes the placement. Raises NoCapacity / Unavailable.

        A plan that must evict is made again with the pods' GetUsage answers (recency and
        in-flight counts); with router telemetry, answers younger than `usage_max_age_s` (a
        direct Load's answer carries one) are reused, so a stream of misses does not ask the
        pods each time. NoCapacity
        while loads are in flight waits for one to finish (its measurement may free room) and
        tries again, until the caller's deadline."""
        async def fetch() -> None:
            # Recent answers suffice only beside router telemetry (recency from every router,
            # which lags by its flush interval anyway); without it the pods' answers are the
            # only recency there is, and a request since the last answer must count (LRU).
            telemetry = self.ctl.last_activity is not None
            max_age = self.ctl.settings.usage_max_age_s if telemetry else 0.0
            intent.usage = await self.ctl.gather_usage(max_age_s=max_age)
            await self.ctl.refresh_activity()

        while True:
            changes = self._changes
            try:
                return await self._until_decided(intent, fetch)
            except NoCapacity as exc:
                waiting = self.ledger.in_flight() if intent.evict else 0
                if not waiting:
                    raise
                log.info("no room for model %s while %d loads are in flight (%s); waiting for one",
                         intent.model_id, waiting, exc)
            # Room may come back when a load in flight is measured or fails: wait for a change
            # (re-checking now and then: an own write the view never confirms expires by time).
            def moved(seen: int = changes) -> bool:
                return self._changes != seen

            with contextlib.suppress(TimeoutError):
                await self.state.wait_for(moved, ROOM_RECHECK_S)

    async def add_copy(self, intent: Place) -> str | None:
        """A proactive copy; None when no pod can take it (no waiting)."""
        try:
            placed = await self._until_decided(intent, self._no_usage)
            return placed.instance_id
        except (NoCapacity, Unavailable, NotFound) as exc:
            log.info("no %s for model %s: %s", intent.action, intent.model_id, exc)
            return None

    async def _no_usage(self) -> None:
        return None

    async def unassign(self, intent: Unassign) -> bool:
        """Deletes the assignments; False when leadership was lost."""
        return bool(await self._submit(intent))

    async def relieve(self, instance_id: str) -> int:
        """Evicts from an overcommitted pod; returns how many assignments went."""
        intent = Relieve(instance_id)

        async def fetch() -> None:
            intent.usage = (await self.ctl.gather_usage([instance_id])).get(instance_id, {})

        return int(await self._until_decided(intent, fetch) or 0)

    async def _view_moves(self) -> None:
        revision = self.state.view.revision
        try:
            await self.state.wait_for(lambda: self.state.view.revision > revision, VIEW_WAIT_S)
        except TimeoutError:
            pass

    # -- the worker -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            intent, fut = await self._queue.get()
            if fut.done():
                continue  # its caller gave up (deadline)
            try:
                if isinstance(intent, Place):
                    result: Any = await self._place(intent)
                elif isinstance(intent, Unassign):
                    result = await self._unassign(intent)
                else:
                    result = await self._relieve(intent)
            except Exception as exc:  # noqa: BLE001 - the submitter gets every failure
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)

    async def _write(self, instance_id: str, ops: list[rpc_pb2.RequestOp],
                     changes: list[tuple[str, str, Assignment | None]]) -> None:
        """One transaction fenced by the leader key and the pod's assignment prefix."""
        fence = self.ledger.fence(instance_id)
        if fence is None:
            raise _Stale()
        since = self.state.view.revision
        if await self.ctl.leader.write(ops, fence):
            self.ledger.record(changes, since)
            return
        if self.ctl.leader.is_leader:
            self.ctl.metrics.placements.labels("stale_plan").inc()
            log.info("a plan for pod %s was made on a stale view; planning again", instance_id)
            raise _Stale()
        self.ctl.metrics.placements.labels("lost_leadership").inc()
        raise Unavailable("placement lost leadership while placing the model; retry on the new leader")

    async def _place(self, intent: Place) -> Placed:
        ctl, model_id = self.ctl, intent.model_id
        spec = self.state.models.get(model_id)
        if spec is None:
            raise model_not_found(model_id)
        if not ctl.leader.is_leader:
            raise Unavailable("not the placement leader; retry on the current leader")
        exclude = set(intent.exclude) | self.ledger.draining()
        pods = self.ledger.pod_views(intent.usage)
        live = [p for p in pods if p.instance_id not in exclude]
        size = self.ledger.size(model_id, exclude)
        predicted = size.bytes
        if size.is_prior and live and predicted > max(p.capacity_bytes for p in live):
            # A guess larger than any pod would refuse a model that may well fit: book a whole pod.
            predicted = max(p.capacity_bytes for p in live)
        now_ms, frequency = ctl.clock.unix_ms(), ctl.frequency(model_id)
        capped = self._cap_victims(spec, predicted, pods, intent, now_ms, frequency)
        if capped:
            pods = tenancy.without(pods, capped)
            live = [p for p in pods if p.instance_id not in exclude]
        candidates = [p for p in live if not p.holds(model_id)]
        if intent.evict and intent.usage is None and candidates and all(p.free_bytes < predicted for p in candidates):
            raise _NeedUsage()  # victims must be chosen: with the pods' answers (and only then built)
        budgets = tenancy.budgets(self.state.tenants, spec.tenant, self.ledger.tenant_bytes)
        plan = planner.plan(model_id, predicted, pods, exclude, now_ms=now_ms, rules=ctl.rules,
                            evict=intent.evict, frequency=frequency, size_note=size.how, budgets=budgets or None)
        if plan.victims and intent.usage is None:
            raise _NeedUsage()
        target = plan.instance_id
        assignment = ctl.assignment_for(spec, target, predicted)
        raw = types.encode(assignment)
        why = f"{intent.why}; {plan.reason}" if intent.why else plan.reason
        placing = [put_op(self.keys.assignment(target, model_id), raw),
                   ctl.decision_op(model_id, intent.action, target, why)]
        cap_why = (f"evicted for model '{model_id}': its tenant's memory cap "
                   f"({tenancy.tenant_label(spec.tenant)}) leaves no room otherwise")
        elsewhere: dict[str, list[str]] = {}
        for instance_id, victim in capped:
            if instance_id != target:
                elsewhere.setdefault(instance_id, []).append(victim.model_id)
        for instance_id, victims in sorted(elsewhere.items()):
            # The tenant's own copies on other pods go first, fenced per pod (evicting early is
            # safe: it only makes room).
            await self._write(instance_id, [op for v in victims for op in (
                delete_op(self.keys.assignment(instance_id, v)), ctl.decision_op(v, "evicted", instance_id, cap_why))],
                [(instance_id, v, None) for v in victims])
        on_target = [(v.model_id, cap_why) for i, v in capped if i == target]
        target_victims = [v for v, _ in on_target] + list(plan.victims)
        evictions = [(v, [delete_op(self.keys.assignment(target, v)), ctl.decision_op(v, "evicted", target, r)])
                     for v, r in [*on_target, *zip(plan.victims, plan.victim_reasons, strict=False)]]
        flat = [op for _, pair in evictions for op in pair]
        if len(flat) + len(placing) < MAX_TXN_OPS:
            await self._write(target, flat + placing,
                              [(target, v, None) for v in target_victims] + [(target, model_id, assignment)])
        else:
            # Too many for one transaction: the evictions first, in chunks (evicting early is
            # safe: the room is made before the load is asked for), then the assignment.
            step = (MAX_TXN_OPS - 1) // 2
            for start in range(0, len(evictions), step):
                chunk = evictions[start : start + step]
                await self._write(target, [op for _, pair in chunk for op in pair],
                                  [(target, v, None) for v, _ in chunk])
            await self._write(target, placing, [(target, model_id, assignment)])
        if plan.victims or capped:  # idle at eviction; hot ones are pressure (placement/pressure.py)
            ctl.pressure.evicted([m for p in pods if p.instance_id == target for m in p.models
                                  if m.model_id in plan.victims] + [v for _, v in capped], now_ms)
        if plan.victims:
            ctl.metrics.evictions.labels("capacity").inc(len(plan.victims))
        if capped:
            ctl.metrics.evictions.labels("tenant_cap").inc(len(capped))
        for gone in [v.model_id for _, v in capped] + list(plan.victims):
            ctl.book.evicted(gone)
        log.info("%s model %s (%d bytes, %s) on %s, evicting %s (%d bytes)%s: %s", intent.action, model_id,
                 predicted, size.how, target, list(plan.victims) or "nothing", plan.evicted_bytes,
                 f" and for its tenant's cap {[(i, v.model_id) for i, v in capped]}" if capped else "", plan.reason)
        return Placed(target, raw, tuple(target_victims))

    def _cap_victims(self, spec: types.ModelSpec, predicted: int, pods: list[planner.PodView], intent: Place,
                     now_ms: int, frequency: float) -> list[tuple[str, planner.PodModel]]:
        """The tenant's own copies to evict so the model fits under its memory cap (tenancy.py)."""
        tspec = self.state.tenants.get(spec.tenant)
        cap = tspec.memory_cap_bytes if tspec is not None else 0
        if not cap:
            return []
        resident = self.ledger.tenant_bytes(spec.tenant)
        if resident + predicted <= cap:
            return []
        if not intent.evict:
            raise tenancy.cap_error(spec.tenant, cap, spec.model_id, predicted,
                                    f"its copies hold {resident} bytes (an extra copy never evicts)")
        if intent.usage is None:
            raise _NeedUsage()
        probation = frequency <= self.ctl.rules.probation_hits
        return tenancy.cap_victims(spec.tenant, cap, resident, spec.model_id, predicted, pods, now_ms,
                                   self.ctl.rules, probation)

    async def _unassign(self, intent: Unassign) -> bool:
        by_pod: dict[str, list[tuple[str, str]]] = {}
        for instance_id, model_id, reason in intent.items:
            by_pod.setdefault(instance_id, []).append((model_id, reason))
        per_op = 2 if intent.action else 1
        for instance_id, items in sorted(by_pod.items()):
            for start in range(0, len(items), TXN_CHUNK // per_op):
                chunk = items[start : start + TXN_CHUNK // per_op]
                ops = [delete_op(self.keys.assignment(instance_id, m)) for m, _ in chunk]
                if intent.action:
                    ops += [self.ctl.decision_op(m, intent.action, instance_id, r) for m, r in chunk]
                # Deletions only free room: fenced by the leader key alone.
                since = self.state.view.revision
                if not await self.ctl.leader.write(ops):
                    return False
                self.ledger.record(((instance_id, m, None) for m, _ in chunk), since)
        return True

    async def _relieve(self, intent: Relieve) -> int:
        ctl, instance_id = self.ctl, intent.instance_id
        if instance_id not in self.state.instances or not ctl.leader.is_leader:
            return 0
        self.ledger.expire()
        if self.ledger.measured_use(instance_id) <= self.state.instances[instance_id].capacity_bytes:
            return 0  # not over (any more): no need to build the pod's models
        pod = self.ledger.pod_view(instance_id, intent.usage)
        loaded = planner.PodView(pod.instance_id, pod.capacity_bytes, tuple(m for m in pod.models if m.loaded),
                                 held_bytes=pod.held_bytes)
        if loaded.used_bytes <= loaded.capacity_bytes:
            return 0
        if intent.usage is None:
            raise _NeedUsage()
        victims = planner.overcommit_victims(loaded, ctl.clock.unix_ms(), ctl.rules)
        if not victims:
            return 0
        why = (f"pod {instance_id} measures {loaded.used_bytes} bytes in use, over its capacity of "
               f"{loaded.capacity_bytes}")
        ops = [delete_op(self.keys.assignment(instance_id, v)) for v in victims]
        ops += [ctl.decision_op(v, "evicted", instance_id, why) for v in victims]
        await self._write(instance_id, ops, [(instance_id, v, None) for v in victims])
        ctl.pressure.evicted_from(loaded, victims, ctl.clock.unix_ms())  # idle at eviction; hot ones are pressure
        for victim in victims:
            ctl.metrics.evictions.labels("overcommit").inc()
            ctl.book.evicted(victim)
            log.info("removed assignment of model %s on %s: overcommit (%s)", victim, instance_id, why)
        return len(victims)
