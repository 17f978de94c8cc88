"""EnsureLoaded: the domain logic behind placement's one RPC.

A ready copy answers at once; an unregistered model is NOT_FOUND; a follower answers
UNAVAILABLE so the router retries the leader. Otherwise one load per model runs however many
callers ask (single flight): wait for an assignment already in progress, or submit a Place
intent to the decider (placement/decider.py), which plans against its ledger (the view plus
its own unseen writes, loads in flight reserved at their predicted size), writes the
assignment and the victims' deletions in ONE fenced transaction and answers with the pod.
Once that write succeeded the leader calls the pod's Runtime/Load with the record as written
(puller/direct.py): the pod starts at once instead of when its watch shows the write, and the
answer carries the ready copy (and the pod's usage); the EnsureLoaded answer is sent then,
while the pod's etcd report of the copy being LOADED, awaited at the same time, stays the
path for pods that do not answer the call. A FAILED load, or the pod dying mid-load, is
retried once on another pod; then the caller gets FAILED_PRECONDITION with the reasons. The
reconcile loop (reconcile.py) cleans up after unregistrations, dead pods and overcommitted
pods, and adds or drops copies, through the same decider.

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
from mesh.errors import DeadlineExceeded, LoadFailed, NoCapacity, Unavailable, model_not_found, quote_id
from mesh.kv.etcd import put_op
from mesh.metrics import Metrics
from mesh.settings import PlacementSettings
from mesh.singleflight import SingleFlight
from mesh.state import MeshState
from mesh.types import Assignment, CopyRecord, CopyState, ModelSpec
from placement import planner
from placement.activity import ActivitySource, ModelActivity, NoActivity
from placement.decider import Decider, Place, Placed, Unassign
from placement.policy import GdsfBook, Rules
from placement.pressure import Pressure
from placement.usage import Usage, UsageSource

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first pod, then ONE other after a failed load
VIEW_CATCH_UP_S = 5.0  # longest wait for this view to reach the revision a router had seen


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
        self.flights: SingleFlight[tuple[str, frozenset[str]], list[CopyRecord]] = SingleFlight()
        self.activity: ActivitySource = activity or NoActivity()
        self.book = GdsfBook(aging_period=100_000)
        self.last_activity: dict[str, ModelActivity] | None = None  # None: telemetry unavailable
        self._seen_use: dict[str, int] = {}  # model -> last use already fed to the book
        self.pod_last_used: dict[str, int] = {}  # model -> last use a pod reported (GetUsage)
        self._usage_at: dict[str, tuple[float, dict[str, Usage]]] = {}  # pod -> (monotonic, answer)
        self.decider = Decider(self)
        self.ledger = self.decider.ledger
        self.pressure = Pressure(state, leader, self.clock, metrics, settings.pressure_window_s, settings.pressure_hot_s)

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
        seen = self._seen_use
        moved = [(m, act) for m, act in (snap or {}).items() if act.last_used_ms > seen.get(m, 0)]
        for model_id, act in sorted(moved):  # only those that moved are sorted (10,000 in the fleet run)
            if model_id in self.state.models:
                self._seen_use[model_id] = act.last_used_ms
                stats = self.state.stats.get(model_id)
                size = self.ledger.size(model_id).bytes
                # The uses since the last read, added up: frequency over the model's history,
                # not the window's (a windowed count reads a Zipf tail as one-offs).
                self.book.touch(model_id, size, stats.load_ms if stats else 0, max(act.new_requests, 1))
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
            tenant=spec.tenant, credentials_ref=spec.credentials_ref,
        )

    async def close(self) -> None:
        await self.flights.close()
        await self.decider.close()

    # -- EnsureLoaded ---------------------------------------------------------------------------

    async def ensure_loaded(  # noqa: ASYNC109
        self, model_id: str, timeout: float, exclude: frozenset[str] = frozenset(), min_revision: int = 0
    ) -> list[CopyRecord]:
        """Returns the ready copies of `model_id`, loading it first if none is ready.

        `exclude`: instances the caller could not reach (a router's failed or ejected copies):
        their copies count as not ready and no copy is placed on them, so a retry can reload
        elsewhere while a dead pod's records linger until its lease lapses. `min_revision`: the
        caller's view had reached it; a model this view lacks is NOT_FOUND only once this view
        has caught up with it (a registration the router saw a moment ago).
        """
        if model_id not in self.state.models and self.state.view.revision < min_revision:
            view = self.state.view
            try:
                await self.state.wait_for(lambda: view.revision >= min_revision, min(timeout, VIEW_CATCH_UP_S))
            except TimeoutError:
                raise Unavailable(f"placement's view of etcd is behind the router's; retry "
                                  f"(model {quote_id(model_id)})") from None
        if model_id not in self.state.models:
            raise model_not_found(model_id)
        ready = self._ready(model_id, exclude)
        if ready:
            return ready
        if not self.leader.is_leader:
            raise Unavailable("not the placement leader; retry on the current leader")
        try:
            async with asyncio.timeout(timeout):
                # One flight per model and exclusion set: a caller avoiding a pod must not
                # join (and be answered by) a flight that counts that pod's copy as ready.
                return await self.flights.do((model_id, exclude), lambda: self._load(model_id, exclude))
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{model_id}' was not loaded within the caller's deadline ({timeout:.1f}s); "
                "the load goes on, retry shortly"
            ) from None

    def _ready(self, model_id: str, exclude: frozenset[str] | set[str]) -> list[CopyRecord]:
        return [c for c in self.state.ready_copies(model_id) if c.instance_id not in exclude]

    async def _load(self, model_id: str, exclude: frozenset[str] = frozenset()) -> list[CopyRecord]:
        """The shared load: at most ATTEMPTS pods, each bounded by settings.load_timeout_s."""
        failures: list[str] = []
        excluded: set[str] = set(exclude)
        while len(failures) < ATTEMPTS:
            spec = self.state.models.get(model_id)
            if spec is None:
                raise model_not_found(model_id)
            ready = self._ready(model_id, excluded)
            if ready:
                return ready
            target = self._in_progress(model_id, excluded)
            try:
                placed = None if target else await self._place(spec, excluded)
            except Unavailable:
                if not failures:
                    raise
                break  # every pod left failed it: its reasons, not "no pod" (which says retry)
            target = placed.instance_id if placed else target
            assert target is not None  # _place returns a Placed or raises
            try:
                return await self._wait_ready(model_id, target, excluded, placed)
            except _AttemptFailed as failed:
                log.warning("model %s failed on %s: %s", model_id, failed.instance_id, failed.reason)
                failures.append(f"{failed.instance_id}: {failed.reason}")
                excluded.add(failed.instance_id)
                await self._unassign(model_id, failed.instance_id)
        self.metrics.placements.labels("load_failed").inc()
        raise LoadFailed(f"model {model_id} failed to load: {'; '.join(failures)}")

    def _in_progress(self, model_id: str, excluded: set[str]) -> str | None:
        """A live pod already assigned the model (a load in progress), to wait for."""
        live = [i for i in self.ledger.live_copies(model_id) if i not in excluded]
        return live[0] if live else None

    async def _place(self, spec: ModelSpec, excluded: set[str]) -> Placed:
        """Asks the decider for a pod (evicting if need be); it writes the assignment."""
        model_id = spec.model_id
        if self.last_activity is None:  # no telemetry: the book learns from misses alone
            stats = self.state.stats.get(model_id)
            self.book.touch(model_id, self.ledger.size(model_id).bytes, stats.load_ms if stats else 0)
        try:
            placed = await self.decider.place(Place(model_id, exclude=frozenset(excluded)))
        except (NoCapacity, Unavailable) as exc:
            self.pressure.refused(model_id, self.ledger.size(model_id).bytes, exc)  # the autoscaling signal
            if not isinstance(exc, Unavailable) or self.leader.is_leader:
                self.metrics.placements.labels("no_capacity").inc()
                log.warning("cannot place model %s: %s", model_id, exc)
            raise
        self.metrics.placements.labels("ok").inc()
        return placed

    def frequency(self, model_id: str) -> float:
        """The model's use count as the book has it (router telemetry's uses added up, or the
        misses without telemetry); probation judges by it."""
        return self.book.frequency(model_id)

    async def _wait_ready(self, model_id: str, instance_id: str, excluded: set[str],
                          placed: Placed | None) -> list[CopyRecord]:
        """The pod's answer to our direct Load (when we just placed the model) or its etcd
        report, whichever comes first. Only a LOADED answer ends the wait early: a failure is
        taken from etcd, so that the model's status shows it when the caller hears of it."""
        reported = asyncio.ensure_future(self._wait_loaded(model_id, instance_id, excluded))
        direct = (asyncio.ensure_future(self._direct_load(model_id, placed))
                  if placed and self.settings.direct_load else None)
        try:
            if direct is not None:
                await asyncio.wait({reported, direct}, return_when=asyncio.FIRST_COMPLETED)
                copy = direct.result() if direct.done() else None
                if copy is not None and copy.state is CopyState.LOADED:
                    self.metrics.direct_loads.labels("loaded").inc()
                    return [copy, *(c for c in self._ready(model_id, excluded) if c.instance_id != copy.instance_id)]
            return await reported
        finally:
            for task in (reported, direct):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (reported, direct) if t is not None), return_exceptions=True)

    async def _direct_load(self, model_id: str, placed: Placed) -> CopyRecord | None:
        """Runtime/Load on the pod we just wrote the assignment for (only after the fenced
        write succeeded); None when the pod gave no copy (etcd's report is awaited then)."""
        inst = self.state.instances.get(placed.instance_id)
        if inst is None:
            return None
        answer = await self.usage.load(inst.address, model_id, placed.assignment, placed.victims,
                                       self.settings.load_timeout_s)
        if answer is None:
            self.metrics.direct_loads.labels("no_answer").inc()
            return None
        self._remember_usage(placed.instance_id, answer.usage)
        return answer.copy

    async def _wait_loaded(self, model_id: str, instance_id: str, excluded: set[str]) -> list[CopyRecord]:
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
                since = self.state.mod_revision(akey)
                outcome = await self.state.wait_for(
                    lambda: self._outcome(model_id, instance_id, since, excluded), None)
        except TimeoutError:
            raise _AttemptFailed(instance_id, f"still not loaded after {budget:.0f}s "
                                 "(MESH_PLACEMENT_LOAD_TIMEOUT_S)") from None
        status, reason = cast(tuple[str, str], outcome)
        if status == "loaded":
            return self._ready(model_id, excluded)
        if status == "unregistered":
            raise model_not_found(model_id)
        raise _AttemptFailed(instance_id, reason)

    def _outcome(self, model_id: str, instance_id: str, since: int, excluded: set[str]) -> tuple[str, str] | None:
        if model_id not in self.state.models:
            return ("unregistered", "")
        if self._ready(model_id, excluded):
            return ("loaded", "")
        if instance_id not in self.state.instances:
            return ("failed", "the runtime pod went away while loading")
        copy = self.state.copies.get(model_id, {}).get(instance_id)
        if copy is not None and copy.state is CopyState.FAILED:
            # A FAILED report older than the assignment is from an earlier attempt: not ours.
            rev = self.state.mod_revision(self.keys.copy(model_id, instance_id))
            if rev > since:
                return ("failed", copy.error or "load failed (no reason given)")
        if model_id not in self.state.assignments.get(instance_id, {}):
            return ("failed", "the assignment was removed while loading")
        return None

    async def _unassign(self, model_id: str, instance_id: str) -> None:
        if not await self.decider.unassign(Unassign([(instance_id, model_id, "failed_load")])):
            raise Unavailable("placement lost leadership while retrying a failed load; retry")

    # -- the pods as the planner sees them -------------------------------------------------------

    async def gather_usage(self, instance_ids: list[str] | None = None,
                           max_age_s: float = 0.0) -> dict[str, dict[str, Usage]]:
        """instance id -> the pod's GetUsage answer, for the pods that answered (in parallel).
        An answer younger than `max_age_s` (a GetUsage's or a direct Load's) is reused."""
        ids = sorted(i for i in (self.state.instances if instance_ids is None else instance_ids)
                     if i in self.state.instances)
        now = self.clock.monotonic()
        out: dict[str, dict[str, Usage]] = {}
        ask = []
        for i in ids:
            seen = self._usage_at.get(i)
            if max_age_s > 0 and seen is not None and now - seen[0] <= max_age_s:
                out[i] = seen[1]
            else:
                ask.append(i)
        answers = await asyncio.gather(*(self.usage.get(self.state.instances[i].address) for i in ask))
        for i, answer in zip(ask, answers, strict=True):
            if answer is not None:
                out[i] = answer
                self._remember_usage(i, answer)
        for gone in set(self._usage_at) - set(self.state.instances):
            del self._usage_at[gone]
        return out

    def _remember_usage(self, instance_id: str, models: dict[str, Usage]) -> None:
        self._usage_at[instance_id] = (self.clock.monotonic(), models)
        for model_id, used in models.items():
            self.pod_last_used[model_id] = max(self.pod_last_used.get(model_id, 0), used.last_used_ms)

    def last_used_ms(self, model_id: str) -> int:
        """The last use of a model any source reported (telemetry, pods' GetUsage); 0: none."""
        act = (self.last_activity or {}).get(model_id)
        return max(act.last_used_ms if act else 0, self.pod_last_used.get(model_id, 0))

    def pod_views(self, usage: dict[str, dict[str, Usage]] | None = None) -> list[planner.PodView]:
        """Every live pod as the ledger books it (placement/ledger.py)."""
        return self.ledger.pod_views(usage)

    def pod_view(self, instance_id: str, usage: dict[str, Usage] | None = None) -> planner.PodView:
        return self.ledger.pod_view(instance_id, usage)
