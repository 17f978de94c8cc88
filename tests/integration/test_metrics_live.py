"""A live mesh (real etcd, Redis, routers, placement, pods): every metric docs/METRICS.md lists
is exported by some process, the ones the scenario exercises (loads, inferences, a miss, an
eviction) have been observed, ModelMesh-compatible names among them; and `mesh usage` reports
the requests and memory-seconds of each tenant's models from Redis."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from mesh import demo

from .conftest import start_mesh

pytestmark = pytest.mark.integration

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
MODELS = [f"live-{i}" for i in range(4)]

# Counters / histograms this scenario must have observed (some sample > 0), by family name.
OBSERVED = {
    "mesh_requests", "mesh_request_seconds", "mesh_cache_hits", "mesh_cache_misses", "mesh_cache_miss_seconds",
    "mesh_loads", "mesh_load_seconds", "mesh_unloads", "mesh_unload_seconds", "mesh_evictions",
    "mesh_eviction_idle_seconds", "mesh_placements", "mesh_placement_decisions", "mesh_telemetry_samples",
    "mesh_telemetry_reads", "mesh_tenant_requests",
    "modelmesh_api_request_milliseconds", "modelmesh_invocations", "modelmesh_invoke_model_milliseconds",
    "modelmesh_cache_miss_milliseconds", "modelmesh_loadmodel_milliseconds", "modelmesh_unloadmodel_milliseconds",
    "modelmesh_req_queue_delay_milliseconds", "modelmesh_age_at_eviction_milliseconds",
    "modelmesh_loaded_model_size_bytes",
    # gauges that must be non-zero
    "mesh_pod_capacity_bytes", "modelmesh_instance_capacity_bytes", "modelmesh_models_managed_total",
    "mesh_placement_capacity_bytes", "mesh_placement_pods", "mesh_tenant_memory_bytes",
}


def documented() -> set[str]:
    """Metric names in the first column of docs/METRICS.md's tables."""
    names = set()
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\|\s*`((?:mesh|modelmesh)_[a-z0-9_]+)`", line)
        if m:
            names.add(m.group(1))
    return names


def scrape_all(mesh) -> dict[str, float]:
    """family name -> largest sample value over every process (a family with no sample: 0)."""
    out: dict[str, float] = {}
    for key, port in mesh.ports.items():
        if not key.endswith("-metrics"):
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            values = [s.value for s in family.samples if not s.name.endswith("_created")]
            out[family.name] = max([out.get(family.name, 0.0), *values])
    return out


def _infer(client: triton.InferenceServerClient, model_id: str) -> None:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    client.infer(model_id, [inp], client_timeout=90)


def test_every_documented_metric_is_exported_and_observed_and_usage_reports(etcd_endpoint: str,
                                                                            tmp_path: pathlib.Path) -> None:
    files = {m: demo.save(demo.linear_model(40 + i, weight_bytes=30 << 20), tmp_path / f"{m}.onnx")
             for i, m in enumerate(MODELS)}
    tenant_file = demo.save(demo.linear_model(50), tmp_path / "acme.onnx")
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="100MiB", redis=True, env={
        "MESH_METRICS_MODEL_LABELS": "true", "MESH_METRICS_TENANT_LABELS": "true",
        "MESH_PLACEMENT_SHOWBACK_INTERVAL_S": "0.5", "MESH_ROUTER_TELEMETRY_FLUSH_S": "0.2"})
    try:
        for m, path in files.items():
            mesh.register(m, path)
        mesh.register("small", tenant_file, tenant="acme", min_copies=1)  # loaded without requests
        client = triton.InferenceServerClient(mesh.router_address)
        counts = {m: 0 for m in MODELS}
        for _ in range(2):  # 4 x >=30 MiB on a 100 MiB pod: evictions
            for m in MODELS:
                _infer(client, m)
                _infer(client, m)
                counts[m] += 2
        deadline = time.monotonic() + 60
        while True:
            seen = scrape_all(mesh)
            missing = {n for n in OBSERVED if not seen.get(n)}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        names = documented()
        assert len(names) >= 50, names
        # the parser names a counter's family without its _total suffix
        absent = sorted(n for n in names if n not in seen and n.removesuffix("_total") not in seen)
        assert not absent, f"documented but not exported by any process: {absent}"
        assert not missing, f"not observed in the scenario: {sorted(missing)}"
        # `mesh usage` (the showback) from the same Redis: exact request counts, memory-seconds.
        time.sleep(2.0)  # a router flush and a few showback ticks
        out = subprocess.run(
            [sys.executable, "-m", "mesh.cli.main", "usage", "--since", "1h", "--output", "json",
             "--redis", mesh.redis_url, "--root", mesh.root],
            capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(out.stdout)
        rows = {(r["tenant"], r["model"]): r for r in report["rows"]}
        for m in MODELS:
            assert rows[("default", m)]["requests"] == counts[m], (m, rows)
        assert any(rows[("default", m)]["memory_byte_seconds"] > 0 for m in MODELS)
        assert rows[("acme", "small")]["memory_byte_seconds"] > 0 and rows[("acme", "small")]["requests"] == 0
        assert report["tenants"]["acme"]["memory_byte_seconds"] > 0
        csv_out = subprocess.run(
            [sys.executable, "-m", "mesh.cli.main", "usage", "--output", "csv", "--tenant", "acme",
             "--redis", mesh.redis_url, "--root", mesh.root], capture_output=True, text=True, timeout=60, check=True)
        lines = csv_out.stdout.strip().splitlines()
        assert lines[0].startswith("tenant,model,requests") and lines[1].startswith("acme,small,0,")
        top = subprocess.run(
            [sys.executable, "-m", "mesh.cli.main", "top", "--once", "--interval", "0.2", "--router",
             mesh.router_address, "--token", mesh.token,
             "--metrics", f"127.0.0.1:{mesh.ports['router-metrics']}", "--metrics", f"127.0.0.1:{mesh.ports['pod-0-metrics']}"],
            capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert "models by request rate:" in top.stdout and "live-0" in top.stdout and "hit ratio" in top.stdout
    finally:
        mesh.stop()
