"""Registration rules: every one rejects with InvalidArgument and an actionable message."""

from __future__ import annotations

import os
import pathlib

import pytest

from mesh.errors import InvalidArgument
from mesh.settings import RouterSettings
from mesh.types import ModelSpec
from router.registry import validate

GOOD_SHA = "ab" * 32


def _spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = {"model_id": "m1", "storage_uri": "file:///models/m1.onnx"}
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def _settings(**kw: object) -> RouterSettings:
    return RouterSettings(**kw)  # type: ignore[arg-type]


def test_good_spec_is_normalised() -> None:
    out = validate(_spec(format="ONNX", sha256=GOOD_SHA.upper(), tenant="t-1", labels={"team": "a"}),
                   _settings())
    assert out.format == "onnx" and out.sha256 == GOOD_SHA and out.labels == {"team": "a"}
    assert validate(_spec(format=""), _settings()).format == "onnx"


@pytest.mark.parametrize("model_id", ["a", "A.b_c-1", "9" * 128])
def test_model_id_accepted(model_id: str) -> None:
    validate(_spec(model_id=model_id), _settings())


@pytest.mark.parametrize(
    "model_id", ["", ".", "..", "-a", "_a", "a/b", "a b", "a\n", "é", "9" * 129, "a:b"]
)
def test_model_id_rejected(model_id: str) -> None:
    with pytest.raises(InvalidArgument, match="model_id"):
        validate(_spec(model_id=model_id), _settings())


@pytest.mark.parametrize("tenant", ["-t", "t/x", "t" * 64, "t\n"])
def test_tenant_rejected(tenant: str) -> None:
    with pytest.raises(InvalidArgument, match="tenant"):
        validate(_spec(tenant=tenant), _settings())


@pytest.mark.parametrize(
    "uri, match",
    [
        ("", "storage_uri"),
        ("s3://bucket/m.onnx", "scheme 's3'"),
        ("/models/m.onnx", "scheme"),
        ("ftp://h/m.onnx", "scheme"),
        ("file://models/m.onnx", "absolute"),
        ("file:relative/m.onnx", "absolute"),
        ("file:///models/../etc/passwd", r"'\.\.'"),
        ("file:///models/%2e%2e/etc/passwd", r"'\.\.'"),
        ("file:///models/m.onnx?x=1", "query"),
        ("http:///m.onnx", "host"),
        ("https://h/m onnx", "spaces"),
        ("file:///a\x00b", "control"),
        ("http://h/" + "a" * 5000, "characters"),
    ],
)
def test_storage_uri_rejected(uri: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        validate(_spec(storage_uri=uri), _settings())


def test_schemes_are_configurable() -> None:
    validate(_spec(storage_uri="s3://bucket/m.onnx"), _settings(allowed_schemes="s3"))
    with pytest.raises(InvalidArgument, match="MESH_ROUTER_ALLOWED_SCHEMES"):
        validate(_spec(storage_uri="file:///m.onnx"), _settings(allowed_schemes="s3"))


def test_file_roots_compare_canonical_paths(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    sibling = tmp_path / "models-evil"
    sibling.mkdir()
    settings = _settings(file_roots=str(root))
    validate(_spec(storage_uri=f"file://{root}/sub/m.onnx"), settings)
    validate(_spec(storage_uri=f"file://{root}"), settings)
    # a string-prefix check would accept the sibling folder
    with pytest.raises(InvalidArgument, match="roots"):
        validate(_spec(storage_uri=f"file://{sibling}/m.onnx"), settings)
    # a symlink inside the root pointing outside it is resolved before the check
    os.symlink("/etc", root / "escape")
    with pytest.raises(InvalidArgument, match="roots"):
        validate(_spec(storage_uri=f"file://{root}/escape/passwd"), settings)


@pytest.mark.parametrize("fmt", ["pytorch", "onnx2", "tensorflow"])
def test_format_rejected(fmt: str) -> None:
    with pytest.raises(InvalidArgument, match="format"):
        validate(_spec(format=fmt), _settings())


@pytest.mark.parametrize("sha", ["abc", "g" * 64, "a" * 63, "a" * 65, " " + "a" * 63])
def test_sha256_rejected(sha: str) -> None:
    with pytest.raises(InvalidArgument, match="sha256"):
        validate(_spec(sha256=sha), _settings())


def test_labels_rules() -> None:
    validate(_spec(labels={f"k{i}": "v" for i in range(64)}), _settings())
    with pytest.raises(InvalidArgument, match="too many labels"):
        validate(_spec(labels={f"k{i}": "v" for i in range(65)}), _settings())
    for key in ("", "-k", "k" * 64, "k k"):
        with pytest.raises(InvalidArgument, match="label key"):
            validate(_spec(labels={key: "v"}), _settings())
    for value in ("v" * 257, "a\nb"):
        with pytest.raises(InvalidArgument, match="value of label"):
            validate(_spec(labels={"k": value}), _settings())
