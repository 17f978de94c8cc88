"""Shared fixtures: a real etcd process on free ports (stopped by its PID), a real redis-server
likewise, a unique key root per test so tests never see each other's state."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from mesh.cli import procs


@contextlib.contextmanager
def _etcd(base: pathlib.Path) -> Iterator[str]:
    client, peer = procs.free_port(), procs.free_port()
    proc = procs.start_etcd(base / "data", client, peer, base / "etcd.log")
    try:
        yield f"127.0.0.1:{client}"
    finally:
        procs.stop(proc)


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _etcd(tmp_path_factory.mktemp("etcd")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def private_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An etcd of the module's own, for tests that compact it or otherwise disturb others."""
    with _etcd(tmp_path_factory.mktemp("etcd-private")) as endpoint:
        yield endpoint


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
