"""VModels (router/vmodels.py, router/vmodel_store.py) end to end: two routers, placement, two
runtime pods and a real etcd. Which model answered is read from the response's model_name (the
concrete target) and checked against the output of that model."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mesh import credentials, types
from mesh.cli.local import LocalMesh
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2, vmodels_pb2, vmodels_pb2_grpc
from mesh.types import TokenRecord, VModelRecord
from tests.integration.conftest import start_mesh

pytestmark = pytest.mark.integration

X = np.ones((1, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def vmesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, model_files) -> Iterator[LocalMesh]:
    m = start_mesh(tmp_path_factory.mktemp("vmesh"), etcd_endpoint, pods=2, routers=2, capacity="256MiB")
    try:
        for i in range(4):
            m.register(f"linear-{i}", model_files[f"linear-{i}"])
        m.register("corrupt", model_files["corrupt"])
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def stub(vmesh: LocalMesh) -> Iterator[vmodels_pb2_grpc.VModelsStub]:
    with vmesh.router_channel() as channel:
        yield vmodels_pb2_grpc.VModelsStub(channel)


@pytest.fixture(scope="module")
def clients(vmesh: LocalMesh) -> Iterator[list[triton.InferenceServerClient]]:
    cs = [triton.InferenceServerClient(a) for a in vmesh.router_addresses]
    yield cs
    for c in cs:
        c.close()


def set_vmodel(vmesh: LocalMesh, stub, name: str, targets: dict[str, int], sticky: str = "",
               tags: tuple[tuple[str, str, str], ...] = (), timeout: float = 60) -> vmodels_pb2.VModelStatus:
    spec = vmodels_pb2.VModelSpec(
        name=name, sticky_header=sticky,
        targets=[vmodels_pb2.VModelTarget(model_id=m, weight=w) for m, w in targets.items()],
        tags=[vmodels_pb2.TagRoute(header=h, value=v, model_id=m) for h, v, m in tags])
    return stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=timeout, metadata=vmesh.auth_metadata)


def answered_by(client: triton.InferenceServerClient, name: str, headers: dict | None = None) -> str:
    inp = triton.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    result = client.infer(name, [inp], headers=headers, client_timeout=60)
    return result.get_response().model_name


def wait_synced(vmesh: LocalMesh, stub, name: str) -> None:
    """Both routers show the vmodel (the second one through its own watch)."""
    with vmesh.router_channel(vmesh.router_addresses[1]) as channel:
        other = vmodels_pb2_grpc.VModelsStub(channel)
        for _ in range(100):
            try:
                if other.GetVModel(vmodels_pb2.GetVModelRequest(name=name), timeout=5,
                                   metadata=vmesh.auth_metadata).spec.name == name:
                    return
            except grpc.RpcError:
                pass
            threading.Event().wait(0.05)
    raise AssertionError(f"router-1 never showed vmodel {name}")


def test_weights_are_honoured_and_the_response_names_the_target(vmesh, stub, clients) -> None:
    """A 70/30 split over 400 requests (model_name naming the vmodel) lands within 4.5
    binomial standard deviations of 280; every response names a concrete target."""
    status = set_vmodel(vmesh, stub, "split", {"linear-0": 70, "linear-1": 30})
    assert {t.model_id: t.weight for t in status.active} == {"linear-0": 70, "linear-1": 30}
    n, p = 400, 0.7
    counts = Counter(answered_by(clients[0], "split") for _ in range(n))
    assert set(counts) == {"linear-0", "linear-1"}
    bound = 4.5 * math.sqrt(n * p * (1 - p))
    assert abs(counts["linear-0"] - n * p) <= bound, counts
    samples = vmesh.scrape("router")
    ok = {t: samples.get(f'mesh_vmodel_requests_total{{outcome="ok",target="{t}",vmodel="split"}}', 0)
          for t in ("linear-0", "linear-1")}
    assert ok == {"linear-0": counts["linear-0"], "linear-1": counts["linear-1"]}
    assert samples.get('mesh_vmodel_request_seconds_count{target="linear-0",vmodel="split"}', 0) == counts["linear-0"]


def test_mm_vmodel_id_wins_and_metadata_names_the_target(vmesh, stub, clients) -> None:
    set_vmodel(vmesh, stub, "only-2", {"linear-2": 1})
    assert answered_by(clients[0], "linear-0", headers={"mm-vmodel-id": "only-2"}) == "linear-2"
    assert answered_by(clients[0], "linear-0", headers={"mm-vmodel-id": "only-2", "mm-model-id": "linear-1"}) \
        == "linear-2"
    assert answered_by(clients[0], "only-2") == "linear-2"
    assert clients[0].is_model_ready("only-2")
    assert clients[0].get_model_metadata("only-2").name == "linear-2"
    # mm-vmodel-id naming a model (no vmodel of that name) still reaches the model, as before.
    assert answered_by(clients[0], "x", headers={"mm-vmodel-id": "linear-1"}) == "linear-1"


def test_sticky_keys_are_stable_across_routers(vmesh, stub, clients) -> None:
    set_vmodel(vmesh, stub, "sticky", {"linear-0": 50, "linear-1": 50}, sticky="x-user")
    wait_synced(vmesh, stub, "sticky")
    seen = {}
    for i in range(40):
        user = {"x-user": f"user-{i}"}
        picks = {answered_by(c, "sticky", user) for c in clients for _ in range(2)}
        assert len(picks) == 1, (user, picks)
        seen[i] = picks.pop()
    assert set(seen.values()) == {"linear-0", "linear-1"}  # keys spread over both


def test_tag_routes_select_a_target(vmesh, stub, clients) -> None:
    set_vmodel(vmesh, stub, "tagged", {"linear-0": 1}, tags=(("x-variant", "canary", "linear-3"),))
    assert {answered_by(clients[0], "tagged", {"x-variant": "canary"}) for _ in range(10)} == {"linear-3"}
    assert {answered_by(clients[0], "tagged") for _ in range(10)} == {"linear-0"}
    assert answered_by(clients[0], "tagged", {"x-variant": "other"}) == "linear-0"


def test_rest_resolves_vmodels_with_their_headers(vmesh, stub) -> None:
    set_vmodel(vmesh, stub, "rest-tagged", {"linear-0": 1}, tags=(("x-variant", "b", "linear-1"),))
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 1, 1, 1]}]}).encode()

    def post(headers: dict[str, str]) -> dict:
        req = urllib.request.Request(f"http://{vmesh.rest_address}/v2/models/rest-tagged/infer", body,
                                     {"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    assert post({})["model_name"] == "linear-0"
    assert post({"x-variant": "b"})["model_name"] == "linear-1"


def test_unknown_vmodel_and_bad_input(vmesh, stub, clients) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GetVModel(vmodels_pb2.GetVModelRequest(name="nope"), timeout=10, metadata=vmesh.auth_metadata)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    with pytest.raises(InferenceServerException) as ierr:
        answered_by(clients[0], "linear-0", headers={"mm-vmodel-id": "nope"})
    assert ierr.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(grpc.RpcError) as err:
        set_vmodel(vmesh, stub, "v", {"not-registered": 1})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "not-registered" in err.value.details()
    for targets, sticky, needle in [({"linear-0": 0}, "", "weight 0"), ({"linear-0": 1}, "Bad Header", "sticky_header"),
                                    ({"split": 1}, "", "is a vmodel"), ({"bad/id": 1}, "", "invalid model_id")]:
        with pytest.raises(grpc.RpcError) as err:
            set_vmodel(vmesh, stub, "v", targets, sticky)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (targets, err.value.details())
        assert needle in err.value.details() and "/e2e-" not in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        set_vmodel(vmesh, stub, "linear-0", {"linear-1": 1})  # a model's name
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    deleted = stub.DeleteVModel(vmodels_pb2.DeleteVModelRequest(name="nope"), timeout=10, metadata=vmesh.auth_metadata)
    assert not deleted.existed


def test_list_and_delete(vmesh, stub, clients) -> None:
    set_vmodel(vmesh, stub, "gone-soon", {"linear-0": 1})
    names = [v.spec.name for v in stub.ListVModels(vmodels_pb2.ListVModelsRequest(), timeout=10,
                                                      metadata=vmesh.auth_metadata).vmodels]
    assert "gone-soon" in names and names == sorted(names)
    assert stub.DeleteVModel(vmodels_pb2.DeleteVModelRequest(name="gone-soon"), timeout=10,
                             metadata=vmesh.auth_metadata).existed
    with pytest.raises(InferenceServerException) as ierr:
        answered_by(clients[0], "gone-soon")
    assert ierr.value.status() == "StatusCode.NOT_FOUND"


def test_switch_under_load_fails_no_request(vmesh, stub, clients, model_files) -> None:
    """SetVModel to a cold target answers only once it is ready with as many copies as the old
    target has, and no request fails meanwhile; afterwards every request goes to the new one."""
    vmesh.register("old", model_files["linear-2"], min_copies=2)
    vmesh.register("new", model_files["linear-3"])
    set_vmodel(vmesh, stub, "blue", {"old": 1})
    for _ in range(200):  # placement keeps min_copies: wait for both copies
        if sum(c.state == 2 for c in vmesh.get_model("old").copies) == 2:
            break
        threading.Event().wait(0.1)
    assert sum(c.state == 2 for c in vmesh.get_model("old").copies) == 2
    stop = threading.Event()
    failures: list[str] = []
    answers: list[list[str]] = [[], []]

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                answers[i].append(answered_by(clients[i], "blue"))
            except InferenceServerException as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        threading.Event().wait(0.5)
        before = sum(len(a) for a in answers)
        status = set_vmodel(vmesh, stub, "blue", {"new": 1}, timeout=90)
        ready_at_switch = sum(c.state == 2 for c in vmesh.get_model("new").copies)
        cut = [len(a) for a in answers]
        threading.Event().wait(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert before > 0 and {t.model_id for t in status.active} == {"new"} and not status.pending
    assert ready_at_switch >= 2  # as many copies as "old" had
    for i in (0, 1):
        assert "new" in answers[i][cut[i]:]
        # once the new target is in, a router never goes back (a few in flight at the cut may)
        first_new = answers[i].index("new")
        assert "old" not in answers[i][first_new + 4:]


def test_switch_to_a_target_that_cannot_load_keeps_traffic(vmesh, stub, clients) -> None:
    set_vmodel(vmesh, stub, "safe", {"linear-0": 1})
    with pytest.raises(grpc.RpcError) as err:
        set_vmodel(vmesh, stub, "safe", {"corrupt": 1}, timeout=90)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = stub.GetVModel(vmodels_pb2.GetVModelRequest(name="safe"), timeout=10, metadata=vmesh.auth_metadata)
    assert {t.model_id for t in status.active} == {"linear-0"} and not status.pending
    assert "abandoned" in status.switch_note
    assert answered_by(clients[0], "safe") == "linear-0"



def test_cli_alias_commands(vmesh, clients) -> None:
    token = dict(vmesh.auth_metadata).get("authorization", "").removeprefix("Bearer ")

    def mesh(*argv: str) -> str:
        out = subprocess.run([sys.executable, "-m", "mesh.cli.main", *argv, "--router", vmesh.router_address,
                              "--token", token], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    printed = mesh("alias", "set", "cli-ab", "linear-0=3", "linear-1=1", "--sticky-header", "x-user",
                   "--tag", "x-variant=canary:linear-2")
    assert "linear-0=3" in printed and "linear-1=1" in printed
    assert answered_by(clients[0], "cli-ab", {"x-variant": "canary"}) == "linear-2"
    assert "model linear-2 version" in mesh("infer", "cli-ab", "--header", "x-variant=canary")
    assert "output FP32 [1, 3]" in mesh("infer", "cli-ab", "--input", "input=[[1,2,3,4]]")
    status = json.loads(mesh("alias", "status", "cli-ab", "--output", "json"))
    assert status["active"]["linear-0"]["weight"] == 3 and status["sticky_header"] == "x-user"
    assert status["tags"] == [{"header": "x-variant", "value": "canary", "model": "linear-2"}]
    assert "cli-ab" in mesh("alias", "list")
    assert "cli-ab: linear-0=3, linear-1=1" in mesh("alias", "get", "cli-ab")
    assert "deleted" in mesh("alias", "delete", "cli-ab")
    bad = subprocess.run([sys.executable, "-m", "mesh.cli.main", "alias", "get", "cli-ab", "--router",
                          vmesh.router_address, "--token", token], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


def test_vmodels_belong_to_a_tenant(vmesh, clients, model_files) -> None:
    """acme's vmodel names acme's models by their public ids and answers with them; to bob it
    answers exactly as an absent vmodel, and bob cannot name acme's models as targets; an
    infer-scope token cannot set one."""
    tokens = {"acme": credentials.new_token(), "bob": credentials.new_token(), "acme-infer": credentials.new_token()}

    async def put_tokens() -> None:
        etcd = EtcdClient([vmesh.etcd_endpoint])
        try:
            for who, token in tokens.items():
                record = TokenRecord(tenant=who.split("-")[0], scope="infer" if who.endswith("-infer") else "tenant")
                await etcd.put(Keys(vmesh.root).token(credentials.digest(token)), types.encode(record))
        finally:
            await etcd.close()

    asyncio.run(put_tokens())
    md = {who: credentials.metadata(token) for who, token in tokens.items()}
    uri = model_files["linear-1"].resolve().as_uri()
    with vmesh.router_channel() as channel:
        registry = registry_pb2_grpc.ModelRegistryStub(channel)
        stub = vmodels_pb2_grpc.VModelsStub(channel)
        for _ in range(200):  # until the router's view has the tokens
            try:
                registry.RegisterModel(registry_pb2.RegisterModelRequest(
                    spec=types_pb2.ModelSpec(model_id="lin", storage_uri=uri)), timeout=10, metadata=md["acme"])
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                threading.Event().wait(0.05)
        spec = vmodels_pb2.VModelSpec(name="tv", targets=[vmodels_pb2.VModelTarget(model_id="lin", weight=1)])
        status = stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=60, metadata=md["acme"])
        assert [t.model_id for t in status.active] == ["lin"] and status.spec.name == "tv"
        assert answered_by(clients[0], "tv", {"authorization": f"Bearer {tokens['acme']}"}) == "lin"
        for call in (lambda: stub.GetVModel(vmodels_pb2.GetVModelRequest(name="tv"), timeout=10, metadata=md["bob"]),
                     lambda: stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=10, metadata=md["bob"])):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and "acme" not in err.value.details()
        with pytest.raises(InferenceServerException) as ierr:
            answered_by(clients[0], "x", {"authorization": f"Bearer {tokens['bob']}", "mm-vmodel-id": "tv"})
        assert ierr.value.status() == "StatusCode.NOT_FOUND"
        assert not stub.ListVModels(vmodels_pb2.ListVModelsRequest(), timeout=10, metadata=md["bob"]).vmodels
        with pytest.raises(grpc.RpcError) as err:
            stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=10, metadata=md["acme-infer"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # the admin sees it under its internal name
        admin = stub.GetVModel(vmodels_pb2.GetVModelRequest(name="acme:tv"), timeout=10, metadata=vmesh.auth_metadata)
        assert [t.model_id for t in admin.active] == ["acme:lin"]


def test_stream_infer_resolves_each_message(vmesh, stub) -> None:
    # tritonclient's own descriptors of the V2 service (ours would clash in the default pool)
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    set_vmodel(vmesh, stub, "streamed", {"linear-0": 1}, tags=(("x-variant", "b", "linear-1"),))

    def requests():
        for _ in range(3):
            r = pb.ModelInferRequest(model_name="streamed")
            r.inputs.add(name="input", datatype="FP32", shape=[1, 4])
            r.raw_input_contents.append(X.tobytes())
            yield r

    with vmesh.router_channel() as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel)
        for headers, target in (((), "linear-0"), ((("x-variant", "b"),), "linear-1")):
            out = list(infer.ModelStreamInfer(requests(), timeout=60, metadata=(*vmesh.auth_metadata, *headers)))
            assert [m.error_message for m in out] == ["", "", ""]
            assert {m.infer_response.model_name for m in out} == {target}


def test_a_switch_left_pending_never_routes_and_is_completed(vmesh, stub, clients, model_files) -> None:
    """A router that died mid-switch leaves `pending` in the record: requests keep going to
    the active target; once the pending target is ready, the routers' sweep completes the
    switch; a SetVModel of the same spec resumes one whose target is cold."""
    for model_id in ("cold-x", "cold-y"):
        vmesh.register(model_id, model_files["linear-3"])

    async def put_pending(name: str, target: str) -> None:
        etcd = EtcdClient([vmesh.etcd_endpoint])
        try:
            record = VModelRecord(name=name, active={"linear-0": 1}, pending={target: 1}, switch_started_unix_ms=1)
            await etcd.put(Keys(vmesh.root).vmodel(name), types.encode(record))
        finally:
            await etcd.close()

    def get(name: str) -> vmodels_pb2.VModelStatus:
        return stub.GetVModel(vmodels_pb2.GetVModelRequest(name=name), timeout=10, metadata=vmesh.auth_metadata)

    asyncio.run(put_pending("half", "cold-x"))
    for _ in range(100):
        try:
            if get("half").pending:
                break
        except grpc.RpcError:
            threading.Event().wait(0.05)
    assert [t.model_id for t in get("half").pending] == ["cold-x"]
    assert {answered_by(clients[i % 2], "half") for i in range(20)} == {"linear-0"}
    assert answered_by(clients[0], "cold-x") == "cold-x"  # loads it: now ready
    for _ in range(300):
        if not get("half").pending:
            break
        threading.Event().wait(0.1)
    status = get("half")
    assert [t.model_id for t in status.active] == ["cold-x"] and not status.pending
    assert answered_by(clients[1], "half") == "cold-x"

    asyncio.run(put_pending("half2", "cold-y"))
    status = set_vmodel(vmesh, stub, "half2", {"cold-y": 1}, timeout=90)
    assert [t.model_id for t in status.active] == ["cold-y"] and not status.pending
    assert status.active[0].ready_copies >= 1


def test_a_rollout_needs_telemetry(vmesh, stub) -> None:
    """This mesh has no Redis: a rollout could not be judged, so it does not start."""
    set_vmodel(vmesh, stub, "no-redis", {"linear-0": 1})
    spec = vmodels_pb2.RolloutSpec(vmodel="no-redis", candidate="linear-1", steps=[50, 100], dwell_s=5)
    with pytest.raises(grpc.RpcError) as err:
        stub.StartRollout(vmodels_pb2.StartRolloutRequest(spec=spec), timeout=30, metadata=vmesh.auth_metadata)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "MESH_REDIS_URL" in err.value.details()
    status = stub.GetVModel(vmodels_pb2.GetVModelRequest(name="no-redis"), timeout=10, metadata=vmesh.auth_metadata)
    assert {t.model_id: t.weight for t in status.active} == {"linear-0": 1} and not status.HasField("rollout")
