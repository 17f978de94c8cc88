"""ModelSpec <-> mesh.v1.ModelSpec keeps every field a user registers."""

from __future__ import annotations

from mesh.types import ModelSpec
from router.registry_api import spec_from_pb, spec_to_pb


def test_every_registered_field_round_trips() -> None:
    spec = ModelSpec("m", "file:///models/m.onnx", tenant="t", sha256="ab" * 32, labels={"team": "x"},
                     min_copies=1, max_copies=3, max_batch_size=16, max_queue_delay_us=500)
    assert spec_from_pb(spec_to_pb(spec)) == spec


def test_a_stored_uri_with_credentials_is_returned_redacted() -> None:
    """Records written before registration refused credentials in URIs must not return them
    (issue 10: no API returns a credential); clean URIs come back exactly as stored."""
    legacy = ModelSpec(model_id="m", storage_uri="https://user:hunter2@host/m.onnx?X-Amz-Signature=abc&v=1")
    shown = spec_to_pb(legacy).storage_uri
    assert "hunter2" not in shown and "abc" not in shown and shown.startswith("https://host/m.onnx?")
    clean = ModelSpec(model_id="m", storage_uri="https://host/models/m.onnx?version=3")
    assert spec_to_pb(clean).storage_uri == clean.storage_uri
