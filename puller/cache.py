"""The pod's disk cache of model artifacts: content-addressed, verified, bounded, LRU.

Layout under `cache_dir`:
    objects/<key>/model.onnx   key = the assignment's sha256, else sha256 of the URI string;
    objects/<key>/...          a multi-file artifact's other files (ONNX external data,
                               config.pbtxt) beside it: the folder is the cache entry;
                               with a credentials_ref, a digest of (sha256 or URI, tenant, ref),
                               so bytes fetched with one tenant's credentials never serve another
    tmp/                       downloads in progress and evicted folders being removed

Private to the pod's user whatever the umask: folders 0700, files 0600 (made so at start for
what an older version left). A failed artifact never stays: a failed or refused fetch and a
sha256 mismatch lose their temp file, and a load that fails on the installed artifact
`discard`s it (unless another model loaded it fine and still uses it).

A download lands in a folder under tmp/, is checked against the sha256 when one was given (of
model.onnx alone, or the tree digest of a folder of several files, puller/cachefiles.py), and the
folder is renamed into objects/ (atomic on one file system), so a crash never leaves a half
file or half a folder under a key; sizes and budgets count every file; eviction removes the
folder.
One download per key however many callers ask (SingleFlight). Artifacts in use are pinned
(`acquire` / `release`); when the cache is over `cache_bytes`, the least recently used
unpinned artifacts go. Index changes that move files hold one short lock, never a download.

The disk is the other bound: the budget may be set above what the volume holds. Before a
download writes a byte (once its size is known: the file's size, the Content-Length, or what
an earlier attempt found it needed) the cache makes room for it on the real file system
(os.statvfs, less what downloads in progress still have to write), evicting least recently
used unpinned artifacts; when even evicting all of them cannot make room it fails at once,
evicting nothing. A write that still hits ENOSPC/EDQUOT (the size was not known, or something
else filled the disk) loses its partial file, evicts for the size and is retried once; then the
load fails with a reason that says how much was needed and how much is free (F19).
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
from collections.abc import Callable

from mesh.errors import LoadFailed
from mesh.metrics import Metrics
from mesh.singleflight import SingleFlight
from mesh.uripolicy import show
from puller.cachefiles import (
    ARTIFACT,
    HASH_CHUNK,
    artifact_sha256,
    fresh_dir,
    private_dir,
    private_tree,
    remove_tree,
    rounded,
    size_of,
)
from puller.storage import Auth, DiskFull, Provider, client_for, is_disk_full

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class Disk:
    """What os.statvfs says of the cache's file system, in bytes."""

    free: int  # available to this (unprivileged) process
    total: int
    block: int  # allocation unit: a file of n bytes takes n rounded up to it


def statvfs_disk(path: pathlib.Path) -> Disk:
    st = os.statvfs(path)
    return Disk(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize, block=st.f_frsize or 4096)


@dataclasses.dataclass
class _Writing:
    """A download in progress that reserved room: its temp file and its expected size."""

    part: pathlib.Path
    size: int


@dataclasses.dataclass(frozen=True)
class Artifact:
    key: str
    path: pathlib.Path
    size_bytes: int
    sha256: str = ""  # the digest it was verified against ("" when none was given)


def _digest(sha256: str) -> str:
    digest = sha256.strip().lower()
    if not _SHA256.match(digest):
        raise LoadFailed(f"sha256 {sha256[:80]!r} is not 64 hex digits")
    return digest


def cache_key(uri: str, sha256: str, auth: Auth | None = None) -> str:
    """The artifact's key: its sha256, else a digest of its URI; scoped to the tenant and
    credentials_ref when it is fetched with credentials."""
    base = _digest(sha256) if sha256 else hashlib.sha256(uri.encode()).hexdigest()
    if auth is None or not auth.credentials_ref:
        return base
    return hashlib.sha256(f"{base}\0{auth.tenant}\0{auth.credentials_ref}".encode()).hexdigest()


class ArtifactCache:
    def __init__(
        self, root: pathlib.Path, budget_bytes: int, storage: dict[str, Provider], metrics: Metrics,
        disk: Callable[[pathlib.Path], Disk] = statvfs_disk,
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
        self._disk = disk
        self._writing: dict[str, _Writing] = {}  # key -> a download that reserved room
        self._needed: dict[str, int] = {}  # key -> bytes an earlier attempt ran out of room for

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
        private_dir(self.root)
        private_dir(self.objects)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        private_dir(self.tmp)
        entries: list[tuple[float, str, int]] = []
        for folder in self.objects.iterdir():
            path = folder / ARTIFACT
            if folder.is_dir() and not folder.is_symlink() and path.is_file() and not path.is_symlink():
                # an older version left them 0755 / 0644
                entries.append((path.stat().st_mtime, folder.name, private_tree(folder)))
            elif folder.is_symlink():
                folder.unlink(missing_ok=True)
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

    async def acquire(self, uri: str, sha256: str = "", tenant: str = "", credentials_ref: str = "") -> Artifact:
        """The artifact on local disk, pinned until `release(key)`; pulls it on a miss (with
        the credentials `credentials_ref` of `tenant` names, puller/storage/credentials.py)."""
        auth = Auth(tenant, credentials_ref)
        key = cache_key(uri, sha256, auth)
        self._pins[key] += 1
        try:
            if key in self._index:
                self.metrics.cache_hits.labels("runtime").inc()
            else:
                await self._flight.do(key, lambda: self._download(key, uri, sha256, auth))
            self._index.move_to_end(key)
            return Artifact(key, self.path_of(key), self._index[key], _digest(sha256) if sha256 else "")
        except BaseException:
            self.release(key)
            raise

    def progress(self, uri: str, sha256: str = "", tenant: str = "", credentials_ref: str = "") -> tuple[int, int] | None:
        """(bytes written, bytes expected) of the pull of this artifact in progress; None when
        none runs or its size is not known (the storage did not say)."""
        writing = self._writing.get(cache_key(uri, sha256, Auth(tenant, credentials_ref)))
        if writing is None or writing.size <= 0:
            return None
        return min(size_of(writing.part), writing.size), writing.size

    def discard(self, key: str) -> None:
        """A load of the artifact failed: it leaves the cache at once (the caller still
        releases its pin), unless another load holds it too (it loaded there, so the bytes
        are not what failed). The next load of it pulls it again."""
        if self._pins[key] > 1 or key not in self._index:
            return
        size = self._index.pop(key)
        try:
            self._remove(key)
        except OSError:
            log.warning("artifact %s: could not delete it after its load failed", key)
        log.info("deleted artifact %s (%d bytes): its load failed", key, size)
        self._report()

    def release(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    async def _download(self, key: str, uri: str, sha256: str, auth: Auth) -> None:
        if key in self._index:  # a caller that finished just before us installed it
            return
        self.metrics.cache_misses.labels("runtime").inc()
        start = time.perf_counter()
        part = self.tmp / f"{key}-{uuid.uuid4().hex[:8]}.part"  # a folder: the artifact's files
        try:
            await self._pull(key, uri, part, auth)
            if sha256:
                actual = await asyncio.to_thread(artifact_sha256, part)
                if actual != _digest(sha256):
                    raise LoadFailed(f"artifact {show(uri)} has sha256 {actual}, expected {_digest(sha256)}")
            async with self._lock:
                size = await asyncio.to_thread(self._install, part, key)
                self._index[key] = size
                self._needed.pop(key, None)
                await self._evict_over_budget()
        finally:
            self._writing.pop(key, None)
            await asyncio.to_thread(remove_tree, part)
        self.metrics.cache_miss_seconds.labels("runtime").observe(time.perf_counter() - start)
        self._report()

    async def _pull(self, key: str, uri: str, part: pathlib.Path, auth: Auth) -> None:
        """Pulls into `part`, with room made first; on a full disk, evicts and retries once."""
        client = client_for(self.storage, uri)
        known: list[int] = []
        evicted = [0]  # by this pull, for the reason

        async def reserve(size: int) -> None:
            known.append(size)
            evicted[0] += await self._make_room(key, part, size, evicted[0])

        if (hint := self._needed.get(key)) is not None:
            await reserve(hint)  # it failed for want of room before: fail fast if still none
        for attempt in (1, 2):
            try:
                await asyncio.to_thread(fresh_dir, part)
                pull_tree = getattr(client, "pull_tree", None)
                if pull_tree is not None:
                    await pull_tree(uri, str(part), reserve, auth)
                else:  # a single-file backend
                    await client.pull(uri, str(part / ARTIFACT), reserve, auth)
                return
            except (DiskFull, OSError) as exc:
                if not isinstance(exc, DiskFull) and not is_disk_full(exc):
                    raise
                written = max(exc.written if isinstance(exc, DiskFull) else 0, size_of(part))
                size = exc.size if isinstance(exc, DiskFull) and exc.size else (known[-1] if known else None)
                # What it needs for sure: its size, else more than was written. Only that lower
                # bound is remembered (a later load refused on a guess could never succeed).
                floor = max(size or written + 1, self._needed.get(key, 0))
                await asyncio.to_thread(remove_tree, part)
                self._needed[key] = floor
                log.warning("artifact %s: the cache disk filled up after %d bytes (attempt %d of 2)",
                            key, written, attempt)
                if attempt == 2:
                    disk = await asyncio.to_thread(self._disk, self.root)
                    raise LoadFailed(self._no_space(floor, disk, evicted[0], exact=size is not None)) from None
                # Unknown size: evict for what was written plus a chunk, so the retry gets further.
                evict_for = size or written + HASH_CHUNK
                evicted[0] += await self._make_room(key, part, evict_for, evicted[0], after_full=True)

    async def _make_room(self, key: str, part: pathlib.Path, size: int, before: int = 0,
                         after_full: bool = False) -> int:
        """Evicts least recently used unpinned artifacts until `size` bytes fit on the disk
        (and, softly, in the budget); returns how many went. Raises LoadFailed, evicting
        nothing, when even all of them would not make room (`before`: evicted earlier in the
        same pull, for the reason). `after_full`: the disk said ENOSPC already, so nothing is
        refused here; the retry's own reserve, or its write, decides."""
        async with self._lock:
            self._writing[key] = _Writing(part, size)
            disk = await asyncio.to_thread(self._disk, self.root)
            pending = await asyncio.to_thread(self._pending, key)
            need = rounded(size, disk.block) + disk.block  # its blocks and the folder's
            unpinned = [k for k in self._index if not self.pinned(k) and k != key]
            reclaimable = sum(rounded(self._index[k], disk.block) for k in unpinned)
            if not after_full and disk.free - pending + reclaimable < need:
                self._writing.pop(key, None)
                raise LoadFailed(self._no_space(size, disk, before, pending))
            evicted = freed = 0
            for victim in unpinned:
                over_budget = self.size_bytes + self._reserved_bytes() > self.budget_bytes
                # After ENOSPC statvfs is no judge (quotas, root's reserved blocks, another
                # writer): free what the artifact needs by eviction alone.
                room = freed >= need if after_full else disk.free - pending >= need
                if room and not over_budget:
                    break
                gone = self._index.pop(victim)
                await asyncio.to_thread(self._remove, victim)
                self.metrics.artifact_evictions.inc()
                evicted += 1
                freed += rounded(gone, disk.block)
                log.info("evicted artifact %s (%d bytes) to make room for %s (%d bytes)", victim, gone, key, size)
                disk = await asyncio.to_thread(self._disk, self.root)
            self._report()
            if not after_full and disk.free - pending < need:
                self._writing.pop(key, None)
                raise LoadFailed(self._no_space(size, disk, before + evicted, pending))
            return evicted

    def _pending(self, key: str) -> int:
        """Bytes other downloads that reserved room have still to write (their temp files
        hold the rest, which statvfs already counts as used)."""
        return sum(max(0, w.size - size_of(w.part)) for k, w in self._writing.items() if k != key)

    def _reserved_bytes(self) -> int:
        return sum(w.size for w in self._writing.values())

    def _no_space(self, needed: int, disk: Disk, evicted: int, pending: int = 0, exact: bool = True) -> str:
        # The user's reason: no path of the pod's own (the cache dir is an operator's detail).
        free = max(0, disk.free - pending)
        also = f"; the cache disk holds {disk.total} bytes in all" if needed > disk.total else ""
        return (
            f"no space left on the cache disk ({'' if exact else 'at least '}{needed} bytes needed, "
            f"{free} free after evicting "
            f"{evicted} unused artifacts{also}); raise the volume or lower MESH_RUNTIME_CACHE_BYTES"
        )

    def _install(self, part: pathlib.Path, key: str) -> int:
        """The downloaded folder becomes objects/<key> in one rename (the unit: a crash leaves
        either the whole folder or none); returns the size of all its files."""
        size = private_tree(part)  # the clients created them 0600; a fake or an old one may not have
        folder = self.objects / key
        if folder.exists():  # not in the index, so a leftover: never merged with the new files
            self._remove(key)
        os.replace(part, folder)
        return size

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
