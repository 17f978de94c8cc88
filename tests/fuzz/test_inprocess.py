"""A short CI run of the in-process fuzz targets (bench/fuzz/hypo.py runs them for 10,000+
examples): corrupted and valid-ish ModelInferRequest bytes into the router's wire parsing and
the pod's deserializer + codec. Every input is accepted or refused with INVALID_ARGUMENT and a
short message free of paths; router and protobuf agree on the model."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from router import modelid
from tests.fuzz import strategies, targets

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(data=strategies.infer_bytes(pb))
def test_router_and_pod_parse_any_bytes(data: bytes) -> None:
    targets.everything(data, pb)


@FAST
@given(data=strategies.infer_request(pb))
def test_router_accepts_every_serialized_request(data: bytes) -> None:
    """What a protobuf serializer wrote is never refused by the router's structure check,
    unless only the id is at fault (longer than any registered id can be)."""
    name = pb.ModelInferRequest.FromString(data).model_name
    if name and len(name) <= modelid.MAX_MODEL_ID:
        assert targets.router_infer(data, pb) == name


@FAST
@given(data=strategies.infer_bytes(pb), header=st.sampled_from(["", "hdr-model", "h" * 129, "h" * 5000]))
def test_metadata_ids_agree_with_the_forwarded_bytes(data: bytes, header: str) -> None:
    targets.router_infer(data, pb, metadata=(("mm-model-id", header),) if header else ())
