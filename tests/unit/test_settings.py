"""Settings parse sizes, and docs/OPERATIONS.md lists every setting (regenerate with tools/gendocs.py)."""

from __future__ import annotations

import pathlib
import sys

import pytest

from mesh.settings import RuntimeSettings
from mesh.units import format_bytes, parse_bytes

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_runtime_capacity_accepts_human_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_RUNTIME_CAPACITY", "2GiB")
    monkeypatch.setenv("MESH_RUNTIME_CACHE_BYTES", "512MiB")
    s = RuntimeSettings()
    assert s.capacity == 2 * 1024**3
    assert s.cache_bytes == 512 * 1024**2


def test_bad_size_is_rejected_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_RUNTIME_CAPACITY", "lots")
    with pytest.raises(ValueError, match="512MiB"):
        RuntimeSettings()


@pytest.mark.parametrize(("text", "value"), [("1024", 1024), ("1KiB", 1024), ("1.5G", 1_500_000_000), ("64MiB", 64 << 20)])
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_format_bytes() -> None:
    assert format_bytes(512) == "512B"
    assert format_bytes(3 << 20) == "3.0MiB"


def test_operations_doc_is_fresh() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gendocs
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "OPERATIONS.md").read_text() == gendocs.render(), "run python tools/gendocs.py"
