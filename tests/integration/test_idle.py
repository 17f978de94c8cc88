"""Scale to zero end to end (real etcd, placement, pods, router): a model with min_copies 0
that had no request for its idle TTL has its last copy unloaded by the placement leader (a
Decision "idle_unloaded", mesh_evictions_total{reason="idle"}); the next request is an
ordinary miss that loads it again and succeeds. A model in use and a model held by
min_copies stay loaded. The default (MESH_PLACEMENT_IDLE_UNLOAD_S) applies to models without
a TTL of their own, and with the default off only a model's own idle_unload_s unloads."""

from __future__ import annotations

import pathlib
import time

import pytest
import tritonclient.grpc as triton

from .conftest import start_mesh
from .test_failover import _infer, _loaded_on, _wait

pytestmark = pytest.mark.integration


def test_idle_model_is_unloaded_by_the_default_ttl_and_reloads(etcd_endpoint: str, model_files,
                                                                tmp_path: pathlib.Path) -> None:
    env = {"MESH_PLACEMENT_IDLE_UNLOAD_S": "2", "MESH_ROUTER_TELEMETRY_FLUSH_S": "0.2",
           "MESH_TELEMETRY_BUCKET_S": "1"}
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB", redis=True, env=env)
    try:
        mesh.register("idle", model_files["linear-1"])
        mesh.register("busy", model_files["linear-2"])
        mesh.register("pinned", model_files["linear-3"], min_copies=1)
        client = triton.InferenceServerClient(mesh.router_address)
        for model in ("idle", "busy"):
            assert _infer(client, model).shape == (1, 3)
        _wait(lambda: _loaded_on(mesh, "pinned") == ["pod-0"], 30, "min_copies never loaded")
        # "busy" is used throughout; "idle" is not: only "idle" goes.
        deadline = time.monotonic() + 60
        while _loaded_on(mesh, "idle"):
            assert time.monotonic() < deadline, "idle model never unloaded"
            assert _infer(client, "busy").shape == (1, 3)
            assert _loaded_on(mesh, "busy") == ["pod-0"], "a model in use was unloaded"
            time.sleep(0.2)
        assert mesh.get_model("idle").last_decision.startswith("idle_unloaded on pod-0"), \
            mesh.get_model("idle").last_decision
        assert not mesh.get_model("busy").last_decision.startswith("idle_unloaded")
        assert _loaded_on(mesh, "pinned") == ["pod-0"]
        assert not mesh.get_model("pinned").last_decision.startswith("idle_unloaded")
        assert mesh.scrape("placement").get('mesh_evictions_total{reason="idle"}', 0) >= 1
        # The next request is an ordinary miss: loaded again, answered.
        assert _infer(client, "idle").shape == (1, 3)
        _wait(lambda: _loaded_on(mesh, "idle") == ["pod-0"], 10, "the re-load's LOADED record")
        assert mesh.get_model("idle").last_decision.startswith("placed"), mesh.get_model("idle").last_decision
        client.close()
    finally:
        mesh.stop()


def test_a_models_own_ttl_without_a_default_and_without_redis(etcd_endpoint: str, model_files,
                                                              tmp_path: pathlib.Path) -> None:
    """No Redis: the pods' own recency (GetUsage) is what placement knows, and it suffices.
    With the default off (0), a model without a TTL of its own keeps its last copy."""
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB")
    try:
        mesh.register("plain", model_files["linear-1"])
        mesh.register("short", model_files["linear-2"], idle_unload_s=1)
        client = triton.InferenceServerClient(mesh.router_address)
        for model in ("plain", "short"):  # "plain" is idle longer than "short"
            assert _infer(client, model).shape == (1, 3)
        client.close()
        _wait(lambda: _loaded_on(mesh, "plain") == ["pod-0"], 10, "plain's LOADED record")
        _wait(lambda: not _loaded_on(mesh, "short"), 60, "a model's own idle TTL never unloaded it")
        assert mesh.get_model("short").last_decision.startswith("idle_unloaded"), mesh.get_model("short").last_decision
        assert _loaded_on(mesh, "plain") == ["pod-0"]
        assert mesh.get_model("plain").last_decision.startswith("placed"), mesh.get_model("plain").last_decision
    finally:
        mesh.stop()
