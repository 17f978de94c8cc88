"""Every Prometheus metric of every process, defined once, on a registry passed in.

docs/METRICS.md lists them. Our own metrics (`mesh_*`) carry no per-model labels
(cardinality); per-model detail lives in GetModel status. Beside them, where the meaning
matches, the same observations are exported under KServe ModelMesh's names and units
(`modelmesh_*`, milliseconds, its label names `method`, `code`, `modelId`), so its
dashboards and alerts keep working; their `modelId` label is opt-in
(MESH_METRICS_MODEL_LABELS) and capped (MESH_METRICS_MODEL_LABEL_LIMIT distinct models per
process, the rest under `_other`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

T = TypeVar("T")

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENCY_MS = tuple(b * 1000 for b in _LATENCY)
_IDLE_S = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_SIZE_BYTES = tuple(float(1 << n) for n in range(10, 41, 2))  # 1 KiB .. 1 TiB

OVERFLOW = "_other"
_INFER_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})  # ModelMesh's request metrics count these  # the modelId of models beyond the label limit

# The model a request names, bound by the handler (router/forward.py, puller/server.py) and read
# by the RPC recorder (mesh/rpc/status.py) once the handler returns: the same task's context.
_MODEL: contextvars.ContextVar[str] = contextvars.ContextVar("mesh_metrics_model", default="")


def bind_model(model_id: str) -> None:
    """Names the model of the RPC being handled (for the opt-in modelId label)."""
    _MODEL.set(model_id)


def bound_model() -> str:
    return _MODEL.get()


class ModelLabel:
    """modelId label values: the model id for the first `limit` distinct models, OVERFLOW for
    any later one (event-loop only). Disabled: no modelId label at all."""

    def __init__(self, enabled: bool, limit: int) -> None:
        self.enabled = enabled
        self.limit = limit
        self._seen: set[str] = set()

    @property
    def names(self) -> list[str]:
        return ["modelId"] if self.enabled else []

    def values(self, model_id: str) -> list[str]:
        if not self.enabled:
            return []
        if model_id in self._seen:
            return [model_id]
        if len(self._seen) < self.limit and model_id:
            self._seen.add(model_id)
            return [model_id]
        return [OVERFLOW]


@dataclasses.dataclass(frozen=True)
class PressureFigures:
    """Placement's view of memory pressure (placement/pressure.py)."""

    pods: int
    capacity_bytes: int
    used_bytes: int
    unplaced_bytes: int

    @property
    def wanted_bytes(self) -> int:
        return self.used_bytes + self.unplaced_bytes

    @property
    def ratio(self) -> float:
        return self.wanted_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """Models of the whole mesh (ModelMesh's Deployment-scope gauges)."""

    managed: int
    loaded: int
    with_failure: int


def _retrying(fn: Callable[[], T], default: T) -> T:
    """Calls `fn` from the metrics thread; a dict the event loop changed while `fn` walked it
    (RuntimeError) is walked again."""
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            return fn()
    return default


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, service: str = "mesh",
                 model_labels: bool = False, model_label_limit: int = 100, tenant_labels: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.service = service
        self.model_label = ModelLabel(model_labels, model_label_limit)
        self.tenant_labels = tenant_labels
        self.requests = Counter(
            "mesh_requests_total", "gRPC requests handled, by method and status code.",
            ["service", "method", "code"], registry=r,
        )
        self.request_seconds = Histogram(
            "mesh_request_seconds", "gRPC request latency, by method.",
            ["service", "method"], buckets=_LATENCY, registry=r,
        )
        self.cache_hits = Counter(
            "mesh_cache_hits_total",
            "Hits: router = request found a ready copy; runtime = artifact already on disk.",
            ["service"], registry=r,
        )
        self.cache_misses = Counter(
            "mesh_cache_misses_total",
            "Misses: router = no ready copy (load requested); runtime = artifact pulled.",
            ["service"], registry=r,
        )
        self.cache_miss_seconds = Histogram(
            "mesh_cache_miss_seconds", "Time to serve a miss: router = until a copy is ready; "
            "runtime = pull time.", ["service"], buckets=_LATENCY, registry=r,
        )
        self.forward_retries = Counter(
            "mesh_forward_retries_total", "Requests re-sent to another copy after UNAVAILABLE or an attempt timeout.",
            registry=r,
        )
        self.loads = Counter(
            "mesh_loads_total", "Model loads on runtime pods, by result (ok / failed).",
            ["result"], registry=r,
        )
        self.load_seconds = Histogram(
            "mesh_load_seconds", "Model load latency (session creation + warm-up, pull excluded).",
            buckets=_LATENCY, registry=r,
        )
        self.unloads = Counter("mesh_unloads_total", "Model unloads on runtime pods.", registry=r)
        self.unload_seconds = Histogram(
            "mesh_unload_seconds", "Model unload latency.", buckets=_LATENCY, registry=r,
        )
        self.evictions = Counter(
            "mesh_evictions_total", "Copies evicted by placement, by reason (idle: scale to zero, placement/idle.py).", ["reason"], registry=r,
        )
        self.eviction_age_seconds = Histogram(
            "mesh_eviction_idle_seconds", "Time since last use of copies placement evicted to make "
            "room (capacity, tenant_cap, overcommit).", buckets=_IDLE_S, registry=r,
        )
        self.placements = Counter(
            "mesh_placements_total", "Assignments written by placement, by result.", ["result"],
            registry=r,
        )
        self.direct_loads = Counter(
            "mesh_direct_loads_total", "Placement's direct Runtime/Load calls after writing an "
            "assignment, by outcome (loaded: answered with the ready copy; no_answer: the pod gave "
            "no copy, etcd's report was awaited).", ["outcome"], registry=r,
        )
        self.capacity_bytes = Gauge(
            "mesh_pod_capacity_bytes", "Model memory this runtime pod offers.", registry=r,
        )
        self.used_bytes = Gauge(
            "mesh_pod_used_bytes", "Measured memory of the models loaded on this pod.", registry=r,
        )
        self.models_loaded = Gauge(
            "mesh_models_loaded", "Models loaded on this runtime pod.", registry=r,
        )
        self.artifact_cache_bytes = Gauge(
            "mesh_artifact_cache_bytes", "Bytes of artifacts in this pod's disk cache.", registry=r,
        )
        self.artifact_evictions = Counter(
            "mesh_artifact_evictions_total", "Artifacts removed from the disk cache.", registry=r,
        )
        self.decisions = Counter(
            "mesh_placement_decisions_total", "Placement decisions written to etcd, by action "
            "(placed, evicted, copy_added, copy_dropped, replaced).", ["action"], registry=r,
        )
        self.is_leader = Gauge(
            "mesh_placement_leader", "1 while this placement replica is the leader.", registry=r,
        )
        self.batch_size = Histogram(
            "mesh_batch_size", "Requests run together in one onnxruntime call by dynamic batching "
            "(1: a batching model's request ran alone).", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.telemetry_samples = Counter(
            "mesh_telemetry_samples_total", "Request samples of usage telemetry flushed to Redis, "
            "by result (written / dropped: Redis unreachable or failing).", ["result"], registry=r,
        )
        self.telemetry_reads = Counter(
            "mesh_telemetry_reads_total", "Usage telemetry reads by placement, by result (ok / "
            "unavailable: fell back to pod-reported recency).", ["result"], registry=r,
        )
        self.load_waits = Counter(
            "mesh_load_waits_total", "Loads that waited for unloads to free memory first "
            "(the unload buffer).", registry=r,
        )
        self.unsynced_records = Gauge(
            "mesh_pod_unsynced_records", "Records of this pod (copies, stats, instance) etcd "
            "may not agree with yet: changed and not written, or written and failed (resync).",
            registry=r,
        )
        self.record_write_failures = Counter(
            "mesh_pod_record_write_failures_total", "Failed etcd writes of this pod's records "
            "(each is retried until etcd takes it).", registry=r,
        )
        self.ejections = Counter(
            "mesh_router_ejections_total", "Pods a router left out of picks after consecutive "
            "unreachable / timed-out attempts (outlier ejection).", registry=r,
        )
        self.shed = Counter(
            "mesh_shed_total", "Requests answered without running them, by reason: model_queue / "
            "pod_queue (RESOURCE_EXHAUSTED, a runtime pod's queue full), rpc_limit "
            "(RESOURCE_EXHAUSTED, max concurrent RPCs), pod_cap (RESOURCE_EXHAUSTED at a router: every "
            "ready copy at MESH_ROUTER_MAX_IN_FLIGHT_PER_POD), deadline (DEADLINE_EXCEEDED: expired, or "
            "the queue would outlast it), tenant_rate / tenant_in_flight (RESOURCE_EXHAUSTED at a router: "
            "the caller's tenant over its request-rate or in-flight quota; no tenant label).",
            ["service", "reason"], registry=r,
        )
        self.routes = Gauge(
            "mesh_router_ready_models", "Models with at least one ready copy in the route table.",
            registry=r,
        )
        self.asyncio_tasks = Gauge(
            "mesh_asyncio_tasks", "asyncio tasks alive in this process's event loop (leak checks: "
            "flat under steady load).", registry=r,
        )
        self.sandbox_runs = Counter(
            "mesh_sandbox_runs_total", "First loads of an artifact vetted in a throw-away child process "
            "(puller/sandbox.py), by verdict: ok, refused (meshserve's graph checks), error (onnxruntime "
            "refused it), crashed, out_of_memory, timed_out.", ["verdict"], registry=r,
        )
        self.sandbox_verdict_hits = Counter(
            "mesh_sandbox_verdict_cache_hits_total", "Loads decided by a cached sandbox verdict (same "
            "sha256 vetted before, in memory or on disk): no child started.", registry=r,
        )
        self.sandbox_seconds = Histogram(
            "mesh_sandbox_seconds", "Time of a sandbox child: fork, checks, session creation, warm-up.",
            buckets=_LATENCY, registry=r,
        )
        self._pressure(r)
        self._modelmesh(r)
        self._vmodels(r, model_label_limit)
        self.tenant_requests = Counter(
            "mesh_tenant_requests", "Inference requests routed, by the model's tenant (router; only "
            "with MESH_METRICS_TENANT_LABELS; the default tenant is \"default\").", ["tenant"], registry=r,
        )
        self._tenant_memory = _TenantMemory()
        r.register(self._tenant_memory)

    def _pressure(self, r: CollectorRegistry) -> None:
        self.placement_pods = Gauge(
            "mesh_placement_pods", "Runtime pods placement may place on (live, not draining).", registry=r,
        )
        self.placement_capacity = Gauge(
            "mesh_placement_capacity_bytes", "Model memory those pods offer, summed.", registry=r,
        )
        self.placement_used = Gauge(
            "mesh_placement_used_bytes", "Memory those pods measure in use by models, summed.", registry=r,
        )
        self.placement_unplaced = Gauge(
            "mesh_placement_unplaced_bytes", "Memory of models wanted and not held: placement could "
            "not place them (no room) or evicted them while hot, within MESH_PLACEMENT_PRESSURE_WINDOW_S "
            "(leader only; 0 on a standby).", registry=r,
        )
        self.placement_wanted = Gauge(
            "mesh_placement_wanted_bytes", "used + unplaced: the memory the mesh's models want.",
            registry=r,
        )
        self.placement_pressure = Gauge(
            "mesh_placement_pressure_ratio", "wanted / capacity: above 1, more runtime pods would "
            "hold what is asked for (the autoscaling signal).", registry=r,
        )

    def _vmodels(self, r: CollectorRegistry, limit: int) -> None:
        """A/B figures per vmodel and target (router/vmodels.py): always on, since vmodels are
        few and named by operators; still capped at `limit` distinct (vmodel, target) pairs
        (MESH_METRICS_MODEL_LABEL_LIMIT), later ones counted under OVERFLOW."""
        self.vmodel_requests = Counter(
            "mesh_vmodel_requests_total", "Inference requests a router resolved through a vmodel, by "
            "vmodel, the target model that answered, and outcome (ok, error).",
            ["vmodel", "target", "outcome"], registry=r,
        )
        self.vmodel_request_seconds = Histogram(
            "mesh_vmodel_request_seconds", "Latency of requests resolved through a vmodel, by vmodel "
            "and target (errors included).", ["vmodel", "target"], buckets=_LATENCY, registry=r,
        )
        self._vmodel_pairs: set[tuple[str, str]] = set()
        self._vmodel_limit = limit

    def vmodel_request(self, vmodel: str, target: str, ok: bool, seconds: float) -> None:
        """A request through `vmodel` answered by `target` (internal ids) finished."""
        pair = (vmodel, target)
        if pair not in self._vmodel_pairs:
            if len(self._vmodel_pairs) < self._vmodel_limit:
                self._vmodel_pairs.add(pair)
            else:
                pair = (OVERFLOW, OVERFLOW)
        self.vmodel_requests.labels(*pair, "ok" if ok else "error").inc()
        self.vmodel_request_seconds.labels(*pair).observe(seconds)

    def _modelmesh(self, r: CollectorRegistry) -> None:
        """KServe ModelMesh's metrics (its names, units and labels) for the same observations."""
        mid = self.model_label.names
        self.mm_api_request_ms = Histogram(
            "modelmesh_api_request_milliseconds", "External inference request time (router; "
            "ModelMesh-compatible).", ["method", "code", *mid], buckets=_LATENCY_MS, registry=r,
        )
        self.mm_invocations = Counter(
            "modelmesh_invocations", "External inference requests by method and code (router; the "
            "count of modelmesh_api_request_milliseconds as a counter).", ["method", "code", *mid],
            registry=r,
        )
        self.mm_invoke_model_ms = Histogram(
            "modelmesh_invoke_model_milliseconds", "Internal model server inference request time "
            "(runtime pod; ModelMesh-compatible).", ["method", "code", *mid], buckets=_LATENCY_MS,
            registry=r,
        )
        self.mm_cache_miss_ms = Histogram(
            "modelmesh_cache_miss_milliseconds", "Cache miss delay: a request with no ready copy, "
            "until one is ready (router).", mid, buckets=_LATENCY_MS, registry=r,
        )
        self.mm_loadmodel_ms = Histogram(
            "modelmesh_loadmodel_milliseconds", "Time taken to load a model (runtime pod: session "
            "creation + warm-up).", mid, buckets=_LATENCY_MS, registry=r,
        )
        self.mm_loadmodel_failure = Counter(
            "modelmesh_loadmodel_failure", "Model load failures (runtime pod).", mid, registry=r,
        )
        self.mm_unloadmodel_ms = Histogram(
            "modelmesh_unloadmodel_milliseconds", "Time taken to unload a model (runtime pod).", mid,
            buckets=_LATENCY_MS, registry=r,
        )
        self.mm_req_queue_delay_ms = Histogram(
            "modelmesh_req_queue_delay_milliseconds", "Time a request waited in the runtime pod's "
            "queue before its onnxruntime run started.", mid, buckets=_LATENCY_MS, registry=r,
        )
        self.mm_age_at_eviction_ms = Histogram(
            "modelmesh_age_at_eviction_milliseconds", "Time since a model was last used when evicted "
            "(placement).", mid, buckets=tuple(b * 1000.0 for b in _IDLE_S), registry=r,
        )
        self.mm_loaded_model_size = Histogram(
            "modelmesh_loaded_model_size_bytes", "Measured size of loaded models (runtime pod).", mid,
            buckets=_SIZE_BYTES, registry=r,
        )
        # Deployment scope (placement leader; 0 on a standby, so sum() and max() both hold).
        self.mm_models_loaded = Gauge(
            "modelmesh_models_loaded_total", "Models with at least one loaded copy.", registry=r,
        )
        self.mm_models_with_failure = Gauge(
            "modelmesh_models_with_failure_total", "Models with a FAILED copy record.", registry=r,
        )
        self.mm_models_managed = Gauge(
            "modelmesh_models_managed_total", "Models registered.", registry=r,
        )
        # Pod scope (runtime pod).
        self.mm_instance_lru_s = Gauge(
            "modelmesh_instance_lru_seconds", "Last use of this pod's least recently used model "
            "(unix seconds; 0 with none loaded).", registry=r,
        )
        self.mm_instance_lru_age_s = Gauge(
            "modelmesh_instance_lru_age_seconds", "Seconds since the last use of this pod's least "
            "recently used model (0 with none loaded).", registry=r,
        )
        self.mm_instance_capacity = Gauge(
            "modelmesh_instance_capacity_bytes", "Model memory this pod offers.", registry=r,
        )
        self.mm_instance_used = Gauge(
            "modelmesh_instance_used_bytes", "Memory in use by this pod's loaded models.", registry=r,
        )
        self.mm_instance_used_bps = Gauge(
            "modelmesh_instance_used_bps", "used / capacity in basis points (100ths of a percent).",
            registry=r,
        )
        self.mm_instance_models = Gauge(
            "modelmesh_instance_models_total", "Model copies loaded on this pod.", registry=r,
        )
        self._pod = {"capacity": 0.0, "used": 0.0}
        self.mm_instance_used_bps.set_function(self._used_bps)

    # -- observations that feed ours and ModelMesh's at once -----------------------------------

    def _mid(self, model_id: str) -> list[str]:
        return self.model_label.values(model_id)

    def _per_model(self, metric: Any, model_id: str) -> Any:
        """`metric`'s child for the model (metric itself when modelId labels are off)."""
        values = self.model_label.values(model_id)
        return metric.labels(*values) if values else metric

    def bind(self, model_id: str) -> None:
        """A routed request for the internal `model_id`: names the model of the RPC being
        handled (see bind_model) and counts it for its tenant (both opt-in)."""
        if self.model_label.enabled:
            _MODEL.set(model_id)
        if self.tenant_labels:
            self.tenant_requests.labels(tenant_of(model_id)).inc()

    def request_done(self, method: str, code: str, seconds: float) -> None:
        """An RPC finished (mesh/rpc/status.py): ModelMesh's request metrics for the V2 data
        plane, on routers (external) and runtime pods (internal)."""
        if method not in _INFER_METHODS:
            return
        short = method
        mid = self._mid(bound_model())
        if self.service == "router":
            self.mm_api_request_ms.labels(short, code, *mid).observe(seconds * 1000)
            self.mm_invocations.labels(short, code, *mid).inc()
        elif self.service == "runtime":
            self.mm_invoke_model_ms.labels(short, code, *mid).observe(seconds * 1000)

    def miss_served(self, model_id: str, seconds: float) -> None:
        """The router's miss ended with a ready copy."""
        self.cache_miss_seconds.labels(self.service).observe(seconds)
        self._per_model(self.mm_cache_miss_ms, model_id).observe(seconds * 1000)

    def model_loaded(self, model_id: str, seconds: float, size_bytes: int) -> None:
        self.loads.labels("ok").inc()
        self.load_seconds.observe(seconds)
        self._per_model(self.mm_loadmodel_ms, model_id).observe(seconds * 1000)
        self._per_model(self.mm_loaded_model_size, model_id).observe(size_bytes)

    def model_load_failed(self, model_id: str) -> None:
        self.loads.labels("failed").inc()
        self._per_model(self.mm_loadmodel_failure, model_id).inc()

    def model_unloaded(self, model_id: str, seconds: float) -> None:
        self.unload_seconds.observe(seconds)
        self._per_model(self.mm_unloadmodel_ms, model_id).observe(seconds * 1000)

    def queue_delay(self, model_id: str, ns: int) -> None:
        """A request's wait between decoding and the start of its run (puller/stats.py)."""
        self._per_model(self.mm_req_queue_delay_ms, model_id).observe(max(ns, 0) / 1e6)

    def evicted(self, model_id: str, idle_s: float) -> None:
        """A copy placement evicted to make room had been idle `idle_s` seconds."""
        self.eviction_age_seconds.observe(max(idle_s, 0.0))
        self._per_model(self.mm_age_at_eviction_ms, model_id).observe(max(idle_s, 0.0) * 1000)

    def pod_capacity(self, capacity_bytes: int) -> None:
        self._pod["capacity"] = float(capacity_bytes)
        self.capacity_bytes.set(capacity_bytes)
        self.mm_instance_capacity.set(capacity_bytes)

    def pod_use(self, used_bytes: int, models: int) -> None:
        self._pod["used"] = float(used_bytes)
        self.used_bytes.set(used_bytes)
        self.models_loaded.set(models)
        self.mm_instance_used.set(used_bytes)
        self.mm_instance_models.set(models)

    def _used_bps(self) -> float:
        cap = self._pod["capacity"]
        return round(self._pod["used"] * 10_000 / cap) if cap else 0.0

    # -- figures computed at scrape time (read from the metrics thread) ------------------------

    def track_lru(self, oldest_use_ms: Callable[[], int]) -> None:
        """`oldest_use_ms()`: the last use (unix ms) of the pod's least recently used model, 0
        with none loaded."""
        def lru_s() -> float:
            return _retrying(oldest_use_ms, 0) / 1000

        def age_s() -> float:
            oldest = lru_s()
            return max(time.time() - oldest, 0.0) if oldest else 0.0

        self.mm_instance_lru_s.set_function(lru_s)
        self.mm_instance_lru_age_s.set_function(age_s)

    def track_models(self, counts: Callable[[], ModelCounts | None]) -> None:
        """`counts()`: the mesh's model counts, None where this process does not publish them
        (a placement standby)."""
        empty = ModelCounts(0, 0, 0)

        def get(field: str) -> Callable[[], float]:
            return lambda: float(getattr(_retrying(counts, None) or empty, field))

        self.mm_models_managed.set_function(get("managed"))
        self.mm_models_loaded.set_function(get("loaded"))
        self.mm_models_with_failure.set_function(get("with_failure"))

    def track_tenant_memory(self, by_tenant: Callable[[], dict[str, int]]) -> None:
        """`by_tenant()`: bytes of LOADED copies per tenant (placement leader; {} elsewhere)."""
        if self.tenant_labels:
            self._tenant_memory.source = lambda: _retrying(by_tenant, {})

    def track_pressure(self, figures: Callable[[], PressureFigures]) -> None:
        empty = PressureFigures(0, 0, 0, 0)

        def get(fn: Callable[[PressureFigures], float]) -> Callable[[], float]:
            return lambda: float(fn(_retrying(figures, empty)))

        self.placement_pods.set_function(get(lambda f: f.pods))
        self.placement_capacity.set_function(get(lambda f: f.capacity_bytes))
        self.placement_used.set_function(get(lambda f: f.used_bytes))
        self.placement_unplaced.set_function(get(lambda f: f.unplaced_bytes))
        self.placement_wanted.set_function(get(lambda f: f.wanted_bytes))
        self.placement_pressure.set_function(get(lambda f: f.ratio))


def tenant_of(model_id: str) -> str:
    """The tenant of an internal model id (`<tenant>:<id>`; "default" for the default tenant's)."""
    tenant, sep, _ = model_id.partition(":")
    return tenant if sep and tenant else "default"


class _TenantMemory:
    """mesh_tenant_memory_bytes{tenant}, computed at scrape time."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "mesh_tenant_memory_bytes", "Measured memory of the LOADED copies of each tenant's models "
            "(placement leader; only with MESH_METRICS_TENANT_LABELS).", labels=["tenant"])
        for tenant, nbytes in sorted((self.source() if self.source else {}).items()):
            family.add_metric([tenant], float(nbytes))
        yield family


def metric_names(metrics: Metrics | None = None) -> set[str]:
    """Every sample name the registry exports (counters' _total, histograms' _bucket / _sum /
    _count included): what a query may name."""
    metrics = metrics or Metrics(model_labels=True, tenant_labels=True)
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        kind = family.type
        if kind == "counter":
            names.update({f"{family.name}_total", f"{family.name}_created"})
        elif kind == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
    return names


def serve(metrics: Metrics, host: str, port: int) -> None:
    """Serves /metrics on host:port in a daemon thread (0 turns it off). Called from the
    process's event loop, whose task count mesh_asyncio_tasks then reports."""
    with contextlib.suppress(RuntimeError):
        loop = asyncio.get_running_loop()
        metrics.asyncio_tasks.set_function(lambda: _task_count(loop))
    if port:
        start_http_server(port, addr=host, registry=metrics.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def _task_count(loop: asyncio.AbstractEventLoop) -> int:
    """Tasks of `loop`, read from the metrics thread (all_tasks copies the set; a race with the
    loop adding a task is retried)."""
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            return len(asyncio.all_tasks(loop))
    return -1
