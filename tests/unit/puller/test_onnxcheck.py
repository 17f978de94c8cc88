"""puller.onnxcheck: meshserve's own refusal of external data that leaves the artifact's folder,
custom-op domains, file-opening ops and absurd declared sizes (S6, S7, A4), before onnxruntime
sees the file."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mesh import demo
from mesh.errors import LoadFailed
from puller import onnxcheck
from puller.executor import session_options
from tests import badmodels

LIMIT = 1 << 30


def _save(model: onnx.ModelProto, folder: pathlib.Path) -> pathlib.Path:
    return demo.save(model, folder / "model.onnx")


def _weights(folder: pathlib.Path, name: str = "w.bin", value: float = 2.5) -> pathlib.Path:
    path = folder / name
    path.write_bytes(np.array([value], dtype=np.float32).tobytes())
    return path


def test_plain_model_passes_with_no_locations(tmp_path: pathlib.Path) -> None:
    checked = onnxcheck.check_model(_save(demo.linear_model(1), tmp_path), LIMIT)
    assert checked.locations == () and checked.declared_bytes > 0


def test_external_data_inside_the_folder_passes_and_onnxruntime_loads_it(tmp_path: pathlib.Path) -> None:
    _weights(tmp_path)
    path = _save(badmodels.external_model("w.bin"), tmp_path)
    assert onnxcheck.check_model(path, LIMIT).locations == ("w.bin",)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.ones(1, np.float32)})
    assert out.tolist() == [3.5]  # the fixture is a real external-data model, not only a shape


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../../etc/passwd", "contains '..'"),
        ("sub/../../x.bin", "contains '..'"),
        ("..\\..\\x.bin", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        ("\\\\host\\share\\x", "is absolute"),
        ("C:/x.bin", "is absolute"),
        ("", "empty"),
        ("missing.bin", "not in the model's folder"),
    ],
)
def test_bad_locations_are_refused(tmp_path: pathlib.Path, location: str, reason: str) -> None:
    path = _save(badmodels.external_model(location), tmp_path)
    with pytest.raises(LoadFailed, match=reason) as err:
        onnxcheck.check_model(path, LIMIT)
    assert str(tmp_path) not in err.value.message


def test_symlink_escaping_the_folder_is_refused(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "artifact"
    folder.mkdir()
    outside = _weights(tmp_path, "outside.bin")
    (folder / "w.bin").symlink_to(outside)
    path = _save(badmodels.external_model("w.bin"), folder)
    with pytest.raises(LoadFailed, match="resolves outside the model's own folder"):
        onnxcheck.check_model(path, LIMIT)


def test_symlinked_folder_component_escaping_is_refused(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "sub").symlink_to("/etc")
    path = _save(badmodels.external_model("sub/passwd"), folder)
    with pytest.raises(LoadFailed, match="resolves outside"):
        onnxcheck.check_model(path, LIMIT)


def test_symlink_inside_the_folder_is_refused_too(tmp_path: pathlib.Path) -> None:
    _weights(tmp_path, "real.bin")
    (tmp_path / "w.bin").symlink_to("real.bin")
    path = _save(badmodels.external_model("w.bin"), tmp_path)
    with pytest.raises(LoadFailed, match="symbolic link"):
        onnxcheck.check_model(path, LIMIT)


def test_hard_linked_file_is_refused(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "artifact"
    folder.mkdir()
    outside = _weights(tmp_path, "outside.bin")
    os.link(outside, folder / "w.bin")
    path = _save(badmodels.external_model("w.bin"), folder)
    with pytest.raises(LoadFailed, match="2 hard links"):
        onnxcheck.check_model(path, LIMIT)


def test_fifo_and_folder_are_not_regular_files(tmp_path: pathlib.Path) -> None:
    os.mkfifo(tmp_path / "w.bin")
    (tmp_path / "d").mkdir()
    for location in ("w.bin", "d"):
        path = _save(badmodels.external_model(location), tmp_path)
        with pytest.raises(LoadFailed, match="not a regular file"):
            onnxcheck.check_model(path, LIMIT)


def test_offset_and_length_beyond_the_file_are_refused(tmp_path: pathlib.Path) -> None:
    _weights(tmp_path)
    for model in (badmodels.external_model("w.bin", length=4, offset=1),
                  badmodels.external_model("w.bin", length=1 << 40)):
        with pytest.raises(LoadFailed, match="beyond the file's 4 bytes"):
            onnxcheck.check_model(_save(model, tmp_path), LIMIT)


def test_check_locations_sees_a_swap_after_the_first_check(tmp_path: pathlib.Path) -> None:
    """The verdict cache keys on the .onnx file's sha256; the external files are re-checked."""
    weights = _weights(tmp_path)
    path = _save(badmodels.external_model("w.bin"), tmp_path)
    locations = onnxcheck.check_model(path, LIMIT).locations
    onnxcheck.check_locations(tmp_path, locations)
    weights.unlink()
    weights.symlink_to("/etc/passwd")
    with pytest.raises(LoadFailed, match="resolves outside"):
        onnxcheck.check_locations(tmp_path, locations)


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_custom_op_domain_is_refused(tmp_path: pathlib.Path, in_subgraph: bool) -> None:
    path = _save(badmodels.custom_op_model("com.evil", in_subgraph=in_subgraph), tmp_path)
    with pytest.raises(LoadFailed, match="custom-op domain 'com.evil'.*never loads one"):
        onnxcheck.check_model(path, LIMIT)


def test_builtin_domains_come_from_onnxruntime() -> None:
    domains = onnxcheck.builtin_domains()
    assert {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"} <= domains
    assert "com.evil" not in domains


def test_model_local_function_domain_is_allowed(tmp_path: pathlib.Path) -> None:
    function = helper.make_function(
        "local.fn", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_opsetid("", demo.OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["input"], ["output"], domain="local.fn")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", demo.OPSET), helper.make_opsetid("local.fn", 1)])
    model.ir_version = demo.IR_VERSION
    path = _save(model, tmp_path)
    onnxcheck.check_model(path, LIMIT)
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.array([2.0], np.float32)})
    assert out.tolist() == [4.0]


def test_custom_domain_inside_a_local_function_is_refused(tmp_path: pathlib.Path) -> None:
    function = helper.make_function(
        "local.fn", "Twice", ["x"], ["y"], [helper.make_node("Boom", ["x"], ["y"], domain="com.evil")],
        [helper.make_opsetid("", demo.OPSET), helper.make_opsetid("com.evil", 1)],
    )
    graph = helper.make_graph(
        [helper.make_node("Twice", ["input"], ["output"], domain="local.fn")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, functions=[function])
    with pytest.raises(LoadFailed, match="'com.evil'"):
        onnxcheck.check_model(_save(model, tmp_path), LIMIT)


def test_epcontext_op_is_refused(tmp_path: pathlib.Path) -> None:
    node = helper.make_node("EPContext", ["input"], ["output"], domain="com.microsoft",
                            ep_cache_context="/etc/passwd", embed_mode=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])])
    with pytest.raises(LoadFailed, match="EPContext loads a file"):
        onnxcheck.check_model(_save(helper.make_model(graph), tmp_path), LIMIT)


def test_absurd_declared_sizes_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(LoadFailed, match="declares 42949672960 bytes, more than a load may use"):
        onnxcheck.check_model(_save(badmodels.huge_declared_model(), tmp_path), LIMIT)
    overflow = badmodels.huge_declared_model()
    overflow.graph.initializer[0].dims[:] = [1 << 62, 1 << 62]  # int64 product overflow
    with pytest.raises(LoadFailed, match="more than a load may use"):
        onnxcheck.check_model(_save(overflow, tmp_path), LIMIT)
    negative = badmodels.huge_declared_model()
    negative.graph.initializer[0].dims[:] = [-3]
    with pytest.raises(LoadFailed, match="negative dimension"):
        onnxcheck.check_model(_save(negative, tmp_path), LIMIT)


def test_tensors_together_over_the_limit_are_refused(tmp_path: pathlib.Path) -> None:
    model = badmodels.huge_declared_model(8 << 10)  # 32 KiB declared
    model.graph.initializer.append(TensorProto(name="V", data_type=TensorProto.FLOAT, dims=[8 << 10]))
    onnxcheck.check_model(_save(model, tmp_path), 64 << 10)
    with pytest.raises(LoadFailed, match="declare more than a load may use in all"):
        onnxcheck.check_model(_save(model, tmp_path), 48 << 10)


def test_not_a_protobuf_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(LoadFailed, match="not a valid ONNX model"):
        onnxcheck.check_model(path, LIMIT)


def test_sessions_parse_onnx_only_and_no_custom_op_library_is_ever_registered() -> None:
    """S7: no code path registers a custom-op library; the file is always read as ONNX."""
    assert session_options(1).get_session_config_entry("session.load_model_format") == "ONNX"
    root = pathlib.Path(__file__).resolve().parents[3]
    calls = [
        str(path.relative_to(root)) for folder in ("mesh", "puller", "router", "placement")
        for path in (root / folder).rglob("*.py")
        if "register_custom_ops_library(" in path.read_text(errors="replace")
    ]
    assert calls == []


def test_more_external_files_than_the_pod_rechecks_are_refused(tmp_path: pathlib.Path) -> None:
    """The sandbox reports at most MAX_EXTERNAL_FILES locations for the pod to re-check on
    each load: a model with more would leave some unchecked, so it is refused."""
    model = badmodels.external_model("w0.bin")
    for i in range(onnxcheck.MAX_EXTERNAL_FILES + 1):
        _weights(tmp_path, f"w{i}.bin")
        if i:
            extra = onnx.TensorProto()
            extra.CopyFrom(model.graph.initializer[0])
            extra.name = f"W{i}"
            extra.external_data[0].value = f"w{i}.bin"
            model.graph.initializer.append(extra)
    with pytest.raises(LoadFailed, match="more than 256 external files"):
        onnxcheck.check_model(_save(model, tmp_path), LIMIT)
    del model.graph.initializer[-1]
    assert len(onnxcheck.check_model(_save(model, tmp_path), LIMIT).locations) == 256
