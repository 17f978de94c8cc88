"""Shared fixtures: a real etcd process on free ports (stopped by its PID), a real redis-server
likewise, a unique key root per test so tests never see each other's state."""

from __future__ import annotations

import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from mesh.cli import procs


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("etcd")
    client, peer = procs.free_port(), procs.free_port()
    proc = procs.start_etcd(base / "data", client, peer, base / "etcd.log")
    try:
        yield f"127.0.0.1:{client}"
    finally:
        procs.stop(proc)


@pytest.fixture
def mesh_root() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def redis_server(tmp_path: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A fresh redis-server on a free port: (url, process); stopped by its PID."""
    from mesh.cli.local import start_redis

    port = procs.free_port()
    proc = start_redis(port, tmp_path / "redis.log")
    try:
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        procs.stop(proc)
