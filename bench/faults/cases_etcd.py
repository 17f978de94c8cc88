"""etcd, network and telemetry faults: F8 etcd crash, F9 etcd outage > TTL, F10 compaction
during a watch gap, F14 router↔pod blackhole, F16 Redis down."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import grpc

from bench.faults.cases import case
from bench.faults.cases_procs import instances
from bench.faults.harness import Run, Scenario
from bench.faults.observe import etcd_call
from mesh import types
from mesh.cli import procs
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2


def etcd_view(run: Run) -> dict[str, tuple[str, ...]]:
    """model -> LOADED copies, from a fresh etcd list."""
    keys = Keys(run.mesh.root)

    async def read(client: Any) -> dict[str, tuple[str, ...]]:
        models, _ = await client.get_prefix(keys.prefix("models"))
        copies, _ = await client.get_prefix(keys.prefix("copies"))
        out: dict[str, list[str]] = {kv.key.rsplit("/", 1)[-1]: [] for kv in models}
        for kv in copies:
            rec = types.decode(types.CopyRecord, kv.value)
            if rec.state == types.CopyState.LOADED and rec.model_id in out:
                out[rec.model_id].append(rec.instance_id)
        return {m: tuple(sorted(v)) for m, v in out.items()}

    return etcd_call(run.mesh.etcd, read)


def router_view(address: str) -> dict[str, tuple[str, ...]]:
    """model -> LOADED copies, from one router's in-memory table (ListModels)."""
    out: dict[str, tuple[str, ...]] = {}
    with grpc.insecure_channel(address) as channel:
        stub, token = registry_pb2_grpc.ModelRegistryStub(channel), ""
        while True:
            resp = stub.ListModels(registry_pb2.ListModelsRequest(page_size=500, page_token=token), timeout=5)
            for m in resp.models:
                out[m.spec.model_id] = tuple(sorted(c.instance_id for c in m.copies if c.state == types_pb2.LOADED))
            token = resp.next_page_token
            if not token:
                return out


def converged(run: Run) -> bool:
    want = etcd_view(run)
    return all(router_view(a) == want for a in run.routers)


def _etcd_down(run: Run, seconds: float) -> None:
    """kill -9 etcd, `seconds` later start it again on the same data dir and ports."""
    run.start_registrations()
    run.begin_fault()
    run.kill9("etcd")
    run.sleep(seconds)
    run.restart("etcd")
    run.end_fault()
    run.figures["etcd_down_s"] = round(run.marks["fault_end"] - run.marks["fault_start"], 1)


@case("F8", "etcd crash", "kill -9 etcd for 60 s (--quick 10 s), restart with the same data dir; "
      "registrations every 0.25 s throughout",
      "loaded models 100 % served; registrations UNAVAILABLE within the deadline; every acked "
      "registration present after; route tables = etcd within 5 s")
def f8(run: Run) -> None:
    _etcd_down(run, 10 if run.opts.quick else 60)
    run.sleep(1)  # registrations just after the restart are part of the history too
    run.stop_registrations()
    run.figures["converge_s"] = run.wait_until(lambda: converged(run), 30, "routers never matched etcd")
    run.close_during()


@case("F9", "etcd outage longer than the lease TTL", "kill -9 etcd for 3 × TTL, restart (same data dir)",
      "pods keep serving; re-registered ≤ 5 s after restore; no reload storm (reloads ≤ models on "
      "pods whose lease lapsed)")
def f9(run: Run) -> None:
    pods = {f"pod-{i}" for i in range(run.scenario.pods)}
    _etcd_down(run, 3 * run.opts.lease_ttl_s)
    run.stop_registrations()
    run.figures["reregistered_s"] = run.wait_until(lambda: pods <= instances(run), 30, "pods not back")
    run.figures["converge_s"] = run.wait_until(lambda: converged(run), 30, "routers never matched etcd")
    run.close_during()


@case("F10", "Compaction during a watch gap", "SIGSTOP router-1; 1,000 changes (200 with --quick): "
      "new model records, half of them deleted again, and the delete of one it knew; compact; SIGCONT",
      "the router sees compact_revision, re-lists and diffs (deletes too): its table = etcd",
      scenario=lambda: Scenario(routers=2))
def f10(run: Run) -> None:
    keys = Keys(run.mesh.root)
    n = 200 if run.opts.quick else 1000
    run.register("f10-known", run.models_dir / "hot-a.onnx")
    run.wait_until(lambda: "f10-known" in router_view(run.routers[1]), 10, "router-1 never saw f10-known")
    uri = (run.models_dir / "hot-a.onnx").resolve().as_uri()

    puts = 2 * n // 3  # and every other one deleted again: n changes in all

    async def churn(client: Any) -> int:
        for i in range(puts):
            spec = types.ModelSpec(model_id=f"f10-{i}", storage_uri=uri)
            await client.put(keys.model(spec.model_id), types.encode(spec))
        for i in range(0, puts, 2):
            await client.delete(keys.model(f"f10-{i}"))
        await client.delete(keys.model("f10-known"))
        _, revision = await client.get_prefix(keys.prefix("models"))
        await client.compact(revision)
        return revision

    run.begin_fault()
    run.signal("router-1", signal.SIGSTOP)
    run.figures["compacted_at"] = etcd_call(run.mesh.etcd, churn, timeout=30)
    run.figures["changes"] = puts + len(range(0, puts, 2)) + 1
    run.signal("router-1", signal.SIGCONT)
    run.end_fault()
    run.figures["converge_s"] = run.wait_until(lambda: router_view(run.routers[1]).keys() == etcd_view(run).keys(),
                                               30, "router-1 never matched etcd")
    want, got = etcd_view(run).keys(), router_view(run.routers[1]).keys()
    run.figures["missed_events"] = len(set(want) ^ set(got))
    run.close_during()


def _proxy_first(run: Run) -> None:
    """Starts the fault proxy in front of pod-1's port before the mesh; pod-1 advertises it."""
    run.dir.mkdir(parents=True, exist_ok=True)
    pod_port, proxy_port = procs.free_port(), procs.free_port()
    run.proxy = run.spawn([sys.executable, "-m", "bench.faults.proxy", "--listen", str(proxy_port),
                           "--target", str(pod_port)], "proxy", port=proxy_port)
    run.scenario.pod_env[1] = {"MESH_RUNTIME_LISTEN": f"127.0.0.1:{pod_port}",
                               "MESH_RUNTIME_ADVERTISE": f"127.0.0.1:{proxy_port}"}


@case("F14", "Router↔runtime blackhole", "a TCP proxy between the router and pod-1 stops moving "
      "bytes (no RST, no FIN) for 3 × TTL, then heals",
      "dead link detected ≤ keepalive time + timeout; traffic rerouted; no request waits past its "
      "deadline", prepare=_proxy_first)
def f14(run: Run) -> None:
    ttl = run.opts.lease_ttl_s
    run.figures["on_pod_1"] = [m.model_id for m in run.hot if "pod-1" in run.loaded_on(m.model_id)]
    run.begin_fault(recovery_from="fault_start")
    run.proxy.send_signal(signal.SIGUSR1)
    at = time.monotonic()
    run.sleep(3 * ttl)
    run.proxy.send_signal(signal.SIGUSR2)
    run.end_fault()
    heal = time.monotonic()
    run.close_during()

    def detection(row: dict, rows: list) -> None:
        from bench.faults import report

        cut = [r for r in rows if at <= r[0] < heal]
        run.figures["detect_s"] = report.recovery_s(cut, at)
        run.figures["timeouts"] = sum(1 for r in cut if r[5] == "DEADLINE_EXCEEDED")

    run.post.append(detection)


def _counter(run: Run, names: list[str], metric: str) -> float:
    total = 0.0
    for name in names:
        try:
            samples = run.mesh.scrape(name)
        except Exception:
            continue
        total += sum(v for k, v in samples.items() if k == metric or k.startswith(metric + "{"))
    return total


@case("F16", "Redis down / slow", "SIGSTOP redis 10 s (--quick 5 s), SIGCONT; then kill -9 redis, "
      "restart it empty after 5 s", "0 inference errors; telemetry dropped and counted; placement "
      "falls back; no eviction storm", scenario=lambda: Scenario(redis=True, env={
          "MESH_ROUTER_TELEMETRY_FLUSH_S": "0.5", "MESH_REDIS_TIMEOUT_S": "0.3"}))
def f16(run: Run) -> None:
    placements = [n for n in run.mesh.procs if n.startswith("placement")]
    dropped0 = _counter(run, ["router"], 'mesh_telemetry_samples_total{result="dropped"}')
    fallback0 = _counter(run, placements, 'mesh_telemetry_reads_total{result="unavailable"}')
    evictions0 = _counter(run, placements, "mesh_evictions_total")
    run.begin_fault()
    run.signal("redis", signal.SIGSTOP)
    run.sleep(5 if run.opts.quick else 10)
    run.signal("redis", signal.SIGCONT)
    run.kill9("redis")
    run.sleep(5)
    run.restart("redis")
    run.end_fault()
    run.close_during()
    run.figures["dropped_samples"] = _counter(run, ["router"], 'mesh_telemetry_samples_total{result="dropped"}') - dropped0
    run.figures["placement_fallbacks"] = _counter(
        run, placements, 'mesh_telemetry_reads_total{result="unavailable"}') - fallback0
    run.figures["evictions"] = _counter(run, placements, "mesh_evictions_total") - evictions0
