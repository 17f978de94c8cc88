"""A short CI run of the gRPC fuzz targets against a real mesh (placement, a runtime pod and a
router as child processes; tests/fuzz/harness.py): corrupted and valid-ish V2 requests to the
router and straight to the pod, and the registration API's requests. Every answer is OK or
one of the codes that API may give (never UNKNOWN or INTERNAL), with short details free of
paths and tracebacks; the processes stay up. bench/fuzz/hypo.py --grpc runs 10,000+ per API."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from mesh.pb.v1 import registry_pb2, types_pb2
from tests.fuzz import harness, strategies

pytestmark = pytest.mark.integration
SHORT = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.FuzzMesh]:
    fm = harness.start(pathlib.Path(tmp_path_factory.mktemp("fuzz")), etcd_endpoint)
    try:
        yield fm
    finally:
        fm.close()


@SHORT
@given(data=strategies.infer_bytes(pb), target=st.sampled_from(["router", "pod"]))
def test_model_infer(fuzz_mesh: harness.FuzzMesh, data: bytes, target: str) -> None:
    fuzz_mesh.call(target, "ModelInfer", data)


@SHORT
@given(name=strategies.IDS | st.sampled_from(sorted(strategies.specs())),
       method=st.sampled_from(["ModelReady", "ModelMetadata"]), mutate=st.booleans())
def test_control_methods(fuzz_mesh: harness.FuzzMesh, name: str, method: str, mutate: bool) -> None:
    data = pb.ModelMetadataRequest(name=name).SerializeToString()
    if mutate:
        data = data[:-1] + b"\xff" if data else b"\x0a"
    fuzz_mesh.call("router", method, data)
    if method == "ModelMetadata":
        fuzz_mesh.call("pod", method, data)


@SHORT
@given(data=st.data())
def test_registry(fuzz_mesh: harness.FuzzMesh, data: st.DataObject) -> None:
    method, body = data.draw(strategies.registry_calls(registry_pb2, types_pb2, fuzz_mesh.good_uris))
    fuzz_mesh.call("router", method, body)


def test_corrupt_inputs_after_a_valid_model_name_is_invalid_argument(fuzz_mesh: harness.FuzzMesh) -> None:
    """Bug (issue 10): a corrupt `inputs` field after a valid model_name came back UNKNOWN with
    a protobuf DecodeError text, from the pod and through the router."""
    data = pb.ModelInferRequest(model_name="fuzz-linear").SerializeToString() + b"\x2a\x04\x0a\x05ab"
    for target in ("router", "pod"):
        code, details = fuzz_mesh.call(target, "ModelInfer", data)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (target, details)
        assert "DecodeError" not in details


def test_oversize_id_is_echoed_truncated(fuzz_mesh: harness.FuzzMesh) -> None:
    """Bug (issue 10): a 200,000-character id was echoed into the error whole, until the
    client's metadata limit tripped instead of an answer."""
    long_id = "x" * 200_000
    calls = [("router", "ModelInfer", pb.ModelInferRequest(model_name=long_id)),
             ("pod", "ModelInfer", pb.ModelInferRequest(model_name=long_id)),
             ("router", "ModelReady", pb.ModelReadyRequest(name=long_id)),
             ("router", "GetModel", registry_pb2.GetModelRequest(model_id=long_id)),
             ("router", "UnregisterModel", registry_pb2.UnregisterModelRequest(model_id=long_id))]
    for target, method, message in calls:
        code, details = fuzz_mesh.call(target, method, message.SerializeToString())
        assert code != grpc.StatusCode.OK and len(details) < 300 and "…" in details, (method, code, details[:100])


def test_processes_survived(fuzz_mesh: harness.FuzzMesh) -> None:
    """Runs last in this module: after the fuzzing every process is up and serves."""
    fuzz_mesh.check_processes()
    for name, start in fuzz_mesh.rss_start.items():  # bounded memory: no request grows a process for good
        assert fuzz_mesh.rss_max[name] - start < 256 << 20, (name, start, fuzz_mesh.rss_max[name])
    assert sum(n for key, n in fuzz_mesh.codes.items() if key.endswith(":OK")) > 0
    assert not any(key.endswith((":UNKNOWN", ":INTERNAL")) for key in fuzz_mesh.codes)
