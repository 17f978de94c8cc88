"""A pod with room for two models, three used in turn: the least recently used is evicted."""

from __future__ import annotations

import pathlib
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from mesh import demo

from .conftest import start_mesh

pytestmark = pytest.mark.integration

LOADED = 2  # mesh.v1.CopyState.LOADED


def _infer(client: triton.InferenceServerClient, model_id: str) -> np.ndarray:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return client.infer(model_id, [inp], client_timeout=60).as_numpy("output")


def _loaded(mesh, model_id: str, expected: list[str], timeout: float = 15.0) -> list[str]:
    """Where the model is LOADED, once that equals `expected` or `timeout` passes (unloads are
    reported asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        where = [c.instance_id for c in mesh.get_model(model_id).copies if c.state == LOADED]
        if where == expected or time.monotonic() > deadline:
            return where
        time.sleep(0.05)


def test_least_recently_used_model_is_evicted(etcd_endpoint: str, tmp_path: pathlib.Path) -> None:
    names = ["evict-a", "evict-b", "evict-c"]
    files = {m: demo.save(demo.linear_model(20 + i, weight_bytes=24 << 20), tmp_path / f"{m}.onnx")
             for i, m in enumerate(names)}
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="1GiB")
    try:
        for m, path in files.items():
            mesh.register(m, path)
        client = triton.InferenceServerClient(mesh.router_address)
        # Calibrate: load each once on a roomy pod so placement knows their measured sizes.
        for m in names:
            _infer(client, m)
        for m in names:  # the answer can precede the LOADED record (and size) in the router's view
            _loaded(mesh, m, ["pod-0"])
        sizes = [mesh.get_model(m).size_bytes for m in names]
        assert all(sizes), sizes
        # Replace the pod by one with room for two of them but not three.
        mesh.stop_process("pod-0")
        # Any two fit with room to spare (measurements of one model vary by a few %, and the
        # same-size models measure differently: glibc's heap layout), all three never do.
        capacity = sum(sizes) - min(sizes) + min(sizes) // 2
        mesh.pod_env[1] = {"MESH_RUNTIME_CAPACITY": str(capacity)}
        mesh.start_pod(1)
        mesh.wait_instances({"pod-1"}, timeout=60)

        _infer(client, "evict-a")
        _infer(client, "evict-b")
        assert _loaded(mesh, "evict-a", ["pod-1"]) == ["pod-1"] and _loaded(mesh, "evict-b", ["pod-1"]) == ["pod-1"]
        _infer(client, "evict-c")
        assert _loaded(mesh, "evict-c", ["pod-1"]) == ["pod-1"]
        sizes_now = {m: mesh.get_model(m).size_bytes for m in names}
        assert _loaded(mesh, "evict-a", []) == [], (
            f"the least recently used model should have been evicted (capacity {capacity}, "
            f"calibrated sizes {sizes}, sizes on this pod {sizes_now}, "
            f"decision {mesh.get_model('evict-a').last_decision!r})")
        assert _loaded(mesh, "evict-b", ["pod-1"]) == ["pod-1"]
        # Using A again evicts B, now the least recently used, and A is served correctly.
        _infer(client, "evict-b")
        out = _infer(client, "evict-a")
        assert out.shape == (1, 3)
        assert _loaded(mesh, "evict-c", []) == [] and _loaded(mesh, "evict-a", ["pod-1"]) == ["pod-1"]
        client.close()
    finally:
        mesh.stop()
