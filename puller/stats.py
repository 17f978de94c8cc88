"""Triton's inference statistics, measured on the pod per model (GetInferStats; the router sums
them over the pods for ModelStatistics, router/extensions.py).

Per request (puller/server.py): `success` (admission to the response built) or `fail`, `queue`
(decoded to its run starting in an executor thread, the batcher's wait included),
`compute_input` (decoding and validation), `compute_infer` (the onnxruntime run),
`compute_output` (run end to the response built). Per execution (one onnxruntime run, however
many requests a batch joined): `execution_count` and `batch_stats` by batch size (rows of the
batch axis when the model batches, else 1); `inference_count` counts rows (Triton counts each
batch element) when the model batches, else requests. Durations in ns, `last_inference` in
unix ms.

Totals outlive a model's unload here (evicted and loaded again, its figures go on), bounded to
MAX_MODELS models: the least recently used model's totals are dropped first. A pod's totals
end with its process. Event-loop only, except `Execution`, which the executor thread fills.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from mesh.pb.inference import extensions_pb2 as ext

MAX_MODELS = 4096
_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclasses.dataclass(eq=False)
class Execution:
    """One onnxruntime run, shared by the requests it served; times from perf_counter_ns."""

    rows: int = 1
    started_ns: int = 0
    ended_ns: int = 0
    recorded: bool = False


@dataclasses.dataclass(eq=False)
class Timing:
    """One request's run, set by whoever ran it (the server directly, or the batcher)."""

    execution: Execution | None = None


@dataclasses.dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)


@dataclasses.dataclass
class _Batch:
    compute_input: _Duration = dataclasses.field(default_factory=_Duration)
    compute_infer: _Duration = dataclasses.field(default_factory=_Duration)
    compute_output: _Duration = dataclasses.field(default_factory=_Duration)


@dataclasses.dataclass
class ModelTotals:
    success: _Duration = dataclasses.field(default_factory=_Duration)
    fail: _Duration = dataclasses.field(default_factory=_Duration)
    queue: _Duration = dataclasses.field(default_factory=_Duration)
    compute_input: _Duration = dataclasses.field(default_factory=_Duration)
    compute_infer: _Duration = dataclasses.field(default_factory=_Duration)
    compute_output: _Duration = dataclasses.field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, _Batch] = dataclasses.field(default_factory=dict)


class StatsBook:
    def __init__(self, max_models: int = MAX_MODELS,
                 on_queue: Callable[[str, int], None] | None = None) -> None:
        self.max_models = max_models
        self.on_queue = on_queue  # (model, ns queued): modelmesh_req_queue_delay_milliseconds
        self._models: collections.OrderedDict[str, ModelTotals] = collections.OrderedDict()

    def _totals(self, model_id: str) -> ModelTotals:
        totals = self._models.get(model_id)
        if totals is None:
            totals = self._models[model_id] = ModelTotals()
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model_id)
        return totals

    def succeeded(self, model_id: str, now_ms: int, arrived_ns: int, decoded_ns: int, done_ns: int,
                  timing: Timing, batching: bool, rows: int) -> None:
        """A request answered: arrived (admitted), decoded, and its response built at done."""
        t = self._totals(model_id)
        ex = timing.execution
        started, ended = (ex.started_ns, ex.ended_ns) if ex and ex.ended_ns else (decoded_ns, decoded_ns)
        t.success.add(done_ns - arrived_ns)
        t.compute_input.add(decoded_ns - arrived_ns)
        t.queue.add(started - decoded_ns)
        if self.on_queue is not None:
            self.on_queue(model_id, started - decoded_ns)
        t.compute_infer.add(ended - started)
        t.compute_output.add(done_ns - ended)
        t.inference_count += rows if batching else 1
        t.last_inference_ms = max(t.last_inference_ms, now_ms)
        if ex is not None and not ex.recorded:
            ex.recorded = True  # the first request of a batch to finish counts the run
            t.execution_count += 1
            batch = t.batches.setdefault(ex.rows if batching else 1, _Batch())
            batch.compute_input.add(decoded_ns - arrived_ns)
            batch.compute_infer.add(ended - started)
            batch.compute_output.add(done_ns - ended)

    def failed(self, model_id: str, now_ms: int, arrived_ns: int, done_ns: int) -> None:
        t = self._totals(model_id)
        t.fail.add(done_ns - arrived_ns)
        t.last_inference_ms = max(t.last_inference_ms, now_ms)

    def messages(self, model_ids: list[str] | None = None) -> list[ext.ModelStatistics]:
        """Triton's ModelStatistics of `model_ids` this pod has figures of (all when None)."""
        ids = list(self._models) if not model_ids else [m for m in model_ids if m in self._models]
        out = []
        for model_id in ids:
            t = self._models[model_id]
            msg = ext.ModelStatistics(name=model_id, version="1", last_inference=t.last_inference_ms,
                                      inference_count=t.inference_count, execution_count=t.execution_count)
            for field in _FIELDS:
                d = getattr(t, field)
                getattr(msg.inference_stats, field).MergeFrom(ext.StatisticDuration(count=d.count, ns=d.ns))
            for size, b in sorted(t.batches.items()):
                msg.batch_stats.add(
                    batch_size=size,
                    compute_input=ext.StatisticDuration(count=b.compute_input.count, ns=b.compute_input.ns),
                    compute_infer=ext.StatisticDuration(count=b.compute_infer.count, ns=b.compute_infer.ns),
                    compute_output=ext.StatisticDuration(count=b.compute_output.count, ns=b.compute_output.ns),
                )
            out.append(msg)
        return out
