"""One model on this pod: its state machine, driven through one serialised queue.

    (gone) -> LOADING -> LOADED -> UNLOADING -> (gone)
                 |                               ^
                 +-> FAILED ---------------------+   (FAILED -> LOADING when re-assigned)

Every transition of a model is an operation on its `ModelSlot`'s queue, run one at a time by
the slot's worker: `converge` (compare with the assignment and act), `resize` (the executor
re-measured the copy), and the completions of the two long jobs a transition starts, the load
(pull, wait for room, create the session) and the drain (close the batcher, wait for in-flight
requests). The operations themselves never wait, so the queue stays responsive while a job
runs: an assignment that goes while its model loads cancels the load job from `converge`.

Every record change goes to the Publisher (puller/records.py), which writes it until etcd
agrees. Failure paths: whatever a job got (the artifact's pin, a session) is held on the slot
and let go by the operation that ends the job, whether the job succeeded, failed or was
cancelled; a load that fails is FAILED with its reason until its assignment changes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mesh.clock import Clock
from mesh.errors import MeshError, redact_paths
from mesh.metrics import Metrics
from mesh.types import Assignment, CopyRecord, CopyState, ModelStats
from puller import batching
from puller.cache import Artifact, ArtifactCache
from puller.executor import Executor, LoadedModel
from puller.records import Publisher
from puller.table import ModelTable, Served

log = logging.getLogger(__name__)
PULL_REPORT_S = 1.0  # how often a pull's progress goes into the LOADING record


class Host(Protocol):
    """What a slot needs of the pod (puller.agent.Agent)."""

    instance_id: str
    address: str
    cache: ArtifactCache
    executor: Executor
    table: ModelTable
    metrics: Metrics
    clock: Clock
    publisher: Publisher
    unload_timeout_s: float

    def assignment(self, model_id: str) -> Assignment | None: ...

    async def wait_room(self, predicted_bytes: int) -> None: ...

    def memory_freed(self) -> None: ...

    def slot_gone(self, slot: ModelSlot) -> None: ...

    def copy_changed(self, model_id: str) -> None: ...


def same_artifact(a: Assignment | None, b: Assignment | None) -> bool:
    return a is not None and b is not None and (a.storage_uri, a.sha256) == (b.storage_uri, b.sha256)


class ModelSlot:
    def __init__(self, model_id: str, host: Host) -> None:
        self.model_id = model_id
        self.host = host
        self.state: CopyState | None = None  # None: nothing here (no record)
        self.assignment: Assignment | None = None  # what the load in progress / done is for
        self.failed_for: Assignment | None = None  # not retried until the assignment changes
        self.artifact: Artifact | None = None  # pinned in the cache while set
        self.model: LoadedModel | None = None  # created by the load job, not served yet
        self.served: Served | None = None  # in the table (LOADED) or draining (UNLOADING)
        self.job: asyncio.Task[None] | None = None
        self.closed = False
        self._aborted = False
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._converge_queued = False
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name=f"model-{model_id}")

    # -- the queue ----------------------------------------------------------------------------

    def converge(self) -> None:
        """Queues a comparison with the model's assignment (coalesced: at most one waits)."""
        if not self._converge_queued:
            self._converge_queued = True
            self._submit(self._converge)

    def resize(self, size_bytes: int, method: str) -> None:
        self._submit(lambda: self._resize(size_bytes, method))

    def _submit(self, op: Callable[[], None]) -> None:
        if self.closed:
            return  # shut down (the owner replaces a slot that closed by itself when idle)
        self._ops.append(op)
        self._wake.set()

    def idle(self) -> bool:
        return self.state is None and self.job is None and not self._ops

    async def _run(self) -> None:
        while True:
            while self._ops:
                op = self._ops.popleft()
                try:
                    op()
                except Exception:  # a bug in one transition must not stop the model's queue
                    log.exception("model %s: state transition failed", self.model_id)
            if self.idle():
                self.closed = True
                self.host.slot_gone(self)
                return
            self._wake.clear()
            await self._wake.wait()

    async def close(self) -> None:
        """Shutdown: cancels the job and the worker; the pin and the served copy stay on the
        slot for the caller to let go (`release`)."""
        self.closed = True
        for task in (self.job, self._worker):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self.job, self._worker) if t is not None), return_exceptions=True)

    def release(self) -> None:
        """Lets go of the pin (shutdown, after `close`)."""
        if self.artifact is not None:
            self.host.cache.release(self.artifact.key)
            self.artifact = None
        self.model = None
        self.served = None

    # -- transitions (run by the worker, one at a time, never waiting) ------------------------

    def _converge(self) -> None:
        self._converge_queued = False
        desired = self.host.assignment(self.model_id)
        if self.state is None:
            if desired is not None:
                self._start_load(desired)
        elif self.state is CopyState.LOADING:
            if not same_artifact(desired, self.assignment) and self.job is not None and not self._aborted:
                log.info("model %s: assignment gone or changed while loading; cancelling the load", self.model_id)
                self._aborted = True
                self.job.cancel()
        elif self.state is CopyState.LOADED:
            if desired is None:
                self._start_unload()
        elif self.state is CopyState.FAILED:
            if desired is None:
                self.failed_for = None
                self._set(None)
            elif desired != self.failed_for:
                self._start_load(desired)
        # UNLOADING: the drain's completion converges again.

    def _start_load(self, assignment: Assignment) -> None:
        self.assignment, self.failed_for, self._aborted = assignment, None, False
        self._set(CopyState.LOADING)
        job = asyncio.create_task(self._load(assignment), name=f"load-{self.model_id}")
        self.job = job
        job.add_done_callback(lambda _: self._submit(lambda: self._load_done(job)))

    def _load_done(self, job: asyncio.Task[None]) -> None:
        self.job = None
        assignment = self.assignment
        assert assignment is not None
        if job.cancelled():
            log.info("model %s: load cancelled", self.model_id)
            self._drop_load()
            self._set(None)
        elif (exc := job.exception()) is not None:
            self._failed(assignment, exc)
        else:
            self._loaded(assignment)
        self._converge()

    def _failed(self, assignment: Assignment, exc: BaseException) -> None:
        reason = exc.message if isinstance(exc, MeshError) else f"{type(exc).__name__}: {exc}"
        log.warning("loading model %s failed: %s", self.model_id, reason)  # the log keeps the paths
        reason = redact_paths(reason)  # etcd's copy reaches clients (last_error, FAILED answers)
        self.host.metrics.model_load_failed(self.model_id)  # ours and ModelMesh's
        pulled = self.artifact.size_bytes if self.artifact is not None else 0
        self._drop_load()
        if self.host.assignment(self.model_id) is None:
            self._set(None)  # unassigned meanwhile: nobody waits for this copy
            return
        self.failed_for = assignment
        patch: dict[str, Any] = {"last_error": reason, "last_error_unix_ms": self.host.clock.unix_ms()}
        if pulled:
            patch["artifact_bytes"] = pulled  # a prior for placement even without a measurement
        self._set(CopyState.FAILED, error=reason, stats_patch=patch)

    def _loaded(self, assignment: Assignment) -> None:
        host = self.host
        model, artifact = self.model, self.artifact
        assert model is not None and artifact is not None
        self.model = None
        host.metrics.model_loaded(self.model_id, model.load_ms / 1000, model.size_bytes)  # ours and ModelMesh's
        batcher = batching.for_model(
            model, host.executor, assignment.max_batch_size, assignment.max_queue_delay_us, host.metrics
        )
        self.served = Served(model, artifact.key, host.clock.unix_ms(), batcher=batcher)
        host.table.add(self.served)
        log.info("loaded model %s (%d bytes, %d ms)", self.model_id, model.size_bytes, model.load_ms)
        self._set_loaded()
        host.publisher.instance_changed()

    def _set_loaded(self) -> None:
        """LOADED with the current measurement, and the stats in the same transaction (a
        successful load sets every stats field, clearing a stale error)."""
        assert self.served is not None and self.artifact is not None
        model = self.served.model
        method = model.measure_method
        stats = ModelStats(
            model_id=self.model_id,
            size_bytes=model.size_bytes,
            load_ms=model.load_ms,
            inputs=tuple(s.as_dict() for s in model.inputs.values()),
            outputs=tuple(s.as_dict() for s in model.outputs.values()),
            artifact_bytes=self.artifact.size_bytes,
            measure_method=method,
        )
        self._set(
            CopyState.LOADED, size_bytes=model.size_bytes, load_ms=model.load_ms,
            measure_method=method, stats=stats,
        )

    def _resize(self, size_bytes: int, method: str) -> None:
        if self.state is not CopyState.LOADED or self.served is None:
            return  # unloading or gone: its memory is leaving anyway
        model = self.served.model
        model.size_bytes, model.measure_method = size_bytes, method  # the executor set them too
        log.info("model %s re-measured: %d bytes (%s)", self.model_id, size_bytes, method)
        self._set_loaded()
        self.host.publisher.instance_changed()

    def _start_unload(self) -> None:
        served = self.served
        assert served is not None
        self.host.table.remove(self.model_id)  # no new requests from here on
        size = served.model.size_bytes
        self._set(CopyState.UNLOADING, size_bytes=size, measure_method=served.model.measure_method)
        self.host.publisher.instance_changed()
        job = asyncio.create_task(self._drain(served), name=f"unload-{self.model_id}")
        self.job = job
        job.add_done_callback(lambda _: self._submit(lambda: self._drained(job)))

    def _drained(self, job: asyncio.Task[None]) -> None:
        self.job = None
        if not job.cancelled() and job.exception() is not None:
            log.warning("model %s: drain failed (%s); unloading it anyway", self.model_id, job.exception())
        if self.artifact is not None:
            self.host.cache.release(self.artifact.key)
            self.artifact = None
        self.served = None  # the last reference to the session but in-flight requests'
        self.host.metrics.unloads.inc()
        log.info("unloaded model %s", self.model_id)
        self._set(None)
        self.host.publisher.instance_changed()
        self.host.memory_freed()
        self._converge()  # re-assigned meanwhile: load again

    def _drop_load(self) -> None:
        """Lets go of what a load that did not become LOADED holds."""
        if self.artifact is not None:
            self.host.cache.release(self.artifact.key)
            self.artifact = None
        self.model = None

    def _set(self, state: CopyState | None, stats: ModelStats | None = None,
             stats_patch: dict[str, Any] | None = None, **fields: Any) -> None:
        self.state = state
        record = None
        if state is not None:
            record = CopyRecord(
                model_id=self.model_id,
                instance_id=self.host.instance_id,
                address=self.host.address,
                state=state,
                updated_unix_ms=self.host.clock.unix_ms(),
                **fields,
            )
        self.host.publisher.set_copy(self.model_id, record, stats=stats, stats_patch=stats_patch)
        self.host.copy_changed(self.model_id)

    # -- jobs (tasks; they end by queueing their completion) ----------------------------------

    async def _load(self, assignment: Assignment) -> None:
        host = self.host
        t0 = time.perf_counter()
        reporting = asyncio.create_task(self._report_pull(assignment), name=f"pull-progress-{self.model_id}")
        try:
            self.artifact = await host.cache.acquire(assignment.storage_uri, assignment.sha256,
                                                     assignment.tenant, assignment.credentials_ref)
        finally:
            reporting.cancel()
        t1 = time.perf_counter()
        await host.wait_room(assignment.predicted_bytes)
        t2 = time.perf_counter()
        # Warmed up (and measured) at the batch the model will run at. The cache verified the
        # bytes against the assignment's sha256 when it has one: the sandbox's verdict key.
        create = asyncio.ensure_future(host.executor.load(
            self.model_id, str(self.artifact.path), batch=assignment.max_batch_size,
            sha256=self.artifact.sha256,
        ))
        create.add_done_callback(_retrieve)
        try:
            self.model = await asyncio.shield(create)
            log.debug("model %s load: artifact %.1f ms, room %.1f ms, session %.1f ms (executor %d ms)",
                      self.model_id, (t1 - t0) * 1000, (t2 - t1) * 1000, (time.perf_counter() - t2) * 1000,
                      self.model.load_ms)
        except asyncio.CancelledError:
            # onnxruntime cannot be interrupted: wait for the session (so its memory is free
            # before this slot loads again), then drop it. A second cancel (shutdown) stops
            # waiting; the thread's session is then dropped when it ends.
            await asyncio.wait([create])
            raise
        except Exception:
            host.cache.discard(self.artifact.key)  # a failed artifact is deleted, never left behind
            raise

    async def _report_pull(self, assignment: Assignment) -> None:
        """While the artifact is pulled: its progress in the LOADING record, every PULL_REPORT_S."""
        while True:
            await asyncio.sleep(PULL_REPORT_S)
            got = self.host.cache.progress(assignment.storage_uri, assignment.sha256, assignment.tenant,
                                           assignment.credentials_ref)
            if got is not None:
                self._submit(functools.partial(self._pulled, assignment, *got))

    def _pulled(self, assignment: Assignment, pulled: int, total: int) -> None:
        if self.state is CopyState.LOADING and self.assignment is assignment and self.job is not None:
            self._set(CopyState.LOADING, pulled_bytes=pulled, total_bytes=total)

    async def _drain(self, served: Served) -> None:
        start = time.perf_counter()
        timeout = self.host.unload_timeout_s
        if served.batcher is not None:
            try:
                async with asyncio.timeout(timeout):
                    await served.batcher.close()  # runs what is queued, at once
            except TimeoutError:
                pass
        left = timeout - (time.perf_counter() - start)
        if not await served.wait_idle(left):
            log.warning(
                "model %s: %d requests still running after %.0fs; unloading it anyway",
                self.model_id, served.in_flight, timeout,
            )
        self.host.metrics.model_unloaded(self.model_id, time.perf_counter() - start)  # ours and ModelMesh's


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a create whose waiter went: its error is not "never retrieved"


def held_bytes(slots: dict[str, ModelSlot]) -> int:
    """Memory of copies that left the table but still hold their session (UNLOADING)."""
    return sum(
        s.served.model.size_bytes for s in slots.values()
        if s.state is CopyState.UNLOADING and s.served is not None
    )

