"""The pod's disk cache of model artifacts: content-addressed, verified, bounded, LRU.

Layout under `cache_dir`:
    objects/<key>/model.onnx   key = the assignment's sha256, else sha256 of the URI string
    tmp/                       downloads in progress and evicted folders being removed

A download lands in tmp/, is checked against the sha256 when one was given, and is renamed
into objects/ (atomic on one file system), so a crash never leaves a half file under a key.
One download per key however many callers ask (SingleFlight). Artifacts in use are pinned
(`acquire` / `release`); when the cache is over `cache_bytes`, the least recently used
unpinned artifacts go. Index changes that move files hold one short lock, never a download.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import pathlib
import re
import shutil
import time
import uuid

from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from mesh.singleflight import SingleFlight
from puller.storage import Provider, client_for

log = logging.getLogger(__name__)

ARTIFACT = "model.onnx"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Artifact:
    key: str
    path: pathlib.Path
    size_bytes: int


def cache_key(uri: str, sha256: str) -> str:
    if sha256:
        digest = sha256.strip().lower()
        if not _SHA256.match(digest):
            raise LoadFailed(f"sha256 {sha256!r} is not 64 hex digits")
        return digest
    return hashlib.sha256(uri.encode()).hexdigest()


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    def __init__(
        self, root: pathlib.Path, budget_bytes: int, storage: dict[str, Provider], metrics: Metrics
    ) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.budget_bytes = budget_bytes
        self.storage = storage
        self.metrics = metrics
        self._index: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU first
        self._pins: collections.Counter[str] = collections.Counter()
        self._flight: SingleFlight[str, None] = SingleFlight()
        self._lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Creates the folders, sweeps leftover temp files and indexes what is on disk."""
        found = await asyncio.to_thread(self._scan)
        for key, size in found:
            self._index[key] = size
        log.info("artifact cache %s: %d artifacts, %d bytes", self.root, len(found), self.size_bytes)
        async with self._lock:
            await self._evict_over_budget()
        self._report()

    def _scan(self) -> list[tuple[str, int]]:
        self.objects.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        entries: list[tuple[float, str, int]] = []
        for folder in self.objects.iterdir():
            path = folder / ARTIFACT
            if folder.is_dir() and path.is_file():
                info = path.stat()
                entries.append((info.st_mtime, folder.name, info.st_size))
            elif folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
        entries.sort()
        return [(key, size) for _, key, size in entries]

    async def close(self) -> None:
        await self._flight.close()

    # -- use ----------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return sum(self._index.values())

    def pinned(self, key: str) -> bool:
        return self._pins[key] > 0

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        return list(self._index)

    def path_of(self, key: str) -> pathlib.Path:
        return self.objects / key / ARTIFACT

    async def acquire(self, uri: str, sha256: str = "") -> Artifact:
        """The artifact on local disk, pinned until `release(key)`; pulls it on a miss."""
        key = cache_key(uri, sha256)
        self._pins[key] += 1
        try:
            if key in self._index:
                self.metrics.cache_hits.labels("runtime").inc()
            else:
                await self._flight.do(key, lambda: self._download(key, uri, sha256))
            self._index.move_to_end(key)
            return Artifact(key, self.path_of(key), self._index[key])
        except BaseException:
            self.release(key)
            raise

    def release(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    async def _download(self, key: str, uri: str, sha256: str) -> None:
        if key in self._index:  # a caller that finished just before us installed it
            return
        self.metrics.cache_misses.labels("runtime").inc()
        start = time.perf_counter()
        part = self.tmp / f"{key}-{uuid.uuid4().hex[:8]}.part"
        try:
            await client_for(self.storage, uri).pull(uri, str(part))
            if sha256:
                actual = await asyncio.to_thread(file_sha256, part)
                if actual != key:
                    raise LoadFailed(f"artifact {uri} has sha256 {actual}, expected {key}")
            async with self._lock:
                size = await asyncio.to_thread(self._install, part, key)
                self._index[key] = size
                await self._evict_over_budget()
        finally:
            await asyncio.to_thread(part.unlink, missing_ok=True)
        self.metrics.cache_miss_seconds.labels("runtime").observe(time.perf_counter() - start)
        self._report()

    def _install(self, part: pathlib.Path, key: str) -> int:
        folder = self.objects / key
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / ARTIFACT
        os.replace(part, target)
        return target.stat().st_size

    async def _evict_over_budget(self) -> None:
        """Removes least recently used unpinned artifacts until within budget. Holds _lock."""
        total = self.size_bytes
        for key in list(self._index):
            if total <= self.budget_bytes:
                break
            if self.pinned(key):
                continue
            size = self._index.pop(key)
            total -= size
            await asyncio.to_thread(self._remove, key)
            self.metrics.artifact_evictions.inc()
            log.info("evicted artifact %s (%d bytes) from the disk cache", key, size)
        if total > self.budget_bytes:
            log.warning(
                "artifact cache holds %d bytes of artifacts in use, over MESH_RUNTIME_CACHE_BYTES=%d",
                total, self.budget_bytes,
            )
        self._report()

    def _remove(self, key: str) -> None:
        # Move the folder aside first (atomic) so a later install under the key never races rmtree.
        trash = self.tmp / f"evicted-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(self.objects / key, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _report(self) -> None:
        self.metrics.artifact_cache_bytes.set(self.size_bytes)
