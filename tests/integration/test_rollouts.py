"""Rollouts (mesh/rollout.py, router/rollout_store.py, placement/rollouts.py) end to end: two
routers, two placement replicas, two runtime pods, a real etcd and a real Redis, tritonclient
sending the load. Which model answered is read from the response's model_name.

The failing candidate takes an input of another width, so every request it gets fails with
INVALID_ARGUMENT while the stable model answers them all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import demo, types
from mesh.cli.local import LocalMesh
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import vmodels_pb2, vmodels_pb2_grpc
from tests.integration.conftest import start_mesh

pytestmark = pytest.mark.integration

X = np.ones((1, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def romesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, model_files) -> Iterator[LocalMesh]:
    base = tmp_path_factory.mktemp("romesh")
    m = start_mesh(base, etcd_endpoint, pods=2, routers=2, placements=2, capacity="512MiB", redis=True)
    try:
        for i in range(6):
            m.register(f"linear-{i}", model_files[f"linear-{i}"])
        m.register("wider", demo.save(demo.linear_model(9, in_features=5), base / "wider.onnx"))
        # As linear-*, plus a matrix product over a 128 MB weight on every request: ~20x slower.
        m.register("slow", demo.save(demo.linear_model(10, weight_bytes=128 << 20), base / "slow.onnx"))
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def stub(romesh: LocalMesh) -> Iterator[vmodels_pb2_grpc.VModelsStub]:
    with romesh.router_channel() as channel:
        yield vmodels_pb2_grpc.VModelsStub(channel)


class Load:
    """Requests for `name` from both routers until stopped: who answered, and every failure."""

    def __init__(self, mesh: LocalMesh, name: str, headers: dict[str, str] | None = None) -> None:
        self.clients = [triton.InferenceServerClient(a) for a in mesh.router_addresses]
        self.name, self.headers = name, headers
        self.answers: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,)) for c in self.clients]

    def _run(self, client: triton.InferenceServerClient) -> None:
        inp = triton.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        while not self._stop.is_set():
            try:
                got = client.infer(self.name, [inp], headers=self.headers, client_timeout=30)
                self.answers.append((time.time(), got.get_response().model_name))
            except InferenceServerException as exc:
                self.failures.append((time.time(), str(exc)))
            self._stop.wait(0.005)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        for c in self.clients:
            c.close()


def set_vmodel(mesh: LocalMesh, stub, name: str, targets: dict[str, int]) -> vmodels_pb2.VModelStatus:
    spec = vmodels_pb2.VModelSpec(name=name, targets=[vmodels_pb2.VModelTarget(model_id=m, weight=w)
                                                      for m, w in targets.items()])
    return stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=60, metadata=mesh.auth_metadata)


def start(mesh: LocalMesh, stub, vmodel: str, candidate: str, steps: list[int], dwell_s: float,
          **bounds: object) -> vmodels_pb2.VModelStatus:
    spec = vmodels_pb2.RolloutSpec(vmodel=vmodel, candidate=candidate, steps=steps, dwell_s=dwell_s, **bounds)
    return stub.StartRollout(vmodels_pb2.StartRolloutRequest(spec=spec), timeout=60, metadata=mesh.auth_metadata)


def get(mesh: LocalMesh, stub, name: str) -> vmodels_pb2.VModelStatus:
    return stub.GetVModel(vmodels_pb2.GetVModelRequest(name=name), timeout=10, metadata=mesh.auth_metadata)


def until_ended(mesh: LocalMesh, stub, name: str, timeout_s: float = 90) -> vmodels_pb2.VModelStatus:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status = get(mesh, stub, name)
        if status.rollout.state != "running":
            return status
        time.sleep(0.2)
    raise AssertionError(f"rollout of {name} still running after {timeout_s}s: {get(mesh, stub, name).rollout}")


def weights(status: vmodels_pb2.VModelStatus) -> dict[str, int]:
    return {t.model_id: t.weight for t in status.active}


def test_a_failing_candidate_is_rolled_back_and_the_stable_model_answers_throughout(romesh, stub) -> None:
    set_vmodel(romesh, stub, "ro-a", {"linear-0": 1})
    with Load(romesh, "ro-a") as load:
        time.sleep(0.5)
        status = start(romesh, stub, "ro-a", "wider", [10, 50, 100], 60.0, max_error_rate=0.05, min_requests=5)
        assert status.rollout.state == "running" and weights(status) == {"wider": 10, "linear-0": 90}
        started = time.time()
        ended = until_ended(romesh, stub, "ro-a")
        after = time.time()
        time.sleep(1.5)  # both routers' views show the rollback
        cut = len(load.answers), len(load.failures)
        time.sleep(1.0)
    ro = ended.rollout
    assert ro.state == "rolled_back", ro
    assert weights(ended) == {"linear-0": 100}
    assert "error rate" in ro.reason and ro.step == 0  # judged early, long before the 60 s dwell
    assert ro.figures["candidate_errors"] >= 5 and ro.figures["candidate_error_rate"] > 0.05
    assert ro.history[-1].outcome == "rolled_back"
    # Every failure was the candidate's, and none came after the rollback was visible.
    assert load.failures and all("expects [-1, 5]" in text for _, text in load.failures), load.failures[:3]
    assert len(load.failures) == cut[1]
    assert {m for _, m in load.answers} == {"linear-0"} and len(load.answers) > cut[0]
    detect_ms = ro.figures["detected_unix_ms"] - ro.figures["first_error_unix_ms"]
    print(f"\nrollback: {len(load.failures)} candidate failures of {len(load.answers) + len(load.failures)} "
          f"requests; detected {detect_ms:.0f} ms after the first error's second began; rollout ended "
          f"{after - started:.1f}s after it started")


def test_a_healthy_candidate_is_promoted_step_by_step_through_the_cli(romesh, stub) -> None:
    set_vmodel(romesh, stub, "ro-b", {"linear-1": 1})
    token = dict(romesh.auth_metadata).get("authorization", "").removeprefix("Bearer ")
    with Load(romesh, "ro-b") as load:
        time.sleep(0.5)
        cli = subprocess.run(
            [sys.executable, "-m", "mesh.cli.main", "alias", "rollout", "ro-b", "--to", "linear-2", "--steps",
             "20,100", "--dwell", "2s", "--min-requests", "5", "--max-p99-ratio", "100", "--wait",
             "--router", romesh.router_addresses[0], "--token", token, "--timeout", "60"],
            capture_output=True, text=True, timeout=120)
        time.sleep(1.5)
        cut = len(load.answers)
        time.sleep(1.0)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "promoted" in cli.stdout
    status = get(romesh, stub, "ro-b")
    assert status.rollout.state == "promoted" and weights(status) == {"linear-2": 100}
    assert [(h.percent, h.outcome) for h in status.rollout.history] == [(20, "promoted"), (100, "promoted")]
    assert all(h.figures["candidate_requests"] >= 5 for h in status.rollout.history)
    assert load.failures == []
    assert {m for _, m in load.answers} == {"linear-1", "linear-2"}
    assert {m for _, m in load.answers[cut:]} == {"linear-2"}
    repeat = subprocess.run(  # the walk-through's traffic: who answered, how often
        [sys.executable, "-m", "mesh.cli.main", "infer", "ro-b", "--repeat", "5", "--input", "input=[[1,2,3,4]]",
         "--router", romesh.router_addresses[1], "--token", token], capture_output=True, text=True, timeout=60)
    assert repeat.returncode == 0 and repeat.stdout.split() == ["5", "model", "linear-2", "version", "1"], repeat


def test_a_slow_candidate_is_rolled_back_by_its_p99(romesh, stub) -> None:
    set_vmodel(romesh, stub, "ro-e", {"linear-0": 1})
    with Load(romesh, "ro-e") as load:
        time.sleep(0.5)
        start(romesh, stub, "ro-e", "slow", [50, 100], 3.0, max_p99_ratio=1.5, min_requests=5)
        ended = until_ended(romesh, stub, "ro-e")
    ro = ended.rollout
    assert ro.state == "rolled_back" and "p99" in ro.reason and ro.step == 0, ro
    assert ro.figures["p99_ratio"] > 1.5 and ro.figures["candidate_errors"] == 0
    assert weights(ended) == {"linear-0": 100}
    assert load.failures == []  # slow, not failing: every request was answered
    print(f"\nslow candidate: {ro.reason}")


def test_rules_blue_green_tag_route_and_abort(romesh, stub) -> None:
    set_vmodel(romesh, stub, "ro-c", {"linear-3": 1})
    with pytest.raises(grpc.RpcError) as err:
        start(romesh, stub, "ro-c", "linear-4", [50, 10, 100], 5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "increase" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        start(romesh, stub, "ro-c", "linear-4", [0, 100], 5.0)  # 0 without a tag route: nothing would reach it
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        start(romesh, stub, "ro-c", "no-such-model", [50, 100], 5.0)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.AbortRollout(vmodels_pb2.AbortRolloutRequest(vmodel="ro-c"), timeout=10, metadata=romesh.auth_metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Blue-green: step 0 sends only tagged requests to the candidate.
    status = start(romesh, stub, "ro-c", "linear-4", [0, 100], 300.0, tag_header="x-canary", tag_value="1")
    assert weights(status) == {"linear-3": 100, "linear-4": 0}
    with Load(romesh, "ro-c", {"x-canary": "1"}) as tagged, Load(romesh, "ro-c") as plain:
        time.sleep(1.0)
    assert {m for _, m in tagged.answers} == {"linear-4"} and {m for _, m in plain.answers} == {"linear-3"}
    assert tagged.failures == plain.failures == []
    with pytest.raises(grpc.RpcError) as err:  # the rollout owns the weights
        set_vmodel(romesh, stub, "ro-c", {"linear-5": 1})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "abort" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        start(romesh, stub, "ro-c", "linear-5", [50, 100], 5.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    aborted = stub.AbortRollout(vmodels_pb2.AbortRolloutRequest(vmodel="ro-c"), timeout=10,
                                metadata=romesh.auth_metadata)
    assert aborted.rollout.state == "aborted" and weights(aborted) == {"linear-3": 100}
    assert not aborted.spec.tags  # the rollout's tag route went with it
    time.sleep(1.0)
    with Load(romesh, "ro-c", {"x-canary": "1"}) as tagged:
        time.sleep(0.5)
    assert {m for _, m in tagged.answers} == {"linear-3"}
    set_vmodel(romesh, stub, "ro-c", {"linear-3": 1, "linear-5": 1})  # no rollout: SetVModel works again
    with pytest.raises(grpc.RpcError) as err:
        start(romesh, stub, "ro-c", "linear-4", [50, 100], 5.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "one target" in err.value.details()


async def _leader(mesh: LocalMesh) -> str:
    client = EtcdClient([mesh.etcd])
    try:
        kv = await client.get(Keys(mesh.root).leader())
        return types.decode(types.LeaderRecord, kv.value).holder_id if kv else ""
    finally:
        await client.close()


def test_a_new_placement_leader_resumes_a_rollout(romesh, stub) -> None:
    """kill -9 of the placement leader after the first step: the standby leads and finishes the
    rollout from the record and Redis alone. Last in the module: one placement replica is left."""
    set_vmodel(romesh, stub, "ro-d", {"linear-4": 1})
    with Load(romesh, "ro-d") as load:
        time.sleep(0.5)
        start(romesh, stub, "ro-d", "linear-5", [25, 50, 100], 2.0, min_requests=5)
        end = time.monotonic() + 60
        while get(romesh, stub, "ro-d").rollout.step < 1 and time.monotonic() < end:
            time.sleep(0.1)
        assert get(romesh, stub, "ro-d").rollout.step == 1
        leader = asyncio.run(_leader(romesh))
        assert leader in ("placement", "placement-1")
        romesh.kill(leader)
        ended = until_ended(romesh, stub, "ro-d")
    assert ended.rollout.state == "promoted", ended.rollout
    assert [h.percent for h in ended.rollout.history] == [25, 50, 100]
    assert weights(ended) == {"linear-5": 100}
    assert load.failures == []
