"""Dynamic batching for one loaded model: compatible requests run as one onnxruntime call.

Configured at registration (ModelSpec.max_batch_size / max_queue_delay_us, carried in the
Assignment). Requests arrive here already validated (codec.py), so a malformed request never
joins a batch. Requests are compatible when they feed the same inputs with the same dtypes and
the same non-batch dimensions and ask for the same outputs; their inputs are concatenated on
axis 0 (one np.concatenate per input), run once, and the outputs split back as views by each
request's batch size.

Scheduling (the shape of Triton's dynamic batcher run as a continuous batcher): at most
`max_in_flight` runs of this model are in progress (the executor's thread count), and
requests queue in FIFO groups of compatible ones.

- Nothing running: the oldest group runs at the next event-loop turn, whatever it holds (at
  concurrency 1 a request never waits out the queue delay; requests that arrived in the same
  turn share the run).
- Every slot busy: requests accumulate; when a run ends the next batch starts at once with
  what has queued meanwhile, so the batch size follows the load.
- Some runs in progress and a slot free: the head group starts another run when it holds
  `max_batch_size` rows or its oldest request has waited `max_queue_delay_us`; waiting here
  buys a bigger batch instead of a second small run next to the first. 0: run at once.

A run takes at most `max_batch_size` rows. Requests that cannot join a batch (no batch axis in
the feeds, or `max_batch_size` rows or more alone) run alone, in the same queue. When a batched
run fails (onnxruntime rejected some request's values) or its outputs cannot be split on axis
0, each request is run alone, so a bad request fails alone. A caller cancelled while its request
is queued removes it from the queue, and a queued request whose deadline has passed is answered
DEADLINE_EXCEEDED instead of joining a run. The queue is bounded by the pod's admission control
(puller/admission.py counts a batching model's queued requests with its running ones).
Event-loop only; the runs go to the Executor's pool.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from mesh.errors import DeadlineExceeded
from mesh.metrics import Metrics
from puller.executor import Executor, LoadedModel
from puller.stats import Execution, Timing

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What a Batcher needs of puller.executor.Executor (tests pass a fake)."""

    async def run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str],
                  execution: Execution | None = None) -> list[np.ndarray]: ...


@dataclasses.dataclass(eq=False)
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]]
    arrived: float  # loop.time()
    deadline: float | None = None  # loop.time() after which the caller no longer waits
    timing: Timing | None = None  # told of the run that served it (puller/stats.py)


@dataclasses.dataclass(eq=False)
class _Group:
    outputs: list[str]
    pending: collections.deque[_Pending] = dataclasses.field(default_factory=collections.deque)
    rows: int = 0


def batchable(model: LoadedModel) -> bool:
    """Every input has a variable first dimension (the batch axis) and there is one."""
    return bool(model.inputs) and all(s.shape and s.shape[0] < 0 for s in model.inputs.values())


def group_key(feeds: dict[str, np.ndarray], outputs: Sequence[str]) -> tuple[Hashable, int] | None:
    """(compatibility key, rows) of a request, or None when it cannot join a batch."""
    rows = -1
    parts = []
    for name, arr in feeds.items():
        if arr.ndim == 0:
            return None
        if rows < 0:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            return None
        parts.append((name, arr.dtype.str, arr.shape[1:]))
    if rows <= 0:
        return None
    parts.sort()
    return (tuple(parts), tuple(outputs)), rows


class Batcher:
    def __init__(
        self,
        model: LoadedModel,
        executor: Runner,
        max_batch_size: int,
        max_queue_delay_us: int,
        metrics: Metrics,
        max_in_flight: int = 1,
    ) -> None:
        self.model = model
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self.metrics = metrics
        self.max_in_flight = max(1, max_in_flight)
        self._groups: dict[Hashable, _Group] = {}  # insertion order = order of their oldest request
        self._in_flight = 0
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False  # a _dispatch is queued with call_soon
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def queued(self) -> int:
        """Requests waiting for a run."""
        return sum(len(g.pending) for g in self._groups.values())

    @property
    def in_flight(self) -> int:
        """Runs in progress."""
        return self._in_flight

    async def run(
        self, feeds: dict[str, np.ndarray], outputs: list[str], deadline: float | None = None,
        timing: Timing | None = None,
    ) -> list[np.ndarray]:
        """Runs one request's feeds, batched with compatible ones when possible. `deadline`
        (loop.time(); None: none): still queued then, the request is not run. `timing` is
        told of the run (the batch's) that served the request."""
        loop = asyncio.get_running_loop()
        found = group_key(feeds, outputs)
        if found is None or found[1] >= self.max_batch_size:
            key: Hashable = object()  # a group of its own, full from the start
            rows = self.max_batch_size
        else:
            key, rows = found
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(outputs)
        pending = _Pending(feeds, rows, loop.create_future(), loop.time(), deadline, timing)
        group.pending.append(pending)
        group.rows += rows
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self._withdraw(key, pending)
            raise

    def _withdraw(self, key: Hashable, pending: _Pending) -> None:
        """Removes a cancelled caller's request if it is still queued."""
        group = self._groups.get(key)
        if group is None or pending not in group.pending:
            return  # already taken into a run, which skips finished futures
        group.pending.remove(pending)
        group.rows -= pending.rows
        if not group.pending:
            del self._groups[key]

    def _ready(self, group: _Group) -> bool:
        """May the head group start a run now?"""
        if self._in_flight == 0 or self._closing or group.rows >= self.max_batch_size:
            return True
        return asyncio.get_running_loop().time() >= group.pending[0].arrived + self.delay_s

    def _dispatch(self) -> None:
        """Starts runs while a slot is free and the head group may run."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._groups and (self._in_flight < self.max_in_flight or self._closing):
            key, group = next(iter(self._groups.items()))
            if not self._ready(group):
                loop = asyncio.get_running_loop()
                self._timer = loop.call_at(group.pending[0].arrived + self.delay_s, self._dispatch)
                return
            batch = self._take(group)
            if not group.pending:
                del self._groups[key]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._run_batch(batch, group.outputs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, group: _Group) -> list[_Pending]:
        """Up to max_batch_size rows from the head of a group (always at least one request)."""
        batch: list[_Pending] = []
        rows = 0
        now = asyncio.get_running_loop().time()
        while group.pending:
            p = group.pending[0]
            if batch and rows + p.rows > self.max_batch_size:
                break
            group.pending.popleft()
            group.rows -= p.rows
            if p.future.done():  # its caller went without withdrawing (should not happen)
                continue
            if p.deadline is not None and now >= p.deadline:  # its caller stops waiting: not run
                p.future.set_exception(DeadlineExceeded(
                    f"model '{self.model.model_id}': the request's deadline passed while it was queued; not run"
                ))
                continue
            batch.append(p)
            rows += p.rows
        return batch

    async def _run_batch(self, batch: list[_Pending], outputs: list[str]) -> None:
        try:
            self.metrics.batch_size.observe(len(batch))
            if len(batch) == 1:
                await self._run_alone(batch[0], outputs)
            else:
                await self._run_together(batch, outputs)
        finally:
            for p in batch:  # cancelled (shutdown): nobody may wait forever
                if not p.future.done():
                    p.future.cancel()
            self._in_flight -= 1
            self._dispatch()

    async def _run_together(self, batch: list[_Pending], outputs: list[str]) -> None:
        feeds = {n: np.concatenate([p.feeds[n] for p in batch]) for n in batch[0].feeds}
        total = sum(p.rows for p in batch)
        execution = Execution(rows=total)
        try:
            arrays = await self.executor.run(self.model, feeds, outputs, execution)
        except Exception as exc:
            log.info("batched run of %s failed (%s); running its %d requests alone", self.model.model_id, exc, len(batch))
            await asyncio.gather(*(self._run_alone(p, outputs) for p in batch))
            return
        if any(a.ndim == 0 or a.shape[0] != total for a in arrays):
            log.warning("model %s: outputs are not batched on axis 0; running requests alone", self.model.model_id)
            await asyncio.gather(*(self._run_alone(p, outputs) for p in batch))
            return
        offset = 0
        for p in batch:
            end = offset + p.rows
            if p.timing is not None:
                p.timing.execution = execution
            if not p.future.done():
                p.future.set_result([a[offset:end] for a in arrays])
            offset = end

    async def _run_alone(self, p: _Pending, outputs: list[str]) -> None:
        first = next(iter(p.feeds.values()), None)  # p.rows is the full batch for an ungroupable one
        execution = Execution(rows=int(first.shape[0]) if first is not None and first.ndim else 1)
        if p.timing is not None:
            p.timing.execution = execution
        try:
            result = await self.executor.run(self.model, p.feeds, outputs, execution)
        except Exception as exc:
            if not p.future.done():
                p.future.set_exception(exc)
            return
        if not p.future.done():
            p.future.set_result(result)

    async def close(self) -> None:
        """Runs what is queued now (slot bound lifted) and waits for every run to end."""
        self._closing = True
        self._dispatch()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def for_model(
    model: LoadedModel, executor: Executor, max_batch_size: int, max_queue_delay_us: int, metrics: Metrics
) -> Batcher | None:
    """A Batcher when batching was asked for and the model has a batch axis, else None. Runs in
    flight are bounded by the executor's thread count (MESH_RUNTIME_EXECUTOR_THREADS)."""
    if max_batch_size <= 1:
        return None
    if not batchable(model):
        log.warning(
            "model %s asks for dynamic batching but not all its inputs have a variable first "
            "dimension; serving it unbatched", model.model_id,
        )
        return None
    return Batcher(model, executor, max_batch_size, max_queue_delay_us, metrics, max_in_flight=executor.threads)
