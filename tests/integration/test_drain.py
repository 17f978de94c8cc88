"""Graceful drain end to end (LocalMesh: router, placement, 2 pods; RELIABILITY.md F6): SIGTERM
the pod holding a model under a steady load through the router. The pod says it is draining,
placement makes the model ready on the other pod and then takes the draining pod's assignment
away, the pod unloads (in-flight requests finish) and exits 0 with its lease revoked; the
client sees no error at all.

Needs both halves: the pod's (puller/agent.py drain) and placement's (it must stop placing on a
draining pod, load its models elsewhere and delete its assignments once another copy is
LOADED). Without placement's half the pod waits out its drain timeout and the test fails on
"drained in" / the other copy not being ready when the pod exits.
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .conftest import start_mesh

pytestmark = pytest.mark.integration

LOADED = 2  # mesh.v1.CopyState.LOADED
DRAIN_S = 60  # longer than placement needs, so the drain can only end by the assignment going


def _infer(client: triton.InferenceServerClient, model_id: str) -> np.ndarray:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return client.infer(model_id, [inp], client_timeout=30).as_numpy("output")


def _loaded_on(mesh, model_id: str) -> list[str]:
    return sorted(c.instance_id for c in mesh.get_model(model_id).copies if c.state == LOADED)


class Load:
    """Requests one after another in a thread, bounded in count and time; every failure's
    status is kept."""

    def __init__(self, address: str, model_id: str, max_requests: int = 50_000, max_seconds: float = 150) -> None:
        self.client = triton.InferenceServerClient(address)
        self.model_id, self.max_requests, self.max_seconds = model_id, max_requests, max_seconds
        self.ok, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > end:
                return
            try:
                _infer(self.client, self.model_id)
                self.ok += 1
            except InferenceServerException as exc:
                self.errors.append(f"{exc.status()}: {exc.message()}")

    def wait_ok(self, count: int) -> None:
        target = self.ok + count
        while self.ok < target and self._thread.is_alive():
            time.sleep(0.05)
        assert self.ok >= target, f"the load ran out ({self.ok} served, errors {self.errors[:3]})"

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


def test_sigterm_makes_models_ready_elsewhere_first_with_no_client_error(
    etcd_endpoint: str, model_files: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=2, capacity="256MiB",
                      env={"MESH_RUNTIME_DRAIN_TIMEOUT_S": str(DRAIN_S)})
    try:
        mesh.register("hot", model_files["linear-4"])
        client = triton.InferenceServerClient(mesh.router_address)
        _infer(client, "hot")
        client.close()
        deadline = time.monotonic() + 10  # the answer can precede the LOADED record in the view
        while len(_loaded_on(mesh, "hot")) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        (victim,) = _loaded_on(mesh, "hot")
        survivor = ({"pod-0", "pod-1"} - {victim}).pop()
        proc = mesh.procs[victim]
        with Load(mesh.router_address, "hot") as load:
            load.wait_ok(20)
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(DRAIN_S + 30)
            # The other copy was LOADED before the draining pod let its copy go.
            assert _loaded_on(mesh, "hot") == [survivor]
            load.wait_ok(20)
        assert load.errors == [], load.errors[:5]
        assert rc == 0
        log = mesh.log(victim).read_text(errors="replace")
        assert "drained in" in log, "the drain ended by its timeout, not by placement moving the model"
        assert "lease revoked" in log
    finally:
        mesh.stop()
