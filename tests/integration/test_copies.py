"""Proactive copies end to end (LocalMesh with Redis, 2 pods, lease TTL 3 s): a model under
steady load gets a second copy on the other pod (router telemetry -> Redis -> placement), then
killing one pod with -9 under load loses no request; the pod restarts, the hot model is copied
to it again, and when the load stops the extra copy is dropped."""

from __future__ import annotations

import pathlib

import pytest
import tritonclient.grpc as triton

from .conftest import start_mesh
from .test_failover import Load, _infer, _loaded_on, _wait

pytestmark = pytest.mark.integration

ENV = {
    "MESH_ROUTER_TELEMETRY_FLUSH_S": "0.2",
    "MESH_TELEMETRY_BUCKET_S": "1",
    "MESH_PLACEMENT_ACTIVITY_WINDOW_S": "2",
    "MESH_PLACEMENT_COPY_RATE_PER_S": "2",  # a few requests per second make a model hot
    "MESH_PLACEMENT_MIN_RESIDENCY_S": "1",  # the churn guard, short enough to see a drop
}


def _decision(mesh, model_id: str) -> str:
    return mesh.get_model(model_id).last_decision


def test_hot_model_is_copied_survives_a_kill_and_cools(etcd_endpoint: str, model_files,
                                                      tmp_path: pathlib.Path) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=2, capacity="256MiB", redis=True, env=ENV)
    try:
        mesh.register("hot", model_files["linear-4"])
        client = triton.InferenceServerClient(mesh.router_address)
        assert _infer(client, "hot").shape == (1, 3)
        client.close()
        # The answer can precede the LOADED record in the router's view: wait for it.
        _wait(lambda: len(_loaded_on(mesh, "hot")) == 1, 10, "the copy's LOADED record")
        (first,) = _loaded_on(mesh, "hot")
        with Load(mesh, "hot") as load:  # until stopped: the model stays hot throughout
            _wait(lambda: _loaded_on(mesh, "hot") == ["pod-0", "pod-1"], 30, "hot model never copied")
            decision = _decision(mesh, "hot")
            other = ({"pod-0", "pod-1"} - {first}).pop()
            assert decision.startswith(f"copy_added on {other}") and "req/s" in decision, decision
            load.wait_ok(20)
            mesh.kill(other)  # kill -9: the router learns of it from a failed call or the lease
            load.wait_ok(50)
            _wait(lambda: _loaded_on(mesh, "hot") == [first], 20, "dead pod's copy still listed")
            load.wait_ok(20)
            # The pod comes back; the model is still hot and is copied onto it again.
            mesh.start_pod(int(other[-1]))
            _wait(lambda: _loaded_on(mesh, "hot") == ["pod-0", "pod-1"], 30, "not copied to the restarted pod")
            load.wait_ok(20)
            print(f"{load.ok} requests served under load")
        assert load.errors == [], load.errors
        # Load stopped: once the rate window passes, the extra copy is dropped (never the last).
        _wait(lambda: len(_loaded_on(mesh, "hot")) == 1, 30, "cooled copy never dropped")
        assert _decision(mesh, "hot").startswith("copy_dropped"), _decision(mesh, "hot")
        assert mesh.scrape("placement").get('mesh_placement_decisions_total{action="copy_added"}', 0) >= 2
    finally:
        mesh.stop()
