"""EnsureLoaded: the domain logic behind placement's one RPC.

A ready copy answers at once; an unregistered model is NOT_FOUND; a follower answers
UNAVAILABLE so the router retries the leader. Otherwise one load per model runs however many
callers ask (single flight): wait for an assignment already in progress, or ask the planner
for a pod (and victims), write the assignment and the victims' deletions in ONE fenced
transaction, and wait for the pod to report the copy LOADED. A FAILED load, or the pod dying
mid-load, is retried once on another pod; then the caller gets FAILED_PRECONDITION with the
reasons. The reconcile loop (reconcile.py) cleans up after unregistrations, dead pods and
overcommitted pods, and adds or drops copies.

Victims are chosen by value (placement/policy.py, GDSF) when router telemetry (an
ActivitySource) is available: only it sees every request, hits included. Without it
placement falls back to the pods' own recency (GetUsage), i.e. LRU with the same guards.
Every placement and eviction is logged with its reason and written, fenced and in the same
transaction as the assignment, as a Decision at keys.decision(model_id).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.clock import Clock, SystemClock
from mesh.errors import DeadlineExceeded, LoadFailed, NoCapacity, Unavailable, model_not_found
from mesh.kv.etcd import MAX_TXN_OPS, delete_op, put_op
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.singleflight import SingleFlight
from mesh.state import MeshState
from mesh.types import Assignment, CopyRecord, CopyState, ModelSpec
from placement import planner
from placement.activity import ActivitySource, ModelActivity, NoActivity
from placement.policy import GdsfBook, Rules
from placement.usage import Usage, UsageSource

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first pod, then ONE other after a failed load


class Fence(Protocol):
    """What the controller needs of the elected leader (placement.leader.Leader)."""

    @property
    def is_leader(self) -> bool: ...

    async def write(self, ops: list[rpc_pb2.RequestOp], extra_compares: list[rpc_pb2.Compare] = ...) -> bool: ...


class _AttemptFailed(Exception):
    def __init__(self, instance_id: str, reason: str) -> None:
        super().__init__(reason)
        self.instance_id = instance_id
        self.reason = reason


class Controller:
    def __init__(
        self,
        state: MeshState,
        leader: Fence,
        settings: PlacementSettings,
        metrics: Metrics,
        usage: UsageSource,
        clock: Clock | None = None,
        activity: ActivitySource | None = None,
    ) -> None:
        self.state = state
        self.keys = state.keys
        self.leader = leader
        self.settings = settings
        self.metrics = metrics
        self.usage = usage
        self.clock = clock or SystemClock()
        self.flights: SingleFlight[str, list[CopyRecord]] = SingleFlight()
        self.activity: ActivitySource = activity or NoActivity()
        self.book = GdsfBook(aging_period=100_000)
        self.last_activity: dict[str, ModelActivity] | None = None  # None: telemetry unavailable
        self._seen_use: dict[str, int] = {}  # model -> last use already fed to the book
        self.pod_last_used: dict[str, int] = {}  # model -> last use a pod reported (GetUsage)

    @property
    def rules(self) -> Rules:
        s = self.settings
        return Rules(probation_hits=s.probation_hits, min_residency_ms=int(s.min_residency_s * 1000),
                     in_use_ms=int(s.in_use_s * 1000))

    async def refresh_activity(self) -> dict[str, ModelActivity] | None:
        """Reads router telemetry and feeds new uses to the GDSF book (None: unavailable)."""
        now = self.clock.unix_ms()
        try:
            snap = await self.activity.snapshot(now)
        except Exception as exc:  # noqa: BLE001 - telemetry is optional; a failure means "unavailable"
            log.info("activity telemetry unavailable (%s); using pod-reported recency", exc)
            snap = None
        self.last_activity = snap
        for model_id, act in sorted((snap or {}).items()):
            if act.last_used_ms > self._seen_use.get(model_id, 0) and model_id in self.state.models:
                self._seen_use[model_id] = act.last_used_ms
                stats = self.state.stats.get(model_id)
                size = (stats.size_bytes if stats else 0) or self.settings.default_model_bytes
                self.book.set(model_id, size, stats.load_ms if stats else 0, max(act.requests, 1))
        for model_id in [m for m in self._seen_use if m not in self.state.models]:
            self._seen_use.pop(model_id)
            self.book.forget(model_id)
        return snap

    def decision_op(self, model_id: str, action: str, instance_id: str, reason: str) -> rpc_pb2.RequestOp:
        """The fenced write of a Decision (also logged and counted)."""
        log.info("decision: model %s %s on %s: %s", model_id, action, instance_id or "-", reason)
        self.metrics.decisions.labels(action).inc()
        record = types.Decision(model_id, action, instance_id, reason, self.clock.unix_ms())
        return put_op(self.keys.decision(model_id), types.encode(record))

    def assignment_for(self, spec: ModelSpec, instance_id: str, predicted: int) -> Assignment:
        """The assignment record placing `spec` on `instance_id`."""
        now = self.clock.unix_ms()
        return Assignment(
            spec.model_id, instance_id, spec.storage_uri, spec.sha256, predicted, now,
            max_batch_size=spec.max_batch_size, max_queue_delay_us=spec.max_queue_delay_us,
        )

    async def close(self) -> None:
        await self.flights.close()

    # -- EnsureLoaded ---------------------------------------------------------------------------

    async def ensure_loaded(self, model_id: str, timeout: float) -> list[CopyRecord]:  # noqa: ASYNC109
        """Returns the ready copies of `model_id`, loading it first if none is ready."""
        if model_id not in self.state.models:
            raise model_not_found(model_id)
        ready = self.state.ready_copies(model_id)
        if ready:
            return ready
        if not self.leader.is_leader:
            raise Unavailable("not the placement leader; retry on the current leader")
        try:
            async with asyncio.timeout(timeout):
                return await self.flights.do(model_id, lambda: self._load(model_id))
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{model_id}' was not loaded within the caller's deadline ({timeout:.1f}s); "
                "the load goes on, retry shortly"
            ) from None

    async def _load(self, model_id: str) -> list[CopyRecord]:
        """The shared load: at most ATTEMPTS pods, each bounded by settings.load_timeout_s."""
        failures: list[str] = []
        excluded: set[str] = set()
        while len(failures) < ATTEMPTS:
            spec = self.state.models.get(model_id)
            if spec is None:
                raise model_not_found(model_id)
            ready = self.state.ready_copies(model_id)
            if ready:
                return ready
            target = self._in_progress(model_id, excluded) or await self._place(spec, excluded)
            try:
                return await self._wait_loaded(model_id, target)
            except _AttemptFailed as failed:
                log.warning("model %s failed on %s: %s", model_id, failed.instance_id, failed.reason)
                failures.append(f"{failed.instance_id}: {failed.reason}")
                excluded.add(failed.instance_id)
                await self._unassign(model_id, failed.instance_id)
        self.metrics.placements.labels("load_failed").inc()
        raise LoadFailed(f"model {model_id} failed to load: {'; '.join(failures)}")

    def _in_progress(self, model_id: str, excluded: set[str]) -> str | None:
        """A live pod already assigned the model (a load in progress), to wait for."""
        live = sorted(
            i for i in self.state.assigned_instances(model_id)
            if i in self.state.instances and i not in excluded
        )
        return live[0] if live else None

    async def _place(self, spec: ModelSpec, excluded: set[str]) -> str:
        model_id = spec.model_id
        stats = self.state.stats.get(model_id)
        predicted = (stats.size_bytes if stats else 0) or self.settings.default_model_bytes
        if self.last_activity is None:  # no telemetry: the book learns from misses alone
            self.book.touch(model_id, predicted, stats.load_ms if stats else 0)
        plan = self._plan(model_id, predicted, self.pod_views(), excluded)
        if plan.victims:
            # Recency and value only matter when choosing victims: refresh them, plan again.
            usage = await self.gather_usage()
            await self.refresh_activity()
            plan = self._plan(model_id, predicted, self.pod_views(usage), excluded)
        assignment = self.assignment_for(spec, plan.instance_id, predicted)
        evictions = [
            [delete_op(self.keys.assignment(plan.instance_id, v)), self.decision_op(v, "evicted", plan.instance_id, why)]
            for v, why in zip(plan.victims, plan.victim_reasons, strict=False)
        ]
        placing = [
            put_op(self.keys.assignment(plan.instance_id, model_id), types.encode(assignment)),
            self.decision_op(model_id, "placed", plan.instance_id, plan.reason),
        ]
        if not await self._write_plan(evictions, placing):
            self.metrics.placements.labels("lost_leadership").inc()
            raise Unavailable("placement lost leadership while placing the model; retry on the new leader")
        self.metrics.placements.labels("ok").inc()
        if plan.victims:
            self.metrics.evictions.labels("capacity").inc(len(plan.victims))
            for victim in plan.victims:
                self.book.evicted(victim)
        log.info(
            "placed model %s (%d bytes predicted) on %s, evicting %s (%d bytes): %s",
            model_id, predicted, plan.instance_id, list(plan.victims) or "nothing",
            plan.evicted_bytes, plan.reason,
        )
        return plan.instance_id

    async def _write_plan(self, evictions: list[list[rpc_pb2.RequestOp]], placing: list[rpc_pb2.RequestOp]) -> bool:
        """Evictions and the new assignment in one fenced transaction when etcd allows that many
        operations; otherwise the evictions first, in chunks, then the assignment (evicting
        early is safe: the room is made before the load is asked for)."""
        flat = [op for pair in evictions for op in pair]
        if len(flat) + len(placing) < MAX_TXN_OPS:
            return await self.leader.write(flat + placing)
        step = (MAX_TXN_OPS - 1) // 2
        for start in range(0, len(evictions), step):
            if not await self.leader.write([op for pair in evictions[start : start + step] for op in pair]):
                return False
        return await self.leader.write(placing)

    def _plan(
        self, model_id: str, predicted: int, pods: list[planner.PodView], excluded: set[str]
    ) -> planner.Plan:
        try:
            return planner.plan(model_id, predicted, pods, excluded, now_ms=self.clock.unix_ms(),
                                rules=self.rules, frequency=self._frequency(model_id))
        except (NoCapacity, Unavailable) as exc:
            self.metrics.placements.labels("no_capacity").inc()
            log.warning("cannot place model %s (%d bytes): %s", model_id, predicted, exc)
            raise

    def _frequency(self, model_id: str) -> float:
        if self.last_activity is None:
            return self.book.frequency(model_id)
        act = self.last_activity.get(model_id)
        return float(act.requests) if act else self.book.frequency(model_id)

    async def _wait_loaded(self, model_id: str, instance_id: str) -> list[CopyRecord]:
        """Waits for the copy on `instance_id` to be LOADED; raises _AttemptFailed otherwise."""
        akey = self.keys.assignment(instance_id, model_id)
        budget = self.settings.load_timeout_s

        def assignment_seen() -> bool:
            return instance_id not in self.state.instances or akey_present()

        def akey_present() -> bool:
            return model_id in self.state.assignments.get(instance_id, {})

        try:
            async with asyncio.timeout(budget):
                # Our own write may not have reached the view yet: wait to see it first.
                await self.state.wait_for(assignment_seen, None)
                since = self.state.view.revisions().get(akey, 0)
                outcome = await self.state.wait_for(lambda: self._outcome(model_id, instance_id, since), None)
        except TimeoutError:
            raise _AttemptFailed(instance_id, f"still not loaded after {budget:.0f}s "
                                 "(MESH_PLACEMENT_LOAD_TIMEOUT_S)") from None
        status, reason = cast(tuple[str, str], outcome)
        if status == "loaded":
            return self.state.ready_copies(model_id)
        if status == "unregistered":
            raise model_not_found(model_id)
        raise _AttemptFailed(instance_id, reason)

    def _outcome(self, model_id: str, instance_id: str, since: int) -> tuple[str, str] | None:
        if model_id not in self.state.models:
            return ("unregistered", "")
        if self.state.ready_copies(model_id):
            return ("loaded", "")
        if instance_id not in self.state.instances:
            return ("failed", "the runtime pod went away while loading")
        copy = self.state.copies.get(model_id, {}).get(instance_id)
        if copy is not None and copy.state is CopyState.FAILED:
            # A FAILED report older than the assignment is from an earlier attempt: not ours.
            rev = self.state.view.revisions().get(self.keys.copy(model_id, instance_id), 0)
            if rev > since:
                return ("failed", copy.error or "load failed (no reason given)")
        if model_id not in self.state.assignments.get(instance_id, {}):
            return ("failed", "the assignment was removed while loading")
        return None

    async def _unassign(self, model_id: str, instance_id: str) -> None:
        if not await self.leader.write([delete_op(self.keys.assignment(instance_id, model_id))]):
            raise Unavailable("placement lost leadership while retrying a failed load; retry")

    # -- the pods as the planner sees them -------------------------------------------------------

    async def gather_usage(self, instance_ids: list[str] | None = None) -> dict[str, dict[str, Usage]]:
        """instance id -> the pod's GetUsage answer, for the pods that answered (in parallel)."""
        ids = sorted(self.state.instances) if instance_ids is None else instance_ids
        addresses = [self.state.instances[i].address for i in ids if i in self.state.instances]
        answers = await asyncio.gather(*(self.usage.get(a) for a in addresses))
        out = {i: a for i, a in zip(ids, answers, strict=False) if a is not None}
        for models in out.values():
            for model_id, used in models.items():
                self.pod_last_used[model_id] = max(self.pod_last_used.get(model_id, 0), used.last_used_ms)
        return out

    def last_used_ms(self, model_id: str) -> int:
        """The last use of a model any source reported (telemetry, pods' GetUsage); 0: none."""
        act = (self.last_activity or {}).get(model_id)
        return max(act.last_used_ms if act else 0, self.pod_last_used.get(model_id, 0))

    def pod_views(self, usage: dict[str, dict[str, Usage]] | None = None) -> list[planner.PodView]:
        return [self.pod_view(i, (usage or {}).get(i)) for i in sorted(self.state.instances)]

    def pod_view(self, instance_id: str, usage: dict[str, Usage] | None = None) -> planner.PodView:
        """A live pod's capacity and its assigned models' bytes, recency and in-flight work.

        Bytes: the copy's measured size, else the model's last measured size, else the
        predicted bytes of the assignment, else settings.default_model_bytes. A FAILED copy
        holds no memory. Recency: the newer of router telemetry and the pod's GetUsage answer,
        else the copy's last update. Value and frequency: the GDSF book. Pinned: the model has
        no more live copies than its registered min_copies.
        """
        inst = self.state.instances[instance_id]
        models = []
        for model_id, assignment in sorted(self.state.assignments.get(instance_id, {}).items()):
            copy = self.state.copies.get(model_id, {}).get(instance_id)
            stats = self.state.stats.get(model_id)
            size = (
                (copy.size_bytes if copy else 0)
                or (stats.size_bytes if stats else 0)
                or assignment.predicted_bytes
                or self.settings.default_model_bytes
            )
            failed = copy is not None and copy.state is CopyState.FAILED
            loaded = copy is not None and copy.state is not CopyState.LOADING
            used = (usage or {}).get(model_id)
            fallback_ms = copy.updated_unix_ms if copy else assignment.assigned_unix_ms
            act = (self.last_activity or {}).get(model_id)
            last_used = max(used.last_used_ms if used else fallback_ms, act.last_used_ms if act else 0)
            spec = self.state.models.get(model_id)
            live = sum(1 for i in self.state.assigned_instances(model_id) if i in self.state.instances)
            models.append(
                planner.PodModel(
                    model_id,
                    0 if failed else size,
                    last_used_ms=last_used,
                    in_flight=used.in_flight if used else 0,
                    loaded=loaded,
                    loaded_unix_ms=copy.updated_unix_ms if copy else assignment.assigned_unix_ms,
                    value=self.book.value(model_id) if self.last_activity is not None else 0.0,
                    frequency=self._frequency(model_id),
                    pinned=spec is not None and 0 < live <= spec.min_copies,
                )
            )
        return planner.PodView(instance_id, inst.capacity_bytes, tuple(models))
