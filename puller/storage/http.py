"""http:// and https:// artifacts, streamed with httpx under a time and size limit.

Redirects are followed by hand (at most a few) and only to http(s): a redirect cannot turn
a download into a read of some other scheme.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import IO

import httpx

from mesh.errors import LoadFailed
from puller.storage import DiskFull, Reserve, is_disk_full

_MAX_REDIRECTS = 5
_CHUNK = 1024 * 1024


class HttpClient:
    def __init__(self, timeout_s: float, max_bytes: int) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._pull(uri, target, reserve)
        except TimeoutError as exc:
            raise LoadFailed(
                f"download of {uri} took longer than {self.timeout_s}s (MESH_RUNTIME_DOWNLOAD_TIMEOUT_S)"
            ) from exc
        except httpx.HTTPError as exc:
            raise LoadFailed(f"download of {uri} failed: {exc}") from exc

    async def _pull(self, uri: str, target: str, reserve: Reserve | None) -> None:
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
            url = uri
            for _ in range(_MAX_REDIRECTS + 1):
                async with client.stream("GET", url) as resp:
                    if resp.is_redirect:
                        url = _redirect_target(url, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        raise LoadFailed(f"download of {uri} failed: HTTP {resp.status_code}")
                    await self._save(uri, resp, target, reserve)
                    return
            raise LoadFailed(f"download of {uri} redirected more than {_MAX_REDIRECTS} times")

    async def _save(self, uri: str, resp: httpx.Response, target: str, reserve: Reserve | None) -> None:
        header = resp.headers.get("content-length", "")
        declared = int(header) if header.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            raise LoadFailed(self._too_big(uri, declared))
        if declared is not None and reserve is not None:
            await reserve(declared)  # room on the cache disk before the first byte
        total = 0
        try:
            out: IO[bytes] = await asyncio.to_thread(open, target, "wb")
            try:
                async for chunk in resp.aiter_bytes(_CHUNK):
                    if total + len(chunk) > self.max_bytes:
                        raise LoadFailed(self._too_big(uri, total + len(chunk)))
                    await asyncio.to_thread(out.write, chunk)
                    total += len(chunk)
            finally:
                await asyncio.to_thread(out.close)  # the buffered tail can hit ENOSPC here too
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(total, declared) from exc
            raise LoadFailed(f"cannot write the download of {uri}: {exc.strerror}") from exc

    def _too_big(self, uri: str, size: int) -> str:
        return (
            f"artifact {uri} is over the limit of {self.max_bytes} bytes (at least {size}; "
            "MESH_RUNTIME_MAX_ARTIFACT_BYTES)"
        )


def _redirect_target(current: str, location: str) -> str:
    if not location:
        raise LoadFailed(f"redirect from {current} without a Location")
    url = urllib.parse.urljoin(current, location)
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise LoadFailed(f"refusing redirect from {current} to a non-http(s) URL")
    return url


class HttpProvider:
    def __init__(self, timeout_s: float, max_bytes: int) -> None:
        self._client = HttpClient(timeout_s, max_bytes)

    def client(self, uri: str) -> HttpClient:
        return self._client
