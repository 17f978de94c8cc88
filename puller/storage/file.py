"""file:// artifacts: absolute local paths, resolved with realpath, regular files only."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import urllib.parse

from mesh.errors import InvalidArgument, LoadFailed
from puller.storage import DiskFull, Reserve, is_disk_full


def local_path(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise InvalidArgument(f"not a file:// URI: {uri!r}")
    if parts.netloc not in ("", "localhost"):
        raise InvalidArgument(f"file:// URI must not name a host: {uri!r}")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise InvalidArgument(f"file:// URI needs an absolute path: {uri!r}")
    return os.path.realpath(path)


class FileClient:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None) -> None:
        source = local_path(uri)
        size = await asyncio.to_thread(self._check, uri, source)
        if reserve is not None:
            await reserve(size)
        await asyncio.to_thread(self._copy, uri, source, target, size)

    def _check(self, uri: str, source: str) -> int:
        try:
            info = os.stat(source)
        except OSError as exc:
            raise LoadFailed(f"cannot read artifact {uri}: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise LoadFailed(f"artifact {uri} is not a regular file")
        if info.st_size > self.max_bytes:
            raise LoadFailed(
                f"artifact {uri} is {info.st_size} bytes, over the limit of {self.max_bytes} "
                "(MESH_RUNTIME_MAX_ARTIFACT_BYTES)"
            )
        return info.st_size

    def _copy(self, uri: str, source: str, target: str, size: int) -> None:
        try:
            shutil.copyfile(source, target)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(_size_of(target), size) from exc
            raise LoadFailed(f"cannot copy artifact {uri}: {exc.strerror}") from exc


def _size_of(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class FileProvider:
    def __init__(self, max_bytes: int) -> None:
        self._client = FileClient(max_bytes)

    def client(self, uri: str) -> FileClient:
        return self._client
