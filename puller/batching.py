"""Dynamic batching for one loaded model: compatible requests run as one onnxruntime call.

Configured at registration (ModelSpec.max_batch_size / max_queue_delay_us, carried in the
Assignment). Requests arrive here already validated (codec.py), so a malformed request never
joins a batch. Requests are compatible when they feed the same inputs with the same dtypes and
the same non-batch dimensions and ask for the same outputs; their inputs are concatenated on
axis 0, run once, and the outputs split back by each request's batch size.

A group is run when it holds `max_batch_size` rows, or `max_queue_delay_us` after its first
request arrived (0: at the next event-loop turn, so only requests that arrived together
wait for each other). When a batched run fails (onnxruntime rejected some request's values)
or its outputs cannot be split on axis 0, each request is run alone, so a bad request fails
alone. Event-loop only; the runs themselves go to the Executor's pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Hashable, Sequence

import numpy as np

from mesh.metrics import Metrics
from puller.executor import Executor, LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]]


@dataclasses.dataclass(eq=False)
class _Group:
    outputs: list[str]
    pending: list[_Pending] = dataclasses.field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


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
        self, model: LoadedModel, executor: Executor, max_batch_size: int, max_queue_delay_us: int, metrics: Metrics
    ) -> None:
        self.model = model
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        self.metrics = metrics
        self._groups: dict[Hashable, _Group] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        """Runs one request's feeds, batched with compatible ones when possible."""
        found = group_key(feeds, outputs)
        if found is None or found[1] >= self.max_batch_size:
            self.metrics.batch_size.observe(1)
            return await self.executor.run(self.model, feeds, outputs)
        key, rows = found
        group = self._groups.get(key)
        if group is not None and group.rows + rows > self.max_batch_size:
            self._flush(key)
            group = None
        if group is None:
            group = self._groups[key] = _Group(outputs)
            loop = asyncio.get_running_loop()
            if self.delay_s > 0:
                group.timer = loop.call_later(self.delay_s, self._flush, key)
            else:
                group.timer = loop.call_soon(self._flush, key)  # type: ignore[assignment]
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        group.pending.append(_Pending(feeds, rows, future))
        group.rows += rows
        if group.rows >= self.max_batch_size:
            self._flush(key)
        return await future

    def _flush(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        task = asyncio.ensure_future(self._run_group(group))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run_group(self, group: _Group) -> None:
        pending = [p for p in group.pending if not p.future.done()]  # callers may have gone
        if not pending:
            return
        self.metrics.batch_size.observe(len(pending))
        if len(pending) == 1:
            await self._run_alone(pending[0], group.outputs)
            return
        names = list(pending[0].feeds)
        feeds = {n: np.concatenate([p.feeds[n] for p in pending]) for n in names}
        total = sum(p.rows for p in pending)
        try:
            arrays = await self.executor.run(self.model, feeds, group.outputs)
        except Exception as exc:
            log.info("batched run of %s failed (%s); running its %d requests alone", self.model.model_id, exc, len(pending))
            await asyncio.gather(*(self._run_alone(p, group.outputs) for p in pending))
            return
        if any(a.ndim == 0 or a.shape[0] != total for a in arrays):
            log.warning("model %s: outputs are not batched on axis 0; running requests alone", self.model.model_id)
            await asyncio.gather(*(self._run_alone(p, group.outputs) for p in pending))
            return
        offset = 0
        for p in pending:
            if not p.future.done():
                p.future.set_result([a[offset : offset + p.rows] for a in arrays])
            offset += p.rows

    async def _run_alone(self, p: _Pending, outputs: list[str]) -> None:
        try:
            result = await self.executor.run(self.model, p.feeds, outputs)
        except Exception as exc:
            if not p.future.done():
                p.future.set_exception(exc)
            return
        if not p.future.done():
            p.future.set_result(result)

    async def close(self) -> None:
        """Runs what is queued now and waits for the runs in progress."""
        for key in list(self._groups):
            self._flush(key)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def for_model(
    model: LoadedModel, executor: Executor, max_batch_size: int, max_queue_delay_us: int, metrics: Metrics
) -> Batcher | None:
    """A Batcher when batching was asked for and the model has a batch axis, else None."""
    if max_batch_size <= 1:
        return None
    if not batchable(model):
        log.warning(
            "model %s asks for dynamic batching but not all its inputs have a variable first "
            "dimension; serving it unbatched", model.model_id,
        )
        return None
    return Batcher(model, executor, max_batch_size, max_queue_delay_us, metrics)
