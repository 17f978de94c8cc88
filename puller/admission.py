"""Admission control of a runtime pod: bounded work per model and per pod, shed at once.

Every inference request is admitted here before it is decoded, batched or handed to the
executor, and counted until it is answered (queued in a Batcher or the executor's pool, or
running). Beyond `per_model` requests of one model, or `per_pod` of all models, a request is
shed with RESOURCE_EXHAUSTED, a message saying which queue is full and which setting to
tune, and a `grpc-retry-pushback-ms` hint (mesh.errors.Overloaded): it costs a few counter
comparisons instead of waiting in a queue until its deadline. So memory held by requests is
bounded by the limits however hard the pod is driven.

Deadlines: a request arriving with no time left is not run, nor one with less time left than
requests of its model recently took here (queue wait + run, an EWMA): both are answered
DEADLINE_EXCEEDED at once. A request admitted and then abandoned (its caller cancelled, or
its deadline passed, both of which grpc.aio turns into cancelling the handler) leaves its
queue without running: the Batcher withdraws it, and the executor's pool drops a cancelled
job before it starts (asyncio cancels the wrapped concurrent future). Its slot is freed at
once. Event-loop only.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mesh.clock import Clock
from mesh.errors import DeadlineExceeded, Overloaded
from mesh.metrics import Metrics
from mesh.rpc.status import MAX_PUSHBACK_MS, MIN_PUSHBACK_MS, pushback_ms  # noqa: F401 (re-exported)
from puller.table import Served

T = TypeVar("T")

_ALPHA = 0.1  # EWMA weight of the newest completed request


class Admission:
    def __init__(self, per_model: int, per_pod: int, metrics: Metrics, clock: Clock) -> None:
        self.per_model = per_model
        self.per_pod = per_pod
        self.clock = clock  # last-use times (GetUsage)
        self.admitted = 0  # requests of every model queued or running
        self.pod_latency_s = 0.0  # EWMA over every model
        # Per-model EWMA of latency (admitted -> answered), dropped with the model's Served.
        self._latency: weakref.WeakKeyDictionary[Served, float] = weakref.WeakKeyDictionary()
        shed = metrics.shed
        self._shed_model = shed.labels(metrics.service, "model_queue")
        self._shed_pod = shed.labels(metrics.service, "pod_queue")
        self._shed_deadline = shed.labels(metrics.service, "deadline")

    def latency_s(self, served: Served) -> float:
        """Recent latency of `served`'s requests on this pod (0 before the first one)."""
        return self._latency.get(served, 0.0)

    async def run(self, served: Served, remaining_s: float | None, work: Callable[[], Awaitable[T]]) -> T:
        """Admits one request of `served` (or raises: shed), awaits `work()` (decode, queue,
        run) and counts the request out however it ends, cancellation included."""
        self.admit(served, remaining_s)
        start = time.perf_counter()
        ran = False
        try:
            result = await work()
            ran = True
            return result
        finally:
            self.done(served, time.perf_counter() - start, self.clock.unix_ms(), ran)

    def admit(self, served: Served, remaining_s: float | None) -> None:
        """Counts one request of `served` in, or raises (shed). `remaining_s` is the caller's
        time left (grpc's `context.time_remaining()`; None: no deadline)."""
        model_id = served.model.model_id
        if remaining_s is not None and remaining_s <= 0:
            self._shed_deadline.inc()
            raise DeadlineExceeded(f"request for model '{model_id}' reached the pod after its deadline; not run")
        if served.in_flight >= self.per_model:
            self._shed_model.inc()
            ms = pushback_ms(self.latency_s(served))
            raise Overloaded(
                f"model '{model_id}' has {served.in_flight} requests queued or running on this pod, "
                f"its limit (MESH_RUNTIME_MAX_QUEUE_PER_MODEL); retry after {ms} ms, or give the "
                "model more copies", ms,
            )
        if self.admitted >= self.per_pod:
            self._shed_pod.inc()
            ms = pushback_ms(self.pod_latency_s)
            raise Overloaded(
                f"runtime pod has {self.admitted} requests queued or running, its limit "
                f"(MESH_RUNTIME_MAX_QUEUE_PER_POD); retry after {ms} ms, or add pods", ms,
            )
        expected = self.latency_s(served)
        if remaining_s is not None and remaining_s < expected:
            self._shed_deadline.inc()
            raise DeadlineExceeded(
                f"model '{model_id}': requests take about {expected * 1000:.0f} ms on this pod now and this "
                f"one has {remaining_s * 1000:.0f} ms left; not run (give it a longer deadline)"
            )
        served.begin()
        self.admitted += 1

    def done(self, served: Served, seconds: float, now_ms: int, ran: bool) -> None:
        """Counts an admitted request out; `ran`: it was answered by a run, so its latency
        (`seconds` since admission) feeds the estimates."""
        served.end(now_ms)
        self.admitted -= 1
        if ran:
            old = self._latency.get(served)
            self._latency[served] = seconds if old is None else old + _ALPHA * (seconds - old)
            self.pod_latency_s += _ALPHA * (seconds - self.pod_latency_s)
