"""Every Prometheus metric of every process, defined once, on a registry passed in.

docs/METRICS.md lists them. Per-model labels are not used (cardinality); per-model detail
lives in GetModel status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, service: str = "mesh") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.service = service
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
            "mesh_evictions_total", "Copies evicted by placement, by reason.", ["reason"], registry=r,
        )
        self.eviction_age_seconds = Histogram(
            "mesh_eviction_idle_seconds", "Time since last use of evicted copies.",
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600), registry=r,
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
