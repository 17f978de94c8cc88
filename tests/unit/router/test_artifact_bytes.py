"""The artifact size recorded at registration (ModelSpec.artifact_bytes, placement's first
guess at a never-loaded model's footprint): a file:// artifact's size, else 0 (unknown)."""

from __future__ import annotations

import asyncio
import pathlib

from mesh.types import ModelSpec
from router.registry import _as_registered, artifact_bytes


async def _size(uri: str) -> int:
    return await artifact_bytes(uri, asyncio.get_running_loop().time() + 5)


async def test_file_size_is_recorded(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "m m.onnx"
    model.write_bytes(b"x" * 1234)
    assert await _size(model.as_uri()) == 1234  # percent-encoded space resolved


async def test_unknown_sizes_are_zero(tmp_path: pathlib.Path) -> None:
    assert await _size((tmp_path / "missing.onnx").as_uri()) == 0
    assert await _size(tmp_path.as_uri()) == 0  # a folder is not an artifact file
    assert await _size("https://example.invalid/m.onnx") == 0  # never fetched at registration


def test_a_retried_registration_compares_without_what_the_router_adds() -> None:
    spec = ModelSpec("m", "file:///m.onnx", sha256="ab" * 32)
    stored = ModelSpec("m", "file:///m.onnx", sha256="ab" * 32, registered_unix_ms=5, artifact_bytes=9)
    assert _as_registered(stored) == _as_registered(spec)
    assert _as_registered(ModelSpec("m", "file:///other.onnx")) != _as_registered(spec)
