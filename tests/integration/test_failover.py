"""Failover end to end (LocalMesh, lease TTL 3 s): dead pods under load, a single copy's pod
killed, the placement leader killed, and Redis killed and restarted under load."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time

import numpy as np
import pytest
import redis
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import types
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys

from .conftest import start_mesh

pytestmark = pytest.mark.integration

LOADED = 2  # mesh.v1.CopyState.LOADED
RETRYABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}


def _infer(client: triton.InferenceServerClient, model_id: str, timeout: float = 30) -> np.ndarray:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return client.infer(model_id, [inp], client_timeout=timeout).as_numpy("output")


def _loaded_on(mesh, model_id: str) -> list[str]:
    return sorted(c.instance_id for c in mesh.get_model(model_id).copies if c.state == LOADED)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _infer_until_served(client: triton.InferenceServerClient, model_id: str, within: float) -> tuple[np.ndarray, list[str]]:
    """Retries until one request is answered; returns its output and the failures' codes."""
    errors: list[str] = []
    deadline = time.monotonic() + within
    while True:
        try:
            return _infer(client, model_id, timeout=10), errors
        except InferenceServerException as exc:
            errors.append(exc.status())
            assert time.monotonic() < deadline, f"{model_id} never served: {errors}"
            time.sleep(0.1)


class Load:
    """A stream of requests in a thread, bounded in count and in time, recording every
    failure's status code."""

    def __init__(self, mesh, model_id: str, max_requests: int = 100_000, max_seconds: float = 180,
                 timeout: float = 30) -> None:
        self.client = triton.InferenceServerClient(mesh.router_address)
        self.model_id, self.max_requests, self.timeout = model_id, max_requests, timeout
        self.max_seconds = max_seconds
        self.ok, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > end:
                return
            try:
                _infer(self.client, self.model_id, self.timeout)
                self.ok += 1
            except InferenceServerException as exc:
                self.errors.append(exc.status())

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def wait_ok(self, count: int, timeout: float = 30) -> None:
        target = self.ok + count
        _wait(lambda: self.ok >= target or not self._thread.is_alive(), timeout, "requests stalled")
        assert self.ok >= target, f"the load ran out ({self.ok} served) before {count} more were served"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


def test_killed_pod_with_a_second_copy_loses_no_request(etcd_endpoint: str, model_files, tmp_path: pathlib.Path) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=2, capacity="256MiB")
    try:
        mesh.register("twice", model_files["linear-0"], min_copies=2)
        client = triton.InferenceServerClient(mesh.router_address)
        _infer(client, "twice")
        _wait(lambda: _loaded_on(mesh, "twice") == ["pod-0", "pod-1"], 60, "second copy never loaded")
        client.close()
        with Load(mesh, "twice") as load:
            load.wait_ok(20)
            mesh.kill("pod-0")  # kill -9: no lease revoke, its records linger until the TTL
            load.wait_ok(50)
            # The lease lapses: its copy disappears from the route table (GetModel shows it).
            _wait(lambda: _loaded_on(mesh, "twice") == ["pod-1"], 20, "dead pod's copy still listed")
            load.wait_ok(20)
        assert load.errors == [], load.errors
        assert load.ok >= 90
    finally:
        mesh.stop()


def test_single_copy_on_a_killed_pod_is_reloaded(etcd_endpoint: str, model_files, tmp_path: pathlib.Path) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=2, capacity="256MiB")
    try:
        mesh.register("once", model_files["linear-1"])
        client = triton.InferenceServerClient(mesh.router_address)
        _infer(client, "once")
        # The answer can precede the LOADED record in the router's view: wait for it.
        _wait(lambda: len(_loaded_on(mesh, "once")) == 1, 10, "the copy's LOADED record")
        (victim,) = _loaded_on(mesh, "once")
        mesh.kill(victim)
        out, errors = _infer_until_served(client, "once", within=60)
        assert out.shape == (1, 3)
        assert set(errors) <= RETRYABLE, errors
        survivor = ({"pod-0", "pod-1"} - {victim}).pop()
        # Served by a reload on the survivor (the router names the dead pod to placement) as
        # soon as the request arrives; the dead pod's copy leaves the listing when its lease lapses.
        _wait(lambda: _loaded_on(mesh, "once") == [survivor], 20, "dead pod's copy still listed")
        client.close()
    finally:
        mesh.stop()


def _leader(mesh) -> str:
    async def read() -> str:
        client = EtcdClient([mesh.etcd], timeout=2)
        try:
            kv = await client.get(Keys(mesh.root).leader())
        finally:
            await client.close()
        return types.decode(types.LeaderRecord, kv.value).holder_id if kv else ""

    return asyncio.run(read())


def test_placement_leader_killed_a_standby_serves_misses(etcd_endpoint: str, model_files, tmp_path: pathlib.Path) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB")
    try:
        mesh.start_placement("placement-b")
        mesh.register("cold", model_files["linear-2"])
        leader = _leader(mesh)
        assert leader in ("placement", "placement-b")
        mesh.kill(leader)
        standby = ({"placement", "placement-b"} - {leader}).pop()
        _wait(lambda: _leader(mesh) == standby, 15, "standby never took over")
        client = triton.InferenceServerClient(mesh.router_address)
        out, errors = _infer_until_served(client, "cold", within=30)
        assert out.shape == (1, 3) and set(errors) <= RETRYABLE, errors
        client.close()
    finally:
        mesh.stop()


def _dropped(mesh) -> float:
    return mesh.scrape("router").get('mesh_telemetry_samples_total{result="dropped"}', 0.0)


def _counted(mesh, model_id: str) -> int:
    r = redis.Redis.from_url(mesh.redis_url, socket_timeout=2)
    try:
        ns = f"meshserve:{mesh.root.strip('/')}"
        now_bucket = int(time.time()) // 10
        total = 0
        for b in range(now_bucket - 60, now_bucket + 1):
            total += int(r.hget(f"{ns}:req:{b}", model_id) or 0)
        return total
    finally:
        r.close()


def test_redis_killed_under_load_serving_continues(etcd_endpoint: str, model_files, tmp_path: pathlib.Path) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=1, capacity="256MiB", redis=True,
                      env={"MESH_ROUTER_TELEMETRY_FLUSH_S": "0.2", "MESH_REDIS_TIMEOUT_S": "0.3"})
    try:
        mesh.register("busy", model_files["linear-3"])
        with Load(mesh, "busy") as load:
            load.wait_ok(20)
            _wait(lambda: _counted(mesh, "busy") > 0, 10, "telemetry never reached Redis")
            mesh.kill("redis")
            load.wait_ok(50)
            _wait(lambda: _dropped(mesh) > 0, 10, "dropped samples not counted")
            mesh.start_redis()  # same port, empty (no persistence)
            _wait(lambda: _counted(mesh, "busy") > 0, 10, "telemetry did not resume")
            first = _counted(mesh, "busy")
            _wait(lambda: _counted(mesh, "busy") > first, 10, "counts stopped growing")
            # Placement reads the telemetry back (the leader's reconcile pass).
            _wait(lambda: mesh.scrape("placement").get('mesh_telemetry_reads_total{result="ok"}', 0) > 0,
                  30, "placement never read telemetry")
        assert load.errors == [], load.errors
    finally:
        mesh.stop()
