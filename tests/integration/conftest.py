"""Fixtures for end-to-end tests: a LocalMesh (placement, runtime pods and a router as real
child processes) over the session's real etcd, models written to disk, tritonclient clients."""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from mesh import demo
from mesh.cli.local import LocalMesh


def start_mesh(base: pathlib.Path, etcd: str, **kwargs: object) -> LocalMesh:
    """A mesh whose routers admit callers without a token (these tests' tritonclient clients
    send none), unless `allow_anonymous=False` is passed; tests/integration/test_auth.py tests
    authentication itself."""
    kwargs.setdefault("allow_anonymous", True)
    root = f"/e2e-{uuid.uuid4().hex[:10]}"
    mesh = LocalMesh(state_dir=base / root.strip("/"), etcd=etcd, root=root, lease_ttl_s=3, **kwargs)  # type: ignore[arg-type]
    return mesh.start(timeout=90)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    folder = tmp_path_factory.mktemp("models")
    files = {f"linear-{i}": demo.save(demo.linear_model(i), folder / f"linear-{i}.onnx") for i in range(6)}
    corrupt = folder / "corrupt.onnx"
    corrupt.write_bytes(b"this is not an onnx model" * 100)
    files["corrupt"] = corrupt
    return files


@pytest.fixture(scope="module")
def mesh(etcd_endpoint: str, tmp_path_factory: pytest.TempPathFactory,
         model_files: dict[str, pathlib.Path]) -> Iterator[LocalMesh]:
    m = start_mesh(tmp_path_factory.mktemp("mesh"), etcd_endpoint, pods=2, capacity="256MiB")
    try:
        for model_id, path in model_files.items():
            m.register(model_id, path)
        yield m
    finally:
        m.stop()
