"""The pod's etcd side: registration under a lease, and driving each model toward its assignment.

    instances/<id>           InstanceRecord, leased (used bytes, models, draining)
    assignments/<id>/<m>     watched (View); every change converges the models it names
    copies/<m>/<id>          CopyRecord LOADING -> LOADED -> UNLOADING | FAILED, leased
    stats/<m>                ModelStats (not leased: placement remembers sizes across unloads)

Each model is a `ModelSlot` (puller/modelstate.py): a state machine with one serialised queue,
so its transitions never interleave. Placement's direct Runtime/Load call (puller/direct.py)
overrides the watched assignment of a model until the watch confirms it, and drives the same
slots: a load starts as soon as placement's write succeeded. Records are written by the Publisher
(puller/records.py), which retries each until etcd has it. A lost lease is re-granted with
backoff and every record re-put under the new one; an outage is logged once, and once more
when it ends. Draining (SIGTERM, puller/main.py) marks the instance record `draining` and
waits for placement to take the assignments away, the unloads letting in-flight requests
finish. Stopping revokes the lease, so the pod's records vanish at once instead of after
the TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time

from mesh import types
from mesh.clock import Clock
from mesh.kv.etcd import EtcdClient, Event, Lease
from mesh.kv.keys import INSTANCES, Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.tasks import Supervisor
from mesh.types import Assignment, InstanceRecord
from puller.cache import ArtifactCache
from puller.direct import DirectLoads
from puller.executor import Executor
from puller.modelstate import ModelSlot, held_bytes
from puller.records import Publisher
from puller.table import ModelTable

log = logging.getLogger(__name__)

MAX_GRANT_BACKOFF_S = 5.0
STOP_STEP_S = 3.0  # bound of each shutdown step (cancelling jobs, revoking the lease)
NO_MOVER_S = 2.0  # draining: no leader or no other pod this long -> nobody will move the models


@dataclasses.dataclass(frozen=True)
class Identity:
    instance_id: str
    address: str
    capacity_bytes: int
    device: str = "cpu"
    devices: tuple[dict[str, object], ...] = ()  # GPU pods: every GPU / MIG slice


class Agent:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        identity: Identity,
        lease_ttl_s: int,
        cache: ArtifactCache,
        executor: Executor,
        table: ModelTable,
        metrics: Metrics,
        clock: Clock,
        unload_timeout_s: float = 10.0,
        loading_record_hold_s: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.identity = identity
        self.instance_id = identity.instance_id
        self.address = identity.address
        self.lease_ttl_s = lease_ttl_s
        self.cache = cache
        self.executor = executor
        self.table = table
        self.metrics = metrics
        self.clock = clock
        self.unload_timeout_s = unload_timeout_s
        self.view = View(client, keys.assignments_of(identity.instance_id))
        self.supervisor = Supervisor()
        self.lease: Lease | None = None
        self.started_unix_ms = clock.unix_ms()
        self.draining = False
        self.stopping = False
        self.slots: dict[str, ModelSlot] = {}
        self.publisher = Publisher(
            client, keys, identity.instance_id, metrics, self.instance_record, self._lease_id, self._lease_gone,
            loading_hold_s=loading_record_hold_s,
        )
        self._room = asyncio.Condition()
        self._changed = asyncio.Event()  # a slot went or the assignments changed (drain waits)
        # Placement's Runtime/Load: assignments followed before the watch shows them.
        self.direct = DirectLoads(self)
        self.view.subscribe(self._on_assignments)
        # puller/executor.py calls this (on the event loop) when it re-measures a copy.
        executor.on_resize = self._on_resize  # type: ignore[attr-defined]

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.lease = await self.client.grant(self.lease_ttl_s)
        self.metrics.pod_capacity(self.identity.capacity_bytes)  # ours and ModelMesh's
        self.publisher.instance_changed()
        if not await self.publisher.flush():
            log.warning("instance %s: first registration write failed; retrying", self.instance_id)
        log.info("registered instance %s at %s", self.instance_id, self.address)
        self.supervisor.start("lease", self._lease_loop)
        self.supervisor.start("records", self.publisher.run)
        self.supervisor.start("assignments-watch", self.view.run)

    async def stop(self) -> None:
        """Stops the loops and the models' jobs, then revokes the lease (each step bounded
        and logged). The table and the pins stay until `release`: in-flight requests still
        finish on the served sessions while the server stops."""
        self.stopping = True
        await self._bounded("stopping the agent's loops", self.supervisor.stop())
        slots = list(self.slots.values())
        await self._bounded("cancelling model jobs", asyncio.gather(*(s.close() for s in slots)))
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                async with asyncio.timeout(STOP_STEP_S):
                    await lease.revoke()
                log.info("instance %s: lease revoked", self.instance_id)
            except Exception as exc:  # noqa: BLE001 - reported, and the records expire anyway
                log.warning("could not revoke lease (records expire after its TTL, %ds): %s", self.lease_ttl_s, exc)

    def release(self) -> None:
        """After the server stopped: drops every served copy and lets go of every pin."""
        for slot in list(self.slots.values()):
            slot.release()
            self.publisher.forget(slot.model_id)
        self.slots.clear()
        for model_id in self.table.ids():
            self.table.remove(model_id)

    async def _bounded(self, what: str, aw: object) -> None:
        try:
            async with asyncio.timeout(STOP_STEP_S):
                await aw  # type: ignore[misc]
        except TimeoutError:
            log.error("%s took longer than %.0fs; going on with the shutdown", what, STOP_STEP_S)
        except Exception:
            log.exception("%s failed; going on with the shutdown", what)

    async def _lease_loop(self) -> None:
        backoff, outage = 0.2, None
        while True:
            if self.lease is not None:
                await self.lease.keep_alive()  # returns only when the lease is lost
                log.warning("lease of instance %s lost; re-registering", self.instance_id)
                self.lease = None
            try:
                lease = await self.client.grant(self.lease_ttl_s)
            except Exception as exc:  # noqa: BLE001 - etcd down: retried, logged once per outage
                if outage is None:
                    outage = time.monotonic()
                    log.warning("instance %s cannot re-register (%s); retrying with backoff", self.instance_id, exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, MAX_GRANT_BACKOFF_S)
                continue
            self.lease, backoff = lease, 0.2
            if outage is not None:
                log.info("instance %s re-registered after %.1fs", self.instance_id, time.monotonic() - outage)
                outage = None
            self.publisher.mark_all()  # every leased record again, under the new lease

    def _lease_id(self) -> int | None:
        return None if self.lease is None else self.lease.id

    def _lease_gone(self, lease_id: int) -> None:
        if self.lease is not None and self.lease.id == lease_id:
            self.lease.expired()  # keep_alive returns: the lease loop re-grants

    # -- assignments --------------------------------------------------------------------------

    def _on_assignments(self, events: list[Event]) -> None:
        self.direct.confirm(events)
        names = {ev.key.rsplit("/", 1)[-1] for ev in events}
        self.converge(names)

    def desired(self) -> dict[str, Assignment]:
        out: dict[str, Assignment] = {}
        for key, value in self.view.items():
            try:
                assignment = types.decode(Assignment, value)
            except ValueError as exc:
                log.warning("ignoring malformed assignment %s: %s", key, exc)
                continue
            out[key.rsplit("/", 1)[-1]] = assignment
        return self.direct.apply(out)

    def assignment(self, model_id: str) -> Assignment | None:
        """What the model should be here: placement's direct word while the watch has not
        confirmed it (puller/direct.py), else the watched assignment."""
        overridden, direct = self.direct.lookup(model_id)
        if overridden:
            return direct
        value = self.view.get(self.keys.assignment(self.instance_id, model_id))
        if value is None:
            return None
        try:
            return types.decode(Assignment, value)
        except ValueError:
            return None  # logged by desired()

    def converge(self, model_ids: set[str] | None = None) -> None:
        """Queues a converge on each named model (every known one when None)."""
        self._changed.set()
        if self.stopping:
            return
        if model_ids is None:
            model_ids = set(self.desired()) | set(self.slots)
        for model_id in model_ids:
            self._slot(model_id).converge()

    def _slot(self, model_id: str) -> ModelSlot:
        slot = self.slots.get(model_id)
        if slot is None or slot.closed:
            slot = self.slots[model_id] = ModelSlot(model_id, self)
        return slot

    def copy_changed(self, model_id: str) -> None:
        self.direct.copy_changed()

    def slot_gone(self, slot: ModelSlot) -> None:
        if self.slots.get(slot.model_id) is slot:
            del self.slots[slot.model_id]
        self._changed.set()

    def _on_resize(self, model_id: str, size_bytes: int, method: str) -> None:
        slot = self.slots.get(model_id)
        if slot is not None and not slot.closed:
            slot.resize(size_bytes, method)

    # -- memory -------------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Memory of the loaded copies and of those still draining."""
        return self.table.used_bytes() + held_bytes(self.slots)

    async def wait_room(self, predicted_bytes: int) -> None:
        """The unload buffer: a load starts once its predicted bytes fit beside the memory
        held (draining copies included), or once no copy is draining (nothing more will be
        freed here: placement's plan is the authority). Woken by each drain's end."""

        def ready() -> bool:
            draining = held_bytes(self.slots)
            return draining == 0 or self.held_bytes() + predicted_bytes <= self.identity.capacity_bytes

        if ready():
            return
        self.metrics.load_waits.inc()
        async with self._room:
            await self._room.wait_for(ready)

    def memory_freed(self) -> None:
        asyncio.get_running_loop().create_task(self._notify_room())

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    # -- draining -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float, stop: asyncio.Event) -> bool:
        """Marks the pod draining and waits until it holds nothing and has no assignments (True),
        or until `timeout_s`, `stop`, or nobody could move its models for NO_MOVER_S (False):
        no placement leader, or no other pod that is not draining."""
        self.draining = True
        self.publisher.instance_changed()
        start = time.monotonic()
        log.info("instance %s draining: %d models held; waiting up to %.0fs for placement to move them",
                 self.instance_id, len(self.slots), timeout_s)
        stuck_since: float | None = None
        while not stop.is_set():
            self._changed.clear()  # before looking: a change while we look wakes the wait
            if not self.slots and not self.desired():
                log.info("instance %s drained in %.1fs", self.instance_id, time.monotonic() - start)
                return True
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                log.warning("instance %s: drain timed out after %.0fs with %d models still held (%s)",
                            self.instance_id, timeout_s, len(self.slots), ", ".join(sorted(self.slots)))
                return False
            why = await self._nobody_can_move()
            if why is None:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = time.monotonic()
            elif time.monotonic() - stuck_since >= NO_MOVER_S:
                log.warning("instance %s: %s for %.0fs, nobody will move its %d models; stopping without waiting",
                            self.instance_id, why, NO_MOVER_S, len(self.slots))
                return False
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return False

    async def _nobody_can_move(self) -> str | None:
        """Why no one can take this pod's models now; None when someone may (or etcd cannot
        tell: the drain then waits out its timeout)."""
        try:
            if await self.client.get(self.keys.leader()) is None:
                return "no placement leader"
            kvs, _ = await self.client.get_prefix(self.keys.prefix(INSTANCES))
        except Exception:  # noqa: BLE001 - etcd down: keep serving until the timeout
            return None
        for kv in kvs:
            try:
                other = types.decode(InstanceRecord, kv.value)
            except ValueError:
                continue
            if other.instance_id != self.instance_id and not other.draining:
                return None
        return "no other pod that is not draining"

    # -- the instance record ------------------------------------------------------------------

    def instance_record(self) -> InstanceRecord:
        used = self.held_bytes()
        self.metrics.pod_use(used, len(self.table))  # ours and ModelMesh's
        return InstanceRecord(
            instance_id=self.instance_id,
            address=self.address,
            capacity_bytes=self.identity.capacity_bytes,
            used_bytes=used,
            models=tuple(self.table.ids()),
            device=self.identity.device,
            devices=self.identity.devices,
            started_unix_ms=self.started_unix_ms,
            draining=self.draining,
        )
