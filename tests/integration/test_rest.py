"""The REST front (router/rest.py) against a real LocalMesh, with unmodified clients:
tritonclient.http (sync and aio), KServe's InferenceRESTClient (in a child process: its
generated `inference` protobuf package cannot share one with tritonclient's), httpx,
requests and curl — health, metadata, config, statistics, infer (JSON and binary, every
datatype), repository index / load / unload, the registration API over JSON, errors and
authentication (issue 11)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import textwrap
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import requests
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from mesh import demo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import tokens_pb2, tokens_pb2_grpc

from .conftest import start_mesh

pytestmark = pytest.mark.integration

MAX_BODY = 1 << 20  # the test meshes' MESH_ROUTER_MAX_MESSAGE_BYTES

# V2 datatype -> (ONNX element type, numpy sample)
DATATYPES = {
    "BOOL": (TensorProto.BOOL, np.array([[True, False]])),
    "UINT8": (TensorProto.UINT8, np.array([[0, 255]], np.uint8)),
    "UINT16": (TensorProto.UINT16, np.array([[0, 65535]], np.uint16)),
    "UINT32": (TensorProto.UINT32, np.array([[0, 2**32 - 1]], np.uint32)),
    "UINT64": (TensorProto.UINT64, np.array([[0, 2**64 - 1]], np.uint64)),
    "INT8": (TensorProto.INT8, np.array([[-128, 127]], np.int8)),
    "INT16": (TensorProto.INT16, np.array([[-32768, 32767]], np.int16)),
    "INT32": (TensorProto.INT32, np.array([[-(2**31), 2**31 - 1]], np.int32)),
    "INT64": (TensorProto.INT64, np.array([[-(2**63), 2**63 - 1]], np.int64)),
    "FP16": (TensorProto.FLOAT16, np.array([[0.5, -2.0]], np.float16)),
    "FP32": (TensorProto.FLOAT, np.array([[0.25, -1e30]], np.float32)),
    "FP64": (TensorProto.DOUBLE, np.array([[0.1, -1e300]], np.float64)),
    "BYTES": (TensorProto.STRING, np.array([[b"a\x00b", "é".encode()]], dtype=object)),
}
JSON_TYPES = [dt for dt in DATATYPES if dt != "BYTES"] + ["BYTES"]  # BYTES in JSON: UTF-8 strings


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    folder: pathlib.Path = tmp_path_factory.mktemp("rest")
    m = start_mesh(folder, etcd_endpoint, pods=2, capacity="256MiB",
                   env={"MESH_ROUTER_MAX_MESSAGE_BYTES": str(MAX_BODY)})
    try:
        m.register("lin", demo.save(demo.linear_model(1), folder / "lin.onnx"))
        m.register("stats", demo.save(demo.linear_model(2), folder / "stats.onnx"))
        m.register("lu", demo.save(demo.linear_model(4), folder / "lu.onnx"))
        for dt, (elem, _) in DATATYPES.items():
            m.register(f"id-{dt.lower()}", demo.save(demo.identity_model(elem), folder / f"id-{dt}.onnx"))
        m.register("id-bf16", demo.save(demo.identity_model(TensorProto.BFLOAT16), folder / "id-bf16.onnx"))
        yield m
    finally:
        m.stop()


@pytest.fixture
def url(mesh: LocalMesh) -> str:
    return f"http://{mesh.rest_address}"


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(mesh.rest_address, connection_timeout=120, network_timeout=120)
    try:
        yield c
    finally:
        c.close()


def _lin_input(binary: bool = True) -> triton.InferInput:
    x = triton.InferInput("input", [2, 4], "FP32")
    x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4), binary_data=binary)
    return x


# -- tritonclient.http ------------------------------------------------------------------------------


def test_tritonclient_http_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "meshserve"
    assert {"binary_tensor_data", "model_repository", "statistics", "model_configuration"} <= set(meta["extensions"])
    model = client.get_model_metadata("lin")
    assert model["name"] == "lin" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert model["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata("lin", model_version="1")["name"] == "lin"
    assert client.is_model_ready("lin")


def test_tritonclient_http_config(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("lin")
    assert config["name"] == "lin" and config["platform"] == "onnxruntime_onnx"
    assert config["input"][0]["name"] == "input" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][0]["dims"] == [-1, 3]  # no batching: the whole shape, numbers as Triton writes them


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infer_linear(client: triton.InferenceServerClient, binary: bool) -> None:
    x = _lin_input(binary)
    out = triton.InferRequestedOutput("output", binary_data=binary)
    result = client.infer("lin", [x], outputs=[out], request_id="r-1")
    want = np.arange(8, dtype=np.float32).reshape(2, 4) @ _weights(1)[0] + _weights(1)[1]
    np.testing.assert_allclose(result.as_numpy("output"), want, rtol=1e-5)
    response = result.get_response()
    assert response["model_name"] == "lin" and response["id"] == "r-1"
    assert response["outputs"][0]["shape"] == [2, 3]


def _weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The W and B of demo.linear_model(seed), read from the model itself."""
    from onnx import numpy_helper

    model = demo.linear_model(seed)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits["W"], inits["B"]


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_every_datatype(client: triton.InferenceServerClient, datatype: str, binary: bool) -> None:
    sample = DATATYPES[datatype][1]
    if datatype == "BYTES" and not binary:
        sample = np.array([["ab", "é"]], dtype=object)  # JSON BYTES are UTF-8 strings
    x = triton.InferInput("input", list(sample.shape), datatype)
    x.set_data_from_numpy(sample, binary_data=binary)
    result = client.infer(f"id-{datatype.lower()}", [x],
                          outputs=[triton.InferRequestedOutput("output", binary_data=binary)])
    got = result.as_numpy("output")
    if datatype == "BYTES":
        want = [[s if isinstance(s, bytes) else s.encode() for s in row] for row in sample.tolist()]
        assert [[s if isinstance(s, bytes) else s.encode() for s in row] for row in got.tolist()] == want
    else:
        assert got.dtype == sample.dtype
        np.testing.assert_array_equal(got, sample)
    assert result.get_output("output")["datatype"] == datatype


def test_bf16_round_trips_as_binary_and_refuses_json(url: str) -> None:
    values = np.array([1.5, -2.0, 0.0, 3.0], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "BF16",
                                     "parameters": {"binary_data_size": len(bf16)}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    r = requests.post(f"{url}/v2/models/id-bf16/infer", data=header + bf16, timeout=120,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["datatype"] == "BF16" and meta["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert r.content[n:] == bf16
    # The same output as JSON: bfloat16 values are exact float32 numbers.
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 2], "datatype": "BF16",
                                     "parameters": {"binary_data_size": len(bf16)}}]}).encode()
    r = requests.post(f"{url}/v2/models/id-bf16/infer", data=header + bf16, timeout=120,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == values.tolist()
    r = requests.post(f"{url}/v2/models/id-bf16/infer", timeout=30, json={
        "inputs": [{"name": "input", "shape": [1, 2], "datatype": "BF16", "data": [1.0, 2.0]}]})
    assert r.status_code == 400 and "BF16" in r.json()["error"] and "binary" in r.json()["error"]
    meta = requests.get(f"{url}/v2/models/id-bf16", timeout=120).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "BF16", "shape": [-1, 2]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "BF16", "shape": [-1, 2]}]
    config = requests.get(f"{url}/v2/models/id-bf16/config", timeout=120).json()
    assert [t["data_type"] for t in config["input"] + config["output"]] == ["TYPE_BF16", "TYPE_BF16"]


def test_tritonclient_http_statistics(client: triton.InferenceServerClient) -> None:
    x = _lin_input()
    for _ in range(3):
        client.infer("stats", [x])
    stats = client.get_inference_statistics("stats")["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "stats" and stats[0]["version"] == "1"
    assert stats[0]["inference_count"] >= 3 and stats[0]["inference_stats"]["success"]["count"] >= 3
    assert isinstance(stats[0]["inference_stats"]["compute_infer"]["ns"], int)
    assert "stats" in {s["name"] for s in client.get_inference_statistics()["model_stats"]}


def test_tritonclient_http_repository_load_unload(client: triton.InferenceServerClient) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert {"lin", "lu", "id-fp32"} <= set(index)
    assert index["lu"]["version"] == "1" and index["lu"]["state"] in ("READY", "UNAVAILABLE", "LOADING")
    client.load_model("lu")
    assert client.is_model_ready("lu")
    assert any(m["name"] == "lu" and m["state"] == "READY" for m in client.get_model_repository_index())
    client.unload_model("lu")
    assert not client.is_model_ready("lu")
    # Still registered: the next request loads it again.
    assert client.infer("lu", [_lin_input()]).as_numpy("output").shape == (2, 3)


def test_tritonclient_http_errors(client: triton.InferenceServerClient) -> None:
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.infer("nope", [_lin_input()]),
                 lambda: client.get_model_config("nope"), lambda: client.load_model("nope")):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert exc.value.status() == "404" and "nope" in exc.value.message()
    assert not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("lin", model_version="2")
    assert exc.value.status() == "404"
    bad = triton.InferInput("input", [2, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("lin", [bad])
    assert exc.value.status() == "400" and "input" in exc.value.message()
    client.unload_model("nope")  # unloading an unknown model succeeds, as Triton's


async def test_tritonclient_http_aio(mesh: LocalMesh) -> None:
    c = triton_aio.InferenceServerClient(mesh.rest_address, conn_timeout=120)
    try:
        assert await c.is_server_live() and await c.is_server_ready()
        assert (await c.get_server_metadata())["name"] == "meshserve"
        assert (await c.get_model_metadata("lin"))["inputs"][0]["datatype"] == "FP32"
        assert (await c.get_model_config("lin"))["name"] == "lin"
        results = await asyncio.gather(*(c.infer("lin", [_lin_input(i % 2 == 0)]) for i in range(8)))
        assert all(r.as_numpy("output").shape == (2, 3) for r in results)
        assert (await c.get_inference_statistics("lin"))["model_stats"][0]["inference_count"] >= 8
        assert "lin" in {m["name"] for m in await c.get_model_repository_index()}
        await c.load_model("lin")
        assert await c.is_model_ready("lin")
        with pytest.raises(InferenceServerException) as exc:
            await c.get_model_metadata("nope")
        assert exc.value.status() == "404"
    finally:
        await c.close()


# -- plain HTTP clients -----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", JSON_TYPES)
def test_requests_json_every_datatype(url: str, datatype: str) -> None:
    sample = DATATYPES[datatype][1]
    data = [["ab", "é"]] if datatype == "BYTES" else sample.tolist()  # nested lists, as Triton accepts
    r = requests.post(f"{url}/v2/models/id-{datatype.lower()}/infer", timeout=120, json={
        "id": "x", "inputs": [{"name": "input", "shape": [1, 2], "datatype": datatype, "data": data}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "x" and body["model_name"] == f"id-{datatype.lower()}" and body["model_version"] == "1"
    out = body["outputs"][0]
    assert out["name"] == "output" and out["datatype"] == datatype and out["shape"] == [1, 2]
    flat = ["ab", "é"] if datatype == "BYTES" else sample.reshape(-1).tolist()
    if datatype == "FP32":
        np.testing.assert_allclose(out["data"], flat, rtol=1e-6)
    else:
        assert out["data"] == flat


def test_requests_registration_api(url: str, mesh: LocalMesh, tmp_path: pathlib.Path) -> None:
    path = demo.save(demo.linear_model(7), pathlib.Path(mesh.roots()[0]) / "rest-reg.onnx")
    spec = {"model_id": "rest-reg", "storage_uri": path.resolve().as_uri(), "labels": {"via": "rest"}}
    r = requests.post(f"{url}/v1/models", json={"spec": spec}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["spec"]["model_id"] == "rest-reg" and r.json()["state"] == "NOT_LOADED"
    assert requests.post(f"{url}/v1/models", json=spec, timeout=30).status_code == 200  # a retry: OK
    other = dict(spec, storage_uri=spec["storage_uri"] + "x")
    r = requests.post(f"{url}/v1/models", json=other, timeout=30)
    assert r.status_code == 409 and "rest-reg" in r.json()["error"]
    got = requests.get(f"{url}/v1/models/rest-reg", timeout=30).json()
    assert got["spec"]["labels"] == {"via": "rest"}
    listed = requests.get(f"{url}/v1/models", params={"label": "via=rest"}, timeout=30).json()
    assert [m["spec"]["model_id"] for m in listed["models"]] == ["rest-reg"]
    r = requests.post(f"{url}/v2/models/rest-reg/infer", timeout=120, json={
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 3
    assert requests.delete(f"{url}/v1/models/rest-reg", timeout=30).json() == {"existed": True}
    assert requests.get(f"{url}/v1/models/rest-reg", timeout=30).status_code == 404
    assert requests.delete(f"{url}/v1/models/rest-reg", timeout=30).json() == {"existed": False}
    r = requests.post(f"{url}/v1/models", json={"spec": {"model_id": "bad id!", "storage_uri": "file:///x"}}, timeout=30)
    assert r.status_code == 400 and "model_id" in r.json()["error"]
    r = requests.post(f"{url}/v1/models", json={"spec": {"model_id": "x", "nonsense": 1}}, timeout=30)
    assert r.status_code == 400 and "nonsense" in r.json()["error"]


def test_requests_bad_input_is_400_and_the_router_stays_up(url: str) -> None:
    cases = [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "inputs"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                 "data": [1, 2, 3]}]}).encode(), None, "3 elements"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP99",
                                 "data": [1, 2, 3, 4]}]}).encode(), None, "datatype"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                 "data": ["a", 2, 3, 4]}]}).encode(), None, "numbers"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 16}}]}).encode(), None, "binary_data_size"),
        (b'{"inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", None, "JSON"),
        (b'{"inputs": []}xyz', "1000", "Inference-Header-Content-Length"),
        (b"{}", "-1", "Inference-Header-Content-Length"),
    ]
    for body, header_length, words in cases:
        headers = {"Content-Type": "application/json"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = header_length
        r = requests.post(f"{url}/v2/models/lin/infer", data=body, headers=headers, timeout=30)
        assert r.status_code == 400, (body[:60], r.status_code, r.text[:200])
        assert words in r.json()["error"], (words, r.json())
    r = requests.post(f"{url}/v2/models/lin/infer", data=b"\x00" * (MAX_BODY + 1), timeout=30)
    assert r.status_code == 413 and "MESH_ROUTER_MAX_MESSAGE_BYTES" in r.json()["error"]
    r = requests.get(f"{url}/v2/nothing/here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(f"{url}/v2/models/lin/infer", timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.get(f"{url}/v2/models/lin", headers={f"x-h{i}": "v" for i in range(200)}, timeout=30)
    assert r.status_code in (400, 431)
    assert requests.get(f"{url}/v2/health/live", timeout=30).json() == {"live": True}


def test_requests_gzip_body_and_timeout_parameter(url: str) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}], "parameters": {"timeout": 60_000_000}}).encode()
    r = requests.post(f"{url}/v2/models/lin/infer", data=gzip.compress(body), timeout=120,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    r = requests.post(f"{url}/v2/models/lin/infer", data=body, params={"timeout": "abc"}, timeout=30)
    assert r.status_code == 400 and "timeout" in r.json()["error"]
    # A gzip bomb is cut at the body limit after decompression.
    bomb = gzip.compress(b"{" + b" " * (4 * MAX_BODY) + b"}")
    r = requests.post(f"{url}/v2/models/lin/infer", data=bomb, timeout=30, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


async def test_httpx_binary_infer(url: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        r = await c.post("/v2/models/lin/infer", content=header + x.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        n = int(r.headers["inference-header-content-length"])
        meta = json.loads(r.content[:n])
        size = meta["outputs"][0]["parameters"]["binary_data_size"]
        assert size == 24 and "data" not in meta["outputs"][0]
        got = np.frombuffer(r.content[n:n + size], np.float32).reshape(2, 3)
        w, b = _weights(1)
        np.testing.assert_allclose(got, x @ w + b, rtol=1e-5)
        assert (await c.get("/v2/models/lin/ready")).json() == {"name": "lin", "ready": True}
        stats = (await c.get("/v2/models/lin/versions/1/stats")).json()
        assert stats["model_stats"][0]["name"] == "lin"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(url: str) -> None:
    def curl(*args: str) -> tuple[int, str]:
        out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        body, _, code = out.rpartition("\n")
        return int(code), body

    assert curl(f"{url}/v2/health/ready") == (200, '{"ready":true}')
    code, body = curl(f"{url}/v2")
    assert code == 200 and json.loads(body)["name"] == "meshserve"
    code, body = curl("-X", "POST", "-H", "Content-Type: application/json", f"{url}/v2/models/lin/infer",
                      "-d", '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[1,2,3,4]]}]}')
    assert code == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 3]
    # Bodies over 1 KiB: curl sends "Expect: 100-continue" and waits for the answer.
    big = json.dumps({"inputs": [{"name": "input", "shape": [100, 4], "datatype": "FP32", "data": [0.5] * 400}]})
    code, body = curl("-X", "POST", f"{url}/v2/models/lin/infer", "-d", big)
    assert code == 200 and json.loads(body)["outputs"][0]["shape"] == [100, 3]
    code, body = curl("-X", "POST", f"{url}/v2/repository/index")
    assert code == 200 and "lin" in {m["name"] for m in json.loads(body)}
    code, body = curl(f"{url}/v2/models/lin/config")
    assert code == 200 and json.loads(body)["name"] == "lin"
    code, body = curl(f"{url}/v2/models/nope")
    assert code == 404 and "nope" in json.loads(body)["error"]


# -- KServe's Python SDK ---------------------------------------------------------------------------


KSERVE_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def rest(url):
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
        assert await client.is_server_live(url) and await client.is_server_ready(url)
        for binary in (False, True):
            x = InferInput("input", [2, 4], "FP32")
            x.set_data_from_numpy(np.ones((2, 4), np.float32), binary_data=binary)
            res = await client.infer(url, InferRequest(model_name="lin", infer_inputs=[x], request_id="k"),
                                     model_name="lin")
            assert res.outputs[0].as_numpy().shape == (2, 3), res
        assert await client.is_model_ready(url, "lin")  # loaded by the requests above
        assert not await client.is_model_ready(url, "nope")
        for dt, sample in (("INT64", np.array([[-1, 2**40]], np.int64)), ("BOOL", np.array([[True, False]])),
                           ("FP16", np.array([[0.5, 2.0]], np.float16)), ("UINT8", np.array([[0, 255]], np.uint8))):
            x = InferInput("input", [1, 2], dt)
            x.set_data_from_numpy(sample, binary_data=True)
            res = await client.infer(url, InferRequest(model_name=f"id-{dt.lower()}", infer_inputs=[x]),
                                     model_name=f"id-{dt.lower()}")
            assert (res.outputs[0].as_numpy() == sample).all(), (dt, res)
        try:
            await client.infer(url, {"inputs": []}, model_name="nope")
        except Exception as exc:
            assert "404" in str(exc), exc
        else:
            raise AssertionError("unknown model answered")
        await client.close()

    async def grpc_client(address):
        client = InferenceGRPCClient(address, timeout=120)
        assert await client.is_server_live() and await client.is_server_ready()
        x = InferInput("input", [2, 4], "FP32")
        x.set_data_from_numpy(np.ones((2, 4), np.float32))
        res = await client.infer(InferRequest(model_name="lin", infer_inputs=[x], request_id="g"))
        assert res.model_name == "lin" and res.outputs[0].as_numpy().shape == (2, 3), res
        assert await client.is_model_ready("lin")
        for dt, sample in (("INT32", np.array([[-7, 2**30]], np.int32)), ("FP64", np.array([[0.1, -2.5]])),
                           ("BYTES", np.array([[b"a", b"bc"]], dtype=object))):
            x = InferInput("input", [1, 2], dt)
            x.set_data_from_numpy(sample)
            res = await client.infer(InferRequest(model_name=f"id-{dt.lower()}", infer_inputs=[x]))
            assert (res.outputs[0].as_numpy() == sample).all(), (dt, res)
        try:
            await client.infer(InferRequest(model_name="nope", infer_inputs=[x]))
        except Exception as exc:
            assert "NOT_FOUND" in str(exc) or "not found" in str(exc).lower(), exc
        else:
            raise AssertionError("unknown model answered")
        await client.close()

    async def main(url, address):
        await rest(url)
        await grpc_client(address)
        print("kserve ok")

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def kserve_python() -> str:
    """The interpreter of the venv that has KServe's SDK (scripts/test.sh makes .venv-kserve
    and exports MESH_TEST_KSERVE_PYTHON): kserve pins protobuf < 7, which our venv cannot
    have, so its clients run there, unchanged, against the mesh these tests start."""
    python = os.environ.get("MESH_TEST_KSERVE_PYTHON", "")
    if not python:
        pytest.skip("MESH_TEST_KSERVE_PYTHON is not set (scripts/test.sh sets it up): no KServe SDK here")
    assert pathlib.Path(python).exists(), f"MESH_TEST_KSERVE_PYTHON={python} does not exist"
    return python


def test_kserve_sdk_clients_rest_and_grpc(mesh: LocalMesh, url: str) -> None:
    python = kserve_python()
    out = subprocess.run([python, "-c", KSERVE_SCRIPT, url, mesh.router_address], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "kserve ok" in out.stdout, out.stderr[-3000:]


# -- authentication ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, dict[str, str]]]:
    folder: pathlib.Path = tmp_path_factory.mktemp("rest-auth")
    m = start_mesh(folder, etcd_endpoint, pods=1, capacity="128MiB", allow_anonymous=False,
                   env={"MESH_ROUTER_FILE_ROOTS": str(folder), "MESH_RUNTIME_FILE_ROOTS": str(folder)})
    try:
        admin = tokens_pb2_grpc.TokenAdminStub(grpc.insecure_channel(m.router_address))
        tokens = {"admin": m.token}
        for name, tenant, scope in (("a", "a", "tenant"), ("a-infer", "a", "infer"), ("b", "b", "tenant")):
            tokens[name] = admin.CreateToken(tokens_pb2.CreateTokenRequest(name=name, tenant=tenant, scope=scope),
                                             metadata=m.auth_metadata, timeout=10).token
        demo.save(demo.linear_model(5), folder / "m.onnx")
        yield m, tokens
    finally:
        m.stop()


def test_authentication_and_tenancy(secured: tuple[LocalMesh, dict[str, str]]) -> None:
    mesh, tokens = secured
    url = f"http://{mesh.rest_address}"
    auth = {k: {"Authorization": f"Bearer {v}"} for k, v in tokens.items()}
    uri = (pathlib.Path(mesh.state_dir).parent / "m.onnx").resolve().as_uri()
    # Health is open; everything else needs a token.
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    for method, path in (("GET", "/v2"), ("GET", "/v2/models/m"), ("POST", "/v2/repository/index"),
                         ("GET", "/v1/models"), ("POST", "/v2/models/m/infer")):
        r = requests.request(method, url + path, timeout=30)
        assert r.status_code == 401 and "Authorization" in r.json()["error"], (path, r.text)
    r = requests.get(f"{url}/v2", headers={"Authorization": "Bearer not-a-token"}, timeout=30)
    assert r.status_code == 401
    r = requests.get(f"{url}/v2", headers={"Authorization": "Basic abc"}, timeout=30)
    assert r.status_code == 401
    # Registry writes need the tenant scope.
    spec = {"spec": {"model_id": "m", "storage_uri": uri}}
    r = requests.post(f"{url}/v1/models", json=spec, headers=auth["a-infer"], timeout=30)
    assert r.status_code == 403 and "infer scope" in r.json()["error"]
    for who in ("a", "b"):
        r = requests.post(f"{url}/v1/models", json=spec, headers=auth[who], timeout=30)
        assert r.status_code == 200, r.text
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    r = requests.post(f"{url}/v2/models/m/infer", json=body, headers=auth["a-infer"], timeout=120)
    assert r.status_code == 200 and r.json()["model_name"] == "m"
    assert requests.post(f"{url}/v2/repository/models/m/unload", headers=auth["a-infer"], timeout=30).status_code == 403
    # Each tenant sees its own "m"; the admin sees both by their internal ids.
    listed = requests.get(f"{url}/v1/models", headers=auth["admin"], timeout=30).json()
    assert {"a:m", "b:m"} <= {m["spec"]["model_id"] for m in listed["models"]}
    assert [m["name"] for m in requests.post(f"{url}/v2/repository/index", headers=auth["b"],
                                             timeout=30).json()] == ["m"]
    # Tenant quotas over JSON: admin only.
    r = requests.put(f"{url}/v1/tenants/a", json={"max_models": 5}, headers=auth["a"], timeout=30)
    assert r.status_code == 403
    r = requests.put(f"{url}/v1/tenants/a", json={"max_models": 5}, headers=auth["admin"], timeout=30)
    assert r.status_code == 200 and r.json()["spec"]["max_models"] == 5
    assert requests.get(f"{url}/v1/tenants/a", headers=auth["admin"], timeout=30).json()["registered_models"] == 1
    c = triton.InferenceServerClient(mesh.rest_address, network_timeout=120)
    try:
        with pytest.raises(InferenceServerException) as exc:
            c.get_server_metadata()
        assert exc.value.status() == "401"
        assert c.get_model_metadata("m", headers=auth["a"])["name"] == "m"
    finally:
        c.close()

