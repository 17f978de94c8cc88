"""Triton model repositories (mesh/repository.py): config.pbtxt onto ModelSpec, the scanner."""

from __future__ import annotations

import pathlib

import pytest

from mesh import repository
from mesh.repository import Entry, models_of, parse_config, scan

CONFIG = """
name: "resnet"            # a comment { not a field: }
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_GPU }, { count: 1 kind: KIND_CPU } ]
input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 3 ] } ]
model_warmup [ { name: "w" batch_size: 1 } ]
optimization { graph { level: 1 } }
"""


def write(root: pathlib.Path, files: dict[str, str | bytes]) -> pathlib.Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def test_config_maps_batching_copies_and_lists_what_is_ignored() -> None:
    config, ignored = parse_config(CONFIG)
    assert config.max_batch_size == 16 and config.dynamic_batching.max_queue_delay_microseconds == 500
    assert ignored == ["input", "model_warmup", "optimization", "output"]
    found = models_of("file:///r/", [Entry("resnet/config.pbtxt", 1, "a"), Entry("resnet/1/model.onnx", 1, "a"),
                                     Entry("resnet/3/model.onnx", 1, "a"), Entry("resnet/2/model.onnx", 1, "a")],
                      lambda path: CONFIG)
    two, m = found  # latest { num_versions: 2 }: versions 2 and 3, each registered as itself
    assert m.spec is not None and two.spec is not None and (two.version, m.version) == (2, 3)
    assert (two.spec.version, m.spec.version) == ("2", "3")
    assert m.spec.storage_uri == "file:///r/resnet/3/model.onnx"
    assert two.spec.storage_uri == "file:///r/resnet/2/model.onnx"
    assert (m.spec.max_batch_size, m.spec.max_queue_delay_us, m.spec.max_copies) == (16, 500, 3)
    assert m.spec.labels["repository"] == "file:///r" and m.spec.labels["repository-version"] == "3"
    assert "input, model_warmup, optimization, output" in " | ".join(two.warnings)
    assert m.warnings == ()  # the model's warnings once, on its first version


@pytest.mark.parametrize(("policy", "selected", "note"), [
    ("", [3], ""),
    ("version_policy { latest { num_versions: 2 } }", [2, 3], ""),
    ("version_policy { latest { num_versions: 9 } }", [1, 2, 3], ""),
    ("version_policy { all {} }", [1, 2, 3], ""),
    ("version_policy { specific { versions: [2, 1, 2] } }", [1, 2], ""),
    ("version_policy { specific { versions: [1, 5] } }", [1], "versions [5] do not exist"),
    ("version_policy { specific { versions: [7] } }", [], "none of them exists"),
])
def test_version_policy(policy: str, selected: list[int], note: str) -> None:
    files = [Entry("m/config.pbtxt", 1, ""), *(Entry(f"m/{v}/model.onnx", 1, str(v)) for v in (1, 2, 3))]
    found = models_of("s3://b/p/", files, lambda path: policy)
    if not selected:
        (m,) = found
        assert m.spec is None and note in m.error
        return
    assert [m.version for m in found] == selected
    assert [m.spec.version for m in found if m.spec] == [str(v) for v in selected]
    assert [m.spec.storage_uri for m in found if m.spec] == [f"s3://b/p/m/{v}/model.onnx" for v in selected]
    assert len({m.spec.labels["repository-digest"] for m in found if m.spec}) == len(selected)
    assert note in " ".join(found[0].warnings)


def test_batching_only_with_dynamic_batching() -> None:
    (m,) = models_of("file:///r/", [Entry("m/config.pbtxt", 1, ""), Entry("m/1/model.onnx", 1, "")],
                     lambda path: "max_batch_size: 8")
    assert m.spec is not None and m.spec.max_batch_size == 0 and m.warnings == ()


def test_scanner_folders_errors_and_change_digest(tmp_path: pathlib.Path) -> None:
    root = write(tmp_path / "repo", {
        "plain/1/model.onnx": b"onnx-a",
        "ext/config.pbtxt": 'platform: "onnxruntime_onnx"',
        "ext/1/model.onnx": b"onnx-b", "ext/1/weights.bin": b"w" * 10,
        "tf/config.pbtxt": 'platform: "tensorflow_savedmodel"', "tf/1/model.savedmodel/x": b"",
        "empty/config.pbtxt": "", "bad/config.pbtxt": "max_batch_size: {", "bad/1/model.onnx": b"x",
        ".hidden/1/model.onnx": b"x",
    })
    found = {f.name: f for f in scan(str(root))}
    assert sorted(found) == ["bad", "empty", "ext", "plain", "tf"]
    base = root.resolve().as_uri()
    assert found["plain"].spec and found["plain"].spec.storage_uri == f"{base}/plain/1/model.onnx"
    assert found["ext"].spec and found["ext"].spec.storage_uri == f"{base}/ext/1/"  # a folder: external data
    assert "not ONNX" in found["tf"].error
    assert "no <version>/model.onnx" in found["empty"].error
    assert "does not parse" in found["bad"].error
    before = found["plain"].spec.labels["repository-digest"]
    (root / "plain" / "1" / "model.onnx").write_bytes(b"onnx-a, retrained")
    after = {f.name: f for f in scan(str(root))}["plain"].spec
    assert after is not None and after.labels["repository-digest"] != before  # a changed file: an update
    assert repository.base_label(str(root)) == base


def test_missing_repository_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(repository.RepositoryError, match="is not a folder"):
        scan(str(tmp_path / "nope"))
