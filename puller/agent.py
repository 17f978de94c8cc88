"""The pod's etcd side: registration under a lease, and reconciling loads with assignments.

    instances/<id>           InstanceRecord, leased, re-put after every load / unload
    assignments/<id>/<m>     watched (View); each one present and not loaded -> a load task
    copies/<m>/<id>          CopyRecord LOADING -> LOADED | FAILED, leased; deleted on unload
    stats/<m>                ModelStats (not leased: placement remembers sizes across unloads)

The in-memory copy records are the truth; `_sync_copy` writes a model's current record (or
deletes it) under a per-model lock, so a late write can never resurrect a record an unload
removed. A lost lease is replaced and everything re-put. Stopping revokes the lease, so the
pod's records vanish at once instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Sequence

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.clock import Clock
from mesh.errors import MeshError
from mesh.kv.etcd import EtcdClient, Event, Lease, delete_op, put_op
from mesh.kv.keys import Keys
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.tasks import Supervisor
from mesh.types import Assignment, CopyRecord, CopyState, InstanceRecord, ModelStats
from puller import batching
from puller.cache import ArtifactCache
from puller.executor import Executor
from puller.table import ModelTable, Served

log = logging.getLogger(__name__)

UNLOAD_DRAIN_S = 10.0  # longest an unload waits for in-flight requests before letting go
DRAIN_POLL_S = 0.01


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
    ) -> None:
        self.client = client
        self.keys = keys
        self.identity = identity
        self.lease_ttl_s = lease_ttl_s
        self.cache = cache
        self.executor = executor
        self.table = table
        self.metrics = metrics
        self.clock = clock
        self.view = View(client, keys.assignments_of(identity.instance_id))
        self.supervisor = Supervisor()
        self.lease: Lease | None = None
        self.started_unix_ms = clock.unix_ms()
        self._wake = asyncio.Event()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._unloading: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, Assignment] = {}  # not retried until the assignment changes
        self._copies: dict[str, CopyRecord] = {}
        # One per model this pod has held, kept: dropping an idle one could let a writer queued
        # on it run beside a writer on its replacement (a lock is a few hundred bytes).
        self._copy_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._instance_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.view.subscribe(self._on_assignments)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.lease = await self.client.grant(self.lease_ttl_s)
        self.metrics.capacity_bytes.set(self.identity.capacity_bytes)
        await self._sync_instance()
        log.info("registered instance %s at %s", self.identity.instance_id, self.identity.address)
        self.supervisor.start("lease", self._lease_loop)
        self.supervisor.start("assignments-watch", self.view.run)
        self.supervisor.start("reconcile", self._reconcile_loop)

    async def stop(self) -> None:
        await self.supervisor.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.lease is not None:
            try:
                await self.lease.revoke()
            except MeshError as exc:
                log.warning("could not revoke lease (records expire after its TTL): %s", exc)
        for model_id in self.table.ids():
            served = self.table.remove(model_id)
            if served is not None:
                self.cache.release(served.artifact_key)

    async def _lease_loop(self) -> None:
        while True:
            assert self.lease is not None
            await self.lease.keep_alive()  # returns only when the lease is lost
            log.warning("lease of instance %s lost; re-registering", self.identity.instance_id)
            self.lease = await self.client.grant(self.lease_ttl_s)
            await self._sync_instance()
            for model_id in list(self._copies):
                await self._sync_copy(model_id)

    # -- reconciling --------------------------------------------------------------------------

    def _on_assignments(self, events: list[Event]) -> None:
        self._wake.set()

    def desired(self) -> dict[str, Assignment]:
        out: dict[str, Assignment] = {}
        for key, value in self.view.items():
            try:
                assignment = types.decode(Assignment, value)
            except ValueError as exc:
                log.warning("ignoring malformed assignment %s: %s", key, exc)
                continue
            out[key.rsplit("/", 1)[-1]] = assignment
        return out

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.reconcile()

    def reconcile(self) -> None:
        desired = self.desired()
        # Unloads first: a load that needs their memory waits for them (`_await_room`).
        for model_id in self.table.ids():
            if model_id not in desired and model_id not in self._unloading:
                self._unloading[model_id] = self._spawn(self._unload(model_id))
        for model_id, assignment in desired.items():
            if model_id in self.table or model_id in self._loading or model_id in self._unloading:
                continue  # an unload in progress wakes reconcile again when done
            if self._failed.get(model_id) == assignment:
                continue
            self._failed.pop(model_id, None)
            self._loading[model_id] = self._spawn(self._load(model_id, assignment))
        for model_id in list(self._failed):
            if model_id not in desired:
                del self._failed[model_id]
                self._copies.pop(model_id, None)
                self._spawn(self._sync_copy(model_id))

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load(self, model_id: str, assignment: Assignment) -> None:
        try:
            self._set_copy(model_id, CopyState.LOADING)
            # Written beside the load, not before it: per-model writes are serialised and each
            # writes the record as it is then, so LOADING can never land after LOADED.
            self._spawn(self._sync_copy(model_id))
            artifact = await self.cache.acquire(assignment.storage_uri, assignment.sha256)
            try:
                await self._await_room(assignment.predicted_bytes)
                model = await self.executor.load(model_id, str(artifact.path))
            except BaseException:
                self.cache.release(artifact.key)
                raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._load_failed(model_id, assignment, exc)
            return
        finally:
            self._loading.pop(model_id, None)
        self.metrics.loads.labels("ok").inc()
        self.metrics.load_seconds.observe(model.load_ms / 1000)
        if model_id not in self.desired():  # unassigned while loading: discard
            log.info("model %s was unassigned while loading; discarding it", model_id)
            self.cache.release(artifact.key)
            self._copies.pop(model_id, None)
            await self._sync_copy(model_id)
            return
        batcher = batching.for_model(
            model, self.executor, assignment.max_batch_size, assignment.max_queue_delay_us, self.metrics
        )
        self.table.add(Served(model, artifact.key, self.clock.unix_ms(), batcher=batcher))
        log.info("loaded model %s (%d bytes, %d ms)", model_id, model.size_bytes, model.load_ms)
        # Stats (the measured size) in the same transaction: whoever sees the copy LOADED sees
        # its size too. A successful load sets every stats field (and clears a stale error),
        # so nothing is read first.
        stats = ModelStats(
            model_id=model_id,
            size_bytes=model.size_bytes,
            load_ms=model.load_ms,
            inputs=tuple(s.as_dict() for s in model.inputs.values()),
            outputs=tuple(s.as_dict() for s in model.outputs.values()),
        )
        self._set_copy(model_id, CopyState.LOADED, size_bytes=model.size_bytes, load_ms=model.load_ms)
        await self._sync_copy(model_id, also=[put_op(self.keys.stats(model_id), types.encode(stats))])
        await self._sync_instance()
        self._wake.set()  # the assignment may have gone meanwhile

    async def _load_failed(self, model_id: str, assignment: Assignment, exc: Exception) -> None:
        reason = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
        log.warning("loading model %s failed: %s", model_id, reason)
        self.metrics.loads.labels("failed").inc()
        if model_id not in self.desired():
            self._copies.pop(model_id, None)
            await self._sync_copy(model_id)
            return
        self._failed[model_id] = assignment
        self._set_copy(model_id, CopyState.FAILED, error=reason)
        await self._sync_copy(model_id)
        await self._put_error(model_id, reason)
        self._wake.set()

    async def _await_room(self, predicted_bytes: int) -> None:
        """The unload buffer: a load starts once the measured use plus its predicted bytes fit
        under capacity, or once the unloads under way (whose memory it may need) are done."""
        waited = False
        while self._unloading and self.table.used_bytes() + predicted_bytes > self.identity.capacity_bytes:
            if not waited:
                self.metrics.load_waits.inc()
                waited = True
            await asyncio.wait(list(self._unloading.values()))

    async def _unload(self, model_id: str) -> None:
        try:
            start = time.perf_counter()
            served = self.table.remove(model_id)
            if served is not None:
                self.cache.release(served.artifact_key)
                # In-flight requests hold the session: its memory is freed when they finish,
                # and loads waiting for this unload wait for that too (bounded).
                for _ in range(int(UNLOAD_DRAIN_S / DRAIN_POLL_S)):
                    if served.in_flight <= 0:
                        break
                    await asyncio.sleep(DRAIN_POLL_S)
                del served
                self.metrics.unloads.inc()
                self.metrics.unload_seconds.observe(time.perf_counter() - start)
                log.info("unloaded model %s", model_id)
            self._copies.pop(model_id, None)
            # The memory is free now: loads waiting in _await_room go on while etcd is told.
            self._spawn(self._sync_unloaded(model_id))
        finally:
            self._unloading.pop(model_id, None)
            self._wake.set()  # it may have been re-assigned meanwhile

    async def _sync_unloaded(self, model_id: str) -> None:
        await self._sync_copy(model_id)
        await self._sync_instance()

    # -- writing etcd -------------------------------------------------------------------------

    def _set_copy(self, model_id: str, state: CopyState, **fields: object) -> None:
        self._copies[model_id] = CopyRecord(
            model_id=model_id,
            instance_id=self.identity.instance_id,
            address=self.identity.address,
            state=state,
            updated_unix_ms=self.clock.unix_ms(),
            **fields,  # type: ignore[arg-type]
        )

    def _lease_id(self) -> int:
        assert self.lease is not None
        return self.lease.id

    async def _sync_copy(self, model_id: str, also: Sequence[rpc_pb2.RequestOp] = ()) -> None:
        """Writes the model's current copy record, or deletes it when there is none (with the
        operations in `also`, in one transaction)."""
        key = self.keys.copy(model_id, self.identity.instance_id)
        lock = self._copy_locks[model_id]
        async with lock:
            record = self._copies.get(model_id)
            try:
                if also:
                    own = delete_op(key) if record is None else put_op(key, types.encode(record), self._lease_id())
                    await self.client.txn([], [*also, own])
                elif record is None:
                    await self.client.delete(key)
                else:
                    await self.client.put(key, types.encode(record), lease=self._lease_id())
            except MeshError as exc:
                log.warning("could not write copy record of %s: %s", model_id, exc)

    async def _sync_instance(self) -> None:
        async with self._instance_lock:
            used = self.table.used_bytes()
            self.metrics.used_bytes.set(used)
            self.metrics.models_loaded.set(len(self.table))
            record = InstanceRecord(
                instance_id=self.identity.instance_id,
                address=self.identity.address,
                capacity_bytes=self.identity.capacity_bytes,
                used_bytes=used,
                models=tuple(self.table.ids()),
                device=self.identity.device,
                devices=self.identity.devices,
                started_unix_ms=self.started_unix_ms,
            )
            try:
                await self.client.put(
                    self.keys.instance(self.identity.instance_id), types.encode(record), lease=self._lease_id()
                )
            except MeshError as exc:
                log.warning("could not write instance record: %s", exc)

    async def _put_error(self, model_id: str, error: str) -> None:
        """Records a failed load in the model's stats, keeping what earlier loads measured."""
        key = self.keys.stats(model_id)
        try:
            current = await self.client.get(key)
            stats = ModelStats(model_id=model_id)
            if current is not None:
                try:
                    stats = types.decode(ModelStats, current.value)
                except ValueError:
                    pass
            stats = dataclasses.replace(stats, last_error=error, last_error_unix_ms=self.clock.unix_ms())
            await self.client.put(key, types.encode(stats))
        except MeshError as exc:
            log.warning("could not write stats of %s: %s", model_id, exc)
