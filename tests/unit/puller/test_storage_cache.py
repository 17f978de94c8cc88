"""The artifact cache is private and keeps no failed artifact (issue 10: /etc/shadow's copy
stayed in the cache with mode 0644 after its load failed). Real file:// pulls under a root."""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat

import pytest

from mesh.errors import LoadFailed, PermissionDenied
from mesh.metrics import Metrics
from mesh.uripolicy import FileRoots
from puller.cache import ArtifactCache, cache_key
from puller.storage import Auth
from puller.storage.file import FileProvider


def artifact(root: pathlib.Path, name: str, data: bytes = b"onnx" * 50) -> str:
    path = root / name
    path.write_bytes(data)
    return path.as_uri()


async def make(tmp_path: pathlib.Path) -> tuple[ArtifactCache, pathlib.Path]:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    provider = FileProvider(10**6, FileRoots.parse(str(root), "MESH_RUNTIME_FILE_ROOTS"))
    cache = ArtifactCache(tmp_path / "cache", 10**6, {"file": provider}, Metrics(service="runtime"))
    await cache.start()
    return cache, root


def modes(folder: pathlib.Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for dirpath, dirs, names in os.walk(folder):
        for n in dirs + names:
            p = pathlib.Path(dirpath) / n
            out[str(p.relative_to(folder))] = stat.S_IMODE(p.lstat().st_mode)
    return out


@pytest.mark.parametrize("umask", [0o000, 0o022])
async def test_folders_0700_and_files_0600_whatever_the_umask(tmp_path: pathlib.Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        cache, root = await make(tmp_path)
        got = await cache.acquire(artifact(root, "a.onnx"))
    finally:
        os.umask(old)
    found = modes(cache.root)
    assert found[f"objects/{got.key}/model.onnx"] == 0o600
    assert {m for p, m in found.items() if not p.endswith("model.onnx")} == {0o700}, found


async def test_start_makes_an_older_cache_private(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "cache" / "objects" / ("ab" * 32)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x")
    os.chmod(folder / "model.onnx", 0o644)
    os.chmod(folder, 0o755)
    os.chmod(tmp_path / "cache", 0o777)
    cache, _ = await make(tmp_path)
    assert cache.keys() == ["ab" * 32]
    found = modes(cache.root)
    assert found[f"objects/{'ab' * 32}/model.onnx"] == 0o600 and found["."] == 0o700


async def test_sha256_mismatch_leaves_nothing(tmp_path: pathlib.Path) -> None:
    cache, root = await make(tmp_path)
    with pytest.raises(LoadFailed, match="expected"):
        await cache.acquire(artifact(root, "a.onnx"), "cd" * 32)
    assert list(cache.tmp.iterdir()) == [] and list(cache.objects.iterdir()) == []


async def test_refused_fetch_leaves_nothing(tmp_path: pathlib.Path) -> None:
    cache, root = await make(tmp_path)
    (root / "shadow.onnx").symlink_to("/etc/shadow")
    for uri in ("file:///etc/shadow", "file:///proc/self/environ", (root / "shadow.onnx").as_uri()):
        with pytest.raises(PermissionDenied):
            await cache.acquire(uri)
    assert list(cache.tmp.iterdir()) == [] and list(cache.objects.iterdir()) == []


async def test_failed_load_deletes_the_artifact(tmp_path: pathlib.Path) -> None:
    """A load that fails on the installed artifact (the pod's modelstate discards it) leaves no
    copy on disk; the next acquire pulls it again."""
    cache, root = await make(tmp_path)
    uri = artifact(root, "bad.onnx", b"not onnx" * 10)
    got = await cache.acquire(uri)
    cache.discard(got.key)
    cache.release(got.key)
    assert not got.path.exists() and cache.keys() == [] and list(cache.objects.iterdir()) == []
    again = await cache.acquire(uri)
    assert again.path.read_bytes() == b"not onnx" * 10


async def test_discard_keeps_what_another_load_still_uses(tmp_path: pathlib.Path) -> None:
    cache, root = await make(tmp_path)
    uri = artifact(root, "a.onnx")
    loaded = await cache.acquire(uri)  # another model serving these bytes
    failing = await cache.acquire(uri)
    cache.discard(failing.key)
    cache.release(failing.key)
    assert loaded.path.exists() and cache.keys() == [loaded.key]


async def test_credentials_scope_the_cache_key(tmp_path: pathlib.Path) -> None:
    """Bytes fetched with tenant A's credentials never serve tenant B, sha256 or not."""
    sha = hashlib.sha256(b"x").hexdigest()
    keys = {cache_key("https://h/m", "", None), cache_key("https://h/m", "", Auth("a", "s")),
            cache_key("https://h/m", "", Auth("b", "s")), cache_key("https://h/m", "", Auth("a", "t"))}
    assert len(keys) == 4
    assert cache_key("https://h/m", sha) == sha != cache_key("https://h/m", sha, Auth("a", "s"))
