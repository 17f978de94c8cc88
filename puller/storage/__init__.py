"""Storage backends: a provider turns a URI into a client; a client has one `pull`.

One file per backend, registered in the explicit table `providers()` builds (no import side
effects, no plugin discovery): file (puller/storage/file.py), http(s) (http.py), s3 (s3.py).
The cache (puller/cache.py) is the only caller. An artifact is a folder in the cache: one file
(model.onnx) or several (model.onnx, its ONNX external-data files, config.pbtxt), pulled by a
client's `pull_tree` as a unit. A client tells
the cache the artifact's size before writing it (`reserve`, so the cache can make room on its
disk first) and reports a full disk as `DiskFull` (so the cache can evict and retry), never
as a plain LoadFailed that would name the cache's own paths.

Every backend applies mesh/uripolicy.py again before it reads a byte (the router checked at
registration; the pod checks what it actually opens or connects to), and creates its target
with `open_target` (mode 0600 whatever the umask: the cache is private to the pod's user).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Protocol

from mesh.errors import InvalidArgument, LoadFailed
from mesh.settings import RuntimeSettings
from mesh.uripolicy import show

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


@dataclasses.dataclass(frozen=True)
class Auth:
    """Whose credentials a fetch uses: the ModelSpec's tenant and credentials_ref."""

    tenant: str = ""
    credentials_ref: str = ""


def open_target(target: str) -> int:
    """The download's target opened for writing (created 0600, truncated, never through a
    symlink); a regular file gets mode 0600 even if it existed or the umask was loose."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


class StorageClient(Protocol):
    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        """Writes the artifact at `uri` to the file `target` (created or truncated, with
        `open_target`), calling `reserve(size)` first when the size is known up front; `auth`
        names the credentials to fetch with (http(s) only).

        Raises DiskFull when the target's file system is full, else mesh.errors.LoadFailed
        (or another MeshError) with a user-facing reason."""
        ...


class TreeClient(StorageClient, Protocol):
    async def pull_tree(self, uri: str, folder: str, reserve: Reserve | None = None,
                        auth: Auth | None = None) -> None:
        """Writes the artifact at `uri` into the empty folder `folder`: a single file as
        `model.onnx`, a multi-file artifact (a directory, an s3 prefix) as its files at their
        relative paths, model.onnx at the top among them; `reserve(total)` is called once with
        the size of all files before any is written. Same errors as `pull`. A client without
        this method serves single files only (the cache pulls them to folder/model.onnx)."""
        ...


class Provider(Protocol):
    def client(self, uri: str) -> StorageClient: ...


def providers(settings: RuntimeSettings) -> dict[str, Provider]:
    """scheme -> provider for every backend this pod supports."""
    from mesh import uripolicy
    from puller.storage.credentials import Credentials
    from puller.storage.file import FileProvider
    from puller.storage.http import HttpProvider
    from puller.storage.s3 import S3Config, S3Provider

    roots = uripolicy.FileRoots.parse(settings.file_roots, "MESH_RUNTIME_FILE_ROOTS")
    egress = uripolicy.Egress.parse(settings.allowed_networks, settings.allowed_hosts, "MESH_RUNTIME")
    prefixes = uripolicy.TenantPrefixes.parse(settings.tenant_storage_prefixes,
                                              "MESH_RUNTIME_TENANT_STORAGE_PREFIXES")
    http = HttpProvider(settings.download_timeout_s, settings.max_artifact_bytes, egress,
                        settings.max_redirects, Credentials(settings.credentials_dir), prefixes)
    files = FileProvider(settings.max_artifact_bytes, roots, settings.allow_hard_links)
    s3 = S3Provider(S3Config(
        endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
        addressing_style=settings.s3_addressing_style, profile=settings.s3_profile,
        max_attempts=settings.s3_max_attempts, verify_tls=settings.s3_verify_tls,
        timeout_s=settings.download_timeout_s, max_bytes=settings.max_artifact_bytes,
    ), Credentials(settings.credentials_dir), prefixes)
    return {"file": files, "http": http, "https": http, "s3": s3}


def client_for(table: dict[str, Provider], uri: str) -> StorageClient:
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    provider = table.get(scheme)
    if provider is None:
        raise InvalidArgument(f"unsupported storage URI scheme '{scheme[:20]}' in {show(uri)}; "
                              f"supported: {sorted(table)}")
    return provider.client(uri)
