"""puller.cache: single download per key, checksum verification, LRU with pins, temp sweep,
and a full disk (ENOSPC): room made before writing, eviction and one retry, the reason."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from mesh.uripolicy import FileRoots
from puller.cache import ArtifactCache, Disk, cache_key
from puller.storage import Auth, Reserve
from puller.storage.file import FileClient


class CountingProvider:
    """A file:// provider that counts pulls and yields mid-pull so concurrent callers overlap."""

    def __init__(self) -> None:
        self.pulls = 0
        # pytest's temporary folders (artifacts and tmpfs mounts) are all under it
        self._client = FileClient(10**9, FileRoots.parse(tempfile.gettempdir(), "MESH_RUNTIME_FILE_ROOTS"))

    def client(self, uri: str) -> CountingProvider:
        return self

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        self.pulls += 1
        await asyncio.sleep(0.01)
        await self._client.pull(uri, target, reserve, auth)


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


# -- a full disk ----------------------------------------------------------------------------


class FakeDisk:
    """A file system of `capacity` bytes holding what is under the cache root, plus `hog`
    bytes written by someone else that statvfs does not see when `hidden` (a disk that
    reports room and then fails the write anyway)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hog = 0
        self.hidden = False
        self.root: pathlib.Path | None = None

    def used(self) -> int:
        assert self.root is not None
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) + self.hog

    def __call__(self, root: pathlib.Path) -> Disk:
        self.root = root
        seen = self.used() - (self.hog if self.hidden else 0)
        return Disk(free=max(0, self.capacity - seen), total=self.capacity, block=1)


class FullDiskProvider:
    """Writes the artifact in 50-byte pieces onto the FakeDisk, raising OSError(ENOSPC) as the
    kernel would once it is full; tells the cache the size first only when `tell_size`."""

    def __init__(self, disk: FakeDisk, tell_size: bool) -> None:
        self.disk = disk
        self.tell_size = tell_size
        self.pulls = 0
        self.enospc = 0

    def client(self, uri: str) -> FullDiskProvider:
        return self

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        self.pulls += 1
        data = await asyncio.to_thread(pathlib.Path(uri.removeprefix("file://")).read_bytes)
        if self.tell_size and reserve is not None:
            await reserve(len(data))
        self._write(data, target)

    def _write(self, data: bytes, target: str) -> None:
        with open(target, "wb") as out:
            for i in range(0, len(data), 50):
                if self.disk.used() + 50 > self.disk.capacity:
                    self.enospc += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                out.write(data[i:i + 50])
                out.flush()


async def full_cache(tmp_path: pathlib.Path, capacity: int, tell_size: bool = True) -> tuple[
        ArtifactCache, FullDiskProvider, FakeDisk, Metrics]:
    disk = FakeDisk(capacity)
    provider = FullDiskProvider(disk, tell_size)
    metrics = Metrics(service="runtime")
    # The default budget (10 GiB) is far above the disk: only the disk itself can say "full".
    cache = ArtifactCache(tmp_path / "cache", 10 * 1024**3, {"file": provider}, metrics, disk=disk)
    await cache.start()
    disk.root = cache.root
    return cache, provider, disk, metrics


def evictions(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("mesh_artifact_evictions_total") or 0.0


async def test_room_made_before_writing_by_evicting_unused(tmp_path: pathlib.Path) -> None:
    """F19 regression: the budget was the only bound, so a pull onto a full disk evicted
    nothing. With the size known up front the cache evicts least recently used unpinned
    artifacts from the real disk first, and the write never hits ENOSPC."""
    cache, provider, _, metrics = await full_cache(tmp_path, capacity=450)
    a, b, c = (artifact(tmp_path, n, 200) for n in "abc")
    cache.release((await cache.acquire(a)).key)  # cached, not in use
    held = await cache.acquire(b)  # in use: never evicted
    got = await cache.acquire(c)
    assert provider.enospc == 0
    assert cache.keys() == [held.key, got.key] and got.path.read_bytes().startswith(b"c")
    assert not cache.path_of(cache_key(a, "")).exists()
    assert evictions(metrics) == 1
    assert list(cache.tmp.iterdir()) == []


async def test_enospc_on_write_removes_partial_evicts_and_retries_once(tmp_path: pathlib.Path) -> None:
    """F19 regression: ENOSPC mid-write (the size not known up front) failed the load with
    its partial file left and nothing evicted; now the partial goes, the unused artifacts go,
    and the second write succeeds."""
    cache, provider, _, metrics = await full_cache(tmp_path, capacity=450, tell_size=False)
    a, b, c = (artifact(tmp_path, n, 200) for n in "abc")
    cache.release((await cache.acquire(a)).key)
    held = await cache.acquire(b)
    got = await cache.acquire(c)
    assert provider.enospc == 1 and provider.pulls == 4  # a, b, then c twice
    assert cache.keys() == [held.key, got.key]
    assert evictions(metrics) == 1
    assert list(cache.tmp.iterdir()) == []


async def test_cannot_fit_fails_fast_with_the_reason_and_evicts_nothing(tmp_path: pathlib.Path) -> None:
    """An artifact that cannot fit even with every unused artifact gone (F19's 10 MiB model
    on an 8 MiB disk) is refused before a byte is written, with a reason that says what was
    needed and what is free and names no path of the pod's; its pin is let go."""
    cache, provider, _, metrics = await full_cache(tmp_path, capacity=450)
    a = artifact(tmp_path, "a", 200)
    big = artifact(tmp_path, "big", 600)
    cache.release((await cache.acquire(a)).key)
    with pytest.raises(LoadFailed) as info:
        await cache.acquire(big)
    reason = info.value.message
    assert reason == (
        "no space left on the cache disk (600 bytes needed, 250 free after evicting 0 unused "
        "artifacts; the cache disk holds 450 bytes in all); raise the volume or lower "
        "MESH_RUNTIME_CACHE_BYTES"
    )
    assert str(cache.root) not in reason and str(tmp_path) not in reason
    assert provider.enospc == 0 and evictions(metrics) == 0  # a doomed pull destroys nothing
    assert cache.keys() == [cache_key(a, "")]
    assert not cache.pinned(cache_key(big, "")) and list(cache.tmp.iterdir()) == []


async def test_still_full_after_evicting_fails_with_the_reason(tmp_path: pathlib.Path) -> None:
    """Another writer fills the disk behind statvfs's back: the pull evicts, retries once,
    and fails with the figures; then, the disk freed, the same artifact pulls at once (the
    failure remembered what it needed but holds nothing against a later load)."""
    cache, provider, disk, metrics = await full_cache(tmp_path, capacity=450)
    a, c = artifact(tmp_path, "a", 200), artifact(tmp_path, "c", 200)
    cache.release((await cache.acquire(a)).key)
    disk.hog, disk.hidden = 260, True  # the disk is full, and even evicting a leaves too little
    with pytest.raises(LoadFailed, match=r"^no space left on the cache disk \(200 bytes needed, \d+ free "
                       r"after evicting 1 unused artifacts\); raise the volume or lower MESH_RUNTIME_CACHE_BYTES$"):
        await cache.acquire(c)
    assert provider.pulls == 3 and provider.enospc == 2  # one retry, not a loop
    assert evictions(metrics) == 1 and cache.keys() == []
    assert list(cache.tmp.iterdir()) == []  # both partial files removed
    disk.hog = 0  # the fault ends
    got = await cache.acquire(c)
    assert got.path.read_bytes().startswith(b"c") and provider.pulls == 4


async def test_remembered_need_fails_fast_while_still_full(tmp_path: pathlib.Path) -> None:
    """A pull that ran out of room is refused up front by the next attempt while the disk
    is still too full (no write, no download), so repeated loads cost a statvfs, not a pull."""
    cache, provider, disk, _ = await full_cache(tmp_path, capacity=450, tell_size=False)
    c = artifact(tmp_path, "c", 300)
    disk.hog = 300
    with pytest.raises(LoadFailed, match=r"no space left on the cache disk \(at least 151 bytes needed"):
        await cache.acquire(c)  # 150 bytes written when it filled up: it needs more than that
    pulls = provider.pulls
    assert pulls == 2
    with pytest.raises(LoadFailed, match="no space left on the cache disk"):
        await cache.acquire(c)
    assert provider.pulls == pulls
    disk.hog = 0
    assert (await cache.acquire(c)).path.is_file()


@pytest.fixture
def tmpfs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A real 1 MiB tmpfs (needs root and mount(8)); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def test_real_tmpfs_evicts_on_a_full_disk_and_reports_enospc(tmp_path: pathlib.Path, tmpfs: pathlib.Path) -> None:
    """F19 on a real file system with the real file:// client: the budget (10 GiB) far above a
    1 MiB disk; the third 400 KiB artifact needs the unused first one evicted; a 2 MiB one
    fails with the no-space reason; nothing is left in tmp/."""
    metrics = Metrics(service="runtime")
    cache = ArtifactCache(tmpfs / "cache", 10 * 1024**3, {"file": CountingProvider()}, metrics)
    await cache.start()
    a, b, c = (artifact(tmp_path, n, 400 * 1024) for n in "abc")
    cache.release((await cache.acquire(a)).key)
    held = await cache.acquire(b)
    got = await cache.acquire(c)
    assert cache.keys() == [held.key, got.key] and evictions(metrics) == 1
    with pytest.raises(LoadFailed, match=r"no space left on the cache disk \(2097152 bytes needed") as info:
        await cache.acquire(artifact(tmp_path, "big", 2 * 1024 * 1024))
    assert str(tmpfs) not in info.value.message
    assert list(cache.tmp.iterdir()) == [] and cache.keys() == [held.key, got.key]
    await cache.close()
