"""A rolling restart of every pod and every router under a steady load shows no client-visible
error (issue 9 item 3; RELIABILITY.md F6, F7). Real processes (LocalMesh): etcd, 2 placement
replicas, 2 runtime pods, 2 routers; 3 models registered with min_copies=2, so each has a copy
on both pods.

The client is what one behind a Kubernetes Service sees: requests spread, round robin, over
the routers that are endpoints (ready: grpc health SERVING, re-read every 0.1 s, standing in for
the endpoint removal that starts when a router pod is deleted), and a request answered
UNAVAILABLE (a router that stopped accepting, or is down) is retried once on the other router.
Nothing else is retried; every answer is checked against onnxruntime. (A client that keeps
sending to a stopping router until it closes its port, ignoring its NOT_SERVING, sees a
CANCELLED now and then: grpc-core cancels calls that reach a server in the instant it shuts
down, grpc/grpc#41785. The routers' NOT_SERVING and settle period exist to take traffic away
from them first.)

Then, one at a time (never more than one pod draining): each pod gets SIGTERM, drains (its
copies stay served until placement has taken its assignments away; the other pod holds the
other copy) and exits 0; it is started again, and the next step waits until it is back and
every model has its two LOADED copies again. Then each router gets SIGTERM (NOT_SERVING, a
settle period of several probe intervals, in-flight requests finish, exit 0) and is started
again on the same port; the next step waits until the client has been served by it again.

Needs every part of the drain: the pod's (puller/agent.py), placement's (it must not count a
draining pod's copy toward min_copies nor place on it, delete its assignments once another
copy is LOADED, and re-copy onto the restarted pod), the router's retry on another copy when
a copy answers UNAVAILABLE or CANCELLED (a pod stopping: grpc/grpc#41785), and the router's own
drain (router/main.py).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import signal
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from mesh.cli.local import router_name

from .conftest import start_mesh

pytestmark = pytest.mark.integration

LOADED = 2  # mesh.v1.CopyState.LOADED
MODELS = ("linear-1", "linear-2", "linear-3")
PODS = ("pod-0", "pod-1")
X = np.array([[1, 2, 3, 4]], dtype=np.float32)
DRAIN_TIMEOUT_S = 60  # the pod's own bound; placement is expected to finish far sooner
PROBE_S = 0.1  # how often the client's "Service" re-reads which routers are ready
SETTLE_S = 1.0  # the routers' drain settle: several probe periods


def _serving(channel: grpc.Channel) -> bool:
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _golden(path: pathlib.Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": X})[0]


def _infer(client: triton.InferenceServerClient, model_id: str) -> np.ndarray:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer(model_id, [inp], client_timeout=30).as_numpy("output")


class ServiceClient:
    """What a client behind a Kubernetes Service sees: requests go, round robin, to the routers
    that are endpoints — ready, i.e. grpc health SERVING, polled every PROBE_S (standing in for
    the endpoint removal that starts when a router pod is deleted, and for its readiness probe
    when it is back) — and one after UNAVAILABLE is retried once on the other router. Bounded in
    count and in time; counts what each router served, retries, and every failure."""

    def __init__(self, addresses: list[str], golden: dict[str, np.ndarray], threads: int = 2,
                 max_requests: int = 200_000, max_seconds: float = 400) -> None:
        self.addresses, self.golden = addresses, golden
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok, self.retried, self.errors = 0, 0, []
        self.served = dict.fromkeys(addresses, 0)
        self.endpoints = list(addresses)  # replaced whole by the prober (no lock needed to read)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def _probe(self) -> None:
        channels = {a: grpc.insecure_channel(a) for a in self.addresses}
        end = time.monotonic() + self.max_seconds
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                ready = [a for a, ch in channels.items() if _serving(ch)]
                self.endpoints = ready or list(self.addresses)  # none ready: a Service sends anyway
                self._stop.wait(PROBE_S)
        finally:
            for ch in channels.values():
                ch.close()

    def _run(self, t: int) -> None:
        clients = {a: triton.InferenceServerClient(a) for a in self.addresses}
        models = itertools.cycle(sorted(self.golden))
        turn = itertools.count(t)
        end = time.monotonic() + self.max_seconds
        try:
            for _ in range(self.max_requests // (len(self._threads) - 1)):
                if self._stop.is_set() or time.monotonic() > end:
                    return
                endpoints = self.endpoints
                self._one(clients, next(models), endpoints[next(turn) % len(endpoints)])
        finally:
            for c in clients.values():
                c.close()

    def _one(self, clients: dict[str, triton.InferenceServerClient], model_id: str, first: str) -> None:
        other = next(a for a in self.addresses if a != first)
        for attempt, address in enumerate((first, other)):
            try:
                out = _infer(clients[address], model_id)
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE" and attempt == 0:
                    with self._lock:
                        self.retried += 1
                    continue
                with self._lock:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {address} {model_id}: "
                                       f"{exc.status()}: {exc.message()}")
                return
            with self._lock:
                if np.allclose(out, self.golden[model_id], rtol=1e-6):
                    self.ok += 1
                    self.served[address] += 1
                else:
                    self.errors.append(f"{address} {model_id}: wrong answer {out!r}")
            return

    def wait_ok(self, count: int, timeout: float = 60) -> None:
        target, deadline = self.ok + count, time.monotonic() + timeout
        while self.ok < target:
            assert any(t.is_alive() for t in self._threads), f"the load ran out; errors {self.errors[:3]}"
            assert time.monotonic() < deadline, f"load stalled at {self.ok} answers; errors {self.errors[:3]}"
            time.sleep(0.05)

    def wait_served_by(self, address: str, count: int, timeout: float = 60) -> None:
        target, deadline = self.served[address] + count, time.monotonic() + timeout
        while self.served[address] < target:
            assert time.monotonic() < deadline, f"{address} never served the client again"
            time.sleep(0.05)

    def __enter__(self) -> ServiceClient:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _copies(mesh, model_id: str) -> list[str]:
    return sorted(c.instance_id for c in mesh.get_model(model_id).copies if c.state == LOADED)


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.1)
    return time.monotonic() - start


def _all_copied(mesh) -> bool:
    return all(_copies(mesh, m) == list(PODS) for m in MODELS)


def _sigterm(mesh, name: str, timeout: float) -> tuple[int | None, float]:
    """SIGTERM one child, wait for it to exit on its own; returns (exit code, seconds)."""
    proc, t0 = mesh.procs[name], time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout)
    mesh.stop_process(name)  # it has exited: only forgets it
    return rc, time.monotonic() - t0


def test_rolling_restart_of_every_pod_and_router_under_load_has_no_client_error(
    etcd_endpoint: str, model_files: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    mesh = start_mesh(tmp_path / "mesh", etcd_endpoint, pods=2, routers=2, placements=2, capacity="256MiB",
                      env={"MESH_RUNTIME_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
                           "MESH_ROUTER_DRAIN_SETTLE_S": str(SETTLE_S)})
    figures: list[str] = []
    try:
        for m in MODELS:
            mesh.register(m, model_files[m], min_copies=2)
        copied_s = _wait(lambda: _all_copied(mesh), 90, "the models never had a copy on both pods")
        figures.append(f"2 copies of {len(MODELS)} models loaded in {copied_s:.1f}s")
        golden = {m: _golden(model_files[m]) for m in MODELS}
        t_start = time.monotonic()
        with ServiceClient(mesh.router_addresses, golden) as load:
            load.wait_ok(50)
            for i, pod in enumerate(PODS):
                drains = mesh.log(pod).read_text(errors="replace").count("drained in")
                ok, retried = load.ok, load.retried
                rc, drain_s = _sigterm(mesh, pod, DRAIN_TIMEOUT_S + 30)
                assert rc == 0, f"{pod} exited with {rc}"
                log = mesh.log(pod).read_text(errors="replace")
                assert log.count("drained in") == drains + 1, f"{pod}'s drain ended by its timeout"
                load.wait_ok(20)  # served by the other pod alone
                mesh.start_pod(i)
                back_s = _wait(lambda: _all_copied(mesh), 90, f"{pod}'s copies never came back")
                load.wait_ok(20)
                figures.append(f"{pod}: drained and exited 0 in {drain_s:.1f}s, back with both copies "
                               f"of every model {back_s:.1f}s after its restart ({load.ok - ok} answers, "
                               f"{load.retried - retried} retried)")
            for i, address in enumerate(mesh.router_addresses):
                name = router_name(i)
                ok, retried = load.ok, load.retried
                rc, stop_s = _sigterm(mesh, name, 60)
                assert rc == 0, f"{name} exited with {rc}"
                load.wait_ok(20)  # served by the other router alone
                mesh.start_router(i)  # same port
                t0 = time.monotonic()
                load.wait_served_by(address, 20)
                figures.append(f"{name}: drained and exited 0 in {stop_s:.1f}s, serving the client "
                               f"again {time.monotonic() - t0:.1f}s after its restart ({load.ok - ok} "
                               f"answers, {load.retried - retried} retried)")
            load.wait_ok(50)
        total_s = time.monotonic() - t_start
        print("\nrolling restart:\n  " + "\n  ".join(figures))
        print(f"rolling restart: {total_s:.1f}s, {load.ok} correct answers, {load.retried} retried once on "
              f"the other router after UNAVAILABLE, {len(load.errors)} client-visible errors")
        assert load.errors == [], load.errors[:10]
    finally:
        mesh.stop()
