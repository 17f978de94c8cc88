"""Storage backends: a provider turns a URI into a client; a client has one `pull`.

One file per backend, registered in the explicit table `providers()` builds (no import side
effects, no plugin discovery). The cache (puller/cache.py) is the only caller. A client tells
the cache the artifact's size before writing it (`reserve`, so the cache can make room on its
disk first) and reports a full disk as `DiskFull` (so the cache can evict and retry), never
as a plain LoadFailed that would name the cache's own paths.
"""

from __future__ import annotations

import errno
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Protocol

from mesh.errors import InvalidArgument, LoadFailed
from mesh.settings import RuntimeSettings

# Called with the artifact's size in bytes once it is known (file size, Content-Length),
# before anything is written; may raise LoadFailed (no room can be made for it).
Reserve = Callable[[int], Awaitable[None]]

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """An OSError saying the file system (or the user's quota on it) is full."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


class DiskFull(LoadFailed):
    """Writing the artifact hit ENOSPC/EDQUOT. `written`: bytes in the target when it did;
    `size`: the artifact's size when known. The cache turns this into the user's reason."""

    def __init__(self, written: int, size: int | None) -> None:
        super().__init__(f"no space left on the cache disk after writing {written} bytes")
        self.written = written
        self.size = size


class StorageClient(Protocol):
    async def pull(self, uri: str, target: str, reserve: Reserve | None = None) -> None:
        """Writes the artifact at `uri` to the file `target` (created or truncated), calling
        `reserve(size)` first when the size is known up front.

        Raises DiskFull when the target's file system is full, else mesh.errors.LoadFailed
        (or another MeshError) with a user-facing reason."""
        ...


class Provider(Protocol):
    def client(self, uri: str) -> StorageClient: ...


def providers(settings: RuntimeSettings) -> dict[str, Provider]:
    """scheme -> provider for every backend this pod supports."""
    from puller.storage.file import FileProvider
    from puller.storage.http import HttpProvider

    http = HttpProvider(settings.download_timeout_s, settings.max_artifact_bytes)
    return {"file": FileProvider(settings.max_artifact_bytes), "http": http, "https": http}


def client_for(table: dict[str, Provider], uri: str) -> StorageClient:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    provider = table.get(scheme)
    if provider is None:
        raise InvalidArgument(f"unsupported storage URI scheme '{scheme}' in {uri!r}; supported: {sorted(table)}")
    return provider.client(uri)
