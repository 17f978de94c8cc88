"""puller.cache: single download per key, checksum verification, LRU with pins, temp sweep."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib

import pytest

from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from puller.cache import ArtifactCache, cache_key
from puller.storage.file import FileClient


class CountingProvider:
    """A file:// provider that counts pulls and yields mid-pull so concurrent callers overlap."""

    def __init__(self) -> None:
        self.pulls = 0
        self._client = FileClient(10**9)

    def client(self, uri: str) -> CountingProvider:
        return self

    async def pull(self, uri: str, target: str) -> None:
        self.pulls += 1
        await asyncio.sleep(0.01)
        await self._client.pull(uri, target)


def artifact(tmp_path: pathlib.Path, name: str, size: int = 100) -> str:
    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(name.encode().ljust(size, b"."))
    return path.as_uri()


async def make_cache(tmp_path: pathlib.Path, budget: int = 10**6) -> tuple[ArtifactCache, CountingProvider, Metrics]:
    provider = CountingProvider()
    metrics = Metrics(service="runtime")
    cache = ArtifactCache(tmp_path / "cache", budget, {"file": provider}, metrics)
    await cache.start()
    return cache, provider, metrics


async def test_concurrent_acquires_download_once(tmp_path: pathlib.Path) -> None:
    cache, provider, metrics = await make_cache(tmp_path)
    uri = artifact(tmp_path, "a")
    results = await asyncio.gather(*(cache.acquire(uri) for _ in range(8)))
    assert provider.pulls == 1
    assert {r.key for r in results} == {cache_key(uri, "")}
    assert results[0].path.read_bytes().startswith(b"a")
    for r in results:
        cache.release(r.key)
    again = await cache.acquire(uri)
    assert provider.pulls == 1  # a hit never re-downloads
    assert metrics.registry.get_sample_value("mesh_cache_hits_total", {"service": "runtime"}) == 1
    assert metrics.registry.get_sample_value("mesh_cache_misses_total", {"service": "runtime"}) == 1
    cache.release(again.key)
    assert not cache.pinned(again.key)
    await cache.close()


async def test_sha256_verified(tmp_path: pathlib.Path) -> None:
    cache, _, _ = await make_cache(tmp_path)
    uri = artifact(tmp_path, "a")
    good = hashlib.sha256((tmp_path / "src" / "a").read_bytes()).hexdigest()
    wrong = "0" * 64
    with pytest.raises(LoadFailed, match=f"has sha256 {good}, expected {wrong}"):
        await cache.acquire(uri, wrong)
    assert list(cache.tmp.iterdir()) == [] and list(cache.objects.iterdir()) == []
    assert not cache.pinned(wrong)
    ok = await cache.acquire(uri, good.upper())
    assert ok.key == good and ok.path.is_file()


async def test_bad_sha256_format(tmp_path: pathlib.Path) -> None:
    cache, provider, _ = await make_cache(tmp_path)
    with pytest.raises(LoadFailed, match="not 64 hex digits"):
        await cache.acquire(artifact(tmp_path, "a"), "xyz")
    assert provider.pulls == 0


async def test_lru_eviction_skips_pinned(tmp_path: pathlib.Path) -> None:
    cache, provider, metrics = await make_cache(tmp_path, budget=250)
    a, b, c = (artifact(tmp_path, n) for n in "abc")
    pinned = await cache.acquire(a)  # oldest, but in use
    for uri in (b, c):
        cache.release((await cache.acquire(uri)).key)
    # a (pinned) and c remain; b was the least recently used unpinned artifact
    assert cache.keys() == [cache_key(a, ""), cache_key(c, "")]
    assert pinned.path.is_file()
    assert not cache.path_of(cache_key(b, "")).exists()
    assert metrics.registry.get_sample_value("mesh_artifact_evictions_total") == 1
    assert metrics.registry.get_sample_value("mesh_artifact_cache_bytes") == 200


async def test_all_pinned_stays_over_budget(tmp_path: pathlib.Path) -> None:
    cache, _, _ = await make_cache(tmp_path, budget=150)
    held = [await cache.acquire(artifact(tmp_path, n)) for n in "ab"]
    assert all(h.path.is_file() for h in held) and cache.size_bytes == 200


async def test_start_sweeps_temp_and_indexes_objects(tmp_path: pathlib.Path) -> None:
    cache, provider, _ = await make_cache(tmp_path)
    uri = artifact(tmp_path, "a")
    cache.release((await cache.acquire(uri)).key)
    (cache.tmp / "leftover.part").write_bytes(b"junk")
    (cache.objects / "half-written").mkdir()
    restarted, provider2, _ = await make_cache(tmp_path)
    assert list(restarted.tmp.iterdir()) == []
    assert restarted.keys() == [cache_key(uri, "")]
    await restarted.acquire(uri)
    assert provider2.pulls == 0
