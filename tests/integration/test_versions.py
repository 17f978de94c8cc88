"""Model versions end to end with unmodified tritonclient clients (gRPC and REST) against a
real mesh (etcd, placement, two pods, router): versions 1 and 2 of one model registered, V2
model_version "" serves the highest, "1" and "2" their own artifact, "3" is NOT_FOUND;
ModelMetadata lists both, ModelReady answers per version; the response names the model and
the version that answered; unregistering one version leaves the other, without a version
removes all. A model registered without a version keeps behaving as before (version 1)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc

from .conftest import start_mesh

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory, model_files) -> Iterator[LocalMesh]:
    m = start_mesh(tmp_path_factory.mktemp("versions"), etcd_endpoint, pods=2, capacity="256MiB")
    try:
        m.register("m", model_files["linear-1"])
        m.register("m", model_files["linear-2"], version="2")
        m.register("ref1", model_files["linear-1"])
        m.register("ref2", model_files["linear-2"])
        yield m
    finally:
        m.stop()


def _infer(client: triton.InferenceServerClient, name: str, version: str = "") -> triton.InferResult:
    x = triton.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    return client.infer(name, [x], model_version=version, client_timeout=120)


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(mesh.router_address)
    yield c
    c.close()


def test_model_version_selects_and_empty_is_the_highest(client: triton.InferenceServerClient) -> None:
    one, two = _infer(client, "ref1").as_numpy("output"), _infer(client, "ref2").as_numpy("output")
    assert not np.allclose(one, two)  # the two artifacts answer differently
    for asked, expected, answered in (("", two, "2"), ("1", one, "1"), ("2", two, "2")):
        result = _infer(client, "m", asked)
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-6)
        response = result.get_response()
        assert (response.model_name, response.model_version) == ("m", answered), asked
    with pytest.raises(InferenceServerException) as exc:
        _infer(client, "m", "3")
    assert exc.value.status() == "StatusCode.NOT_FOUND" and "version '3' is not found" in exc.value.message()


def test_metadata_lists_the_versions_and_ready_answers_per_version(mesh: LocalMesh,
                                                                   client: triton.InferenceServerClient) -> None:
    _infer(client, "m", "1")
    _infer(client, "m", "2")
    meta = client.get_model_metadata("m")
    assert (meta.name, list(meta.versions)) == ("m", ["1", "2"])
    assert list(client.get_model_metadata("ref1").versions) == ["1"]
    assert client.get_model_metadata("m", model_version="1").inputs[0].datatype == "FP32"
    # ModelConfig's version policy is the one that serves exactly the registered versions
    policy = client.get_model_config("m").config.version_policy
    assert policy.WhichOneof("policy_choice") == "specific" and list(policy.specific.versions) == [1, 2]
    assert client.get_model_config("ref1").config.version_policy.latest.num_versions == 1
    assert client.is_model_ready("m", "1") and client.is_model_ready("m", "2") and client.is_model_ready("m")
    for call in (lambda: client.get_model_metadata("m", model_version="3"),
                 lambda: client.is_model_ready("m", "3"),
                 lambda: client.get_model_config("m", model_version="3")):
        with pytest.raises(InferenceServerException) as exc:
            call()
        assert exc.value.status() == "StatusCode.NOT_FOUND"
    stats = client.get_inference_statistics("m", model_version="2").model_stats
    assert [(s.name, s.version) for s in stats] == [("m", "2")] and stats[0].inference_count >= 1
    index = {(m.name, m.version) for m in client.get_model_repository_index().models}
    assert {("m", "1"), ("m", "2"), ("ref1", "1")} <= index
    # REST answers the same way.
    rest = triton_http.InferenceServerClient(mesh.rest_address, connection_timeout=120, network_timeout=120)
    try:
        assert rest.get_model_metadata("m")["versions"] == ["1", "2"]
        assert rest.is_model_ready("m", "2") and not rest.is_model_ready("m", "3")
        x = triton_http.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
        answer = rest.infer("m", [x], model_version="1").get_response()
        assert (answer["model_name"], answer["model_version"]) == ("m", "1")
    finally:
        rest.close()


def test_a_version_unregistered_alone_then_all(mesh: LocalMesh, model_files,
                                               client: triton.InferenceServerClient) -> None:
    mesh.register("u", model_files["linear-3"])
    mesh.register("u", model_files["linear-4"], version="2")
    mesh.register("u", model_files["linear-5"], version="3")
    status = mesh.get_model("u")  # "" with a version 1: version 1
    assert (status.spec.model_id, status.spec.version) == ("u", "")
    with mesh.router_channel() as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        got = stub.GetModel(registry_pb2.GetModelRequest(model_id="u", version="3"), timeout=10)
        assert (got.spec.model_id, got.spec.version) == ("u", "3")
        assert stub.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="u", version="3"), timeout=10).existed
        assert _infer(client, "u").get_response().model_version == "2"  # the highest left
        assert list(client.get_model_metadata("u").versions) == ["1", "2"]
        assert stub.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="u"), timeout=10).existed
        for version in ("", "1", "2"):
            with pytest.raises(InferenceServerException) as exc:
                _infer(client, "u", version)
            assert exc.value.status() == "StatusCode.NOT_FOUND"
        listed = stub.ListModels(registry_pb2.ListModelsRequest(), timeout=10).models
        assert not [m for m in listed if m.spec.model_id == "u"]
        assert ("m", "2") in {(m.spec.model_id, m.spec.version) for m in listed}
