"""Storage backends: a provider turns a URI into a client; a client has one `pull`.

One file per backend, registered in the explicit table `providers()` builds (no import side
effects, no plugin discovery). The cache (puller/cache.py) is the only caller.
"""

from __future__ import annotations

import urllib.parse
from typing import Protocol

from mesh.errors import InvalidArgument
from mesh.settings import RuntimeSettings


class StorageClient(Protocol):
    async def pull(self, uri: str, target: str) -> None:
        """Writes the artifact at `uri` to the file `target` (created or truncated).

        Raises mesh.errors.LoadFailed (or another MeshError) with a user-facing reason."""
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
