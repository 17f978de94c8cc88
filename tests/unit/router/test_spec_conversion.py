"""ModelSpec <-> mesh.v1.ModelSpec keeps every field a user registers."""

from __future__ import annotations

from mesh.types import ModelSpec
from router.registry_api import spec_from_pb, spec_to_pb


def test_every_registered_field_round_trips() -> None:
    spec = ModelSpec("m", "file:///models/m.onnx", tenant="t", sha256="ab" * 32, labels={"team": "x"},
                     min_copies=1, max_copies=3, max_batch_size=16, max_queue_delay_us=500)
    assert spec_from_pb(spec_to_pb(spec)) == spec
