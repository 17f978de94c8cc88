"""mesh.errors.quote_id and redact_paths: how every error message echoes what a client sent
and keeps the mesh's own filesystem layout out."""

from __future__ import annotations

from mesh import errors


def test_quote_id_cuts_long_ids() -> None:
    """Bug: a 200,000-character id came back whole in NOT_FOUND (the client's metadata limit
    tripped instead of the error reaching it)."""
    quoted = errors.quote_id("x" * 200_000)
    assert quoted == "'" + "x" * errors.MAX_QUOTED + "…'"
    assert errors.quote_id("short") == "'short'"
    assert len(errors.model_not_found("m" * 200_000).message) < 200


def test_quote_id_escapes_control_characters() -> None:
    assert errors.quote_id("a\nb\x00\u2028") == "'a\\x0ab\\x00\\x2028'"


def test_redact_paths_keeps_uris_and_user_text() -> None:
    text = ("onnxruntime: external data outside the allowed directory: /tmp/p/cache/pod-1/objects/ab/"
            "model.onnx; File \"/work/main/x.py\", line 3")
    assert errors.redact_paths(text) == ("onnxruntime: external data outside the allowed directory: <path>; "
                                         "File \"<path>\", line 3")
    for kept in ("file:///etc/shadow", "http://127.0.0.1:2379/v3", "label app/x", "1/s", "use A-Z . _ - /, ok"):
        assert errors.redact_paths(kept) == kept
