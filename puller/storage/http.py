"""http:// and https:// artifacts, streamed with httpx under a time and size limit, never to a
host the egress policy refuses (mesh/uripolicy.py; shared/RELIABILITY.md S3, A5).

Before each request the host is resolved here and every address it has is checked; the
connection then goes to the checked address itself (the URL's host is replaced by it, with the
Host header and TLS server name kept), so DNS cannot answer differently between check and
connect (rebinding). Redirects are followed by hand, at most MESH_RUNTIME_MAX_REDIRECTS, each
hop checked like the first; https never drops to http, and credentials go to the original
origin only. Any failure to connect or to get an answer reads the same ("no connection or no
answer"): the text never tells an open port from a closed one. Proxies from the environment
are ignored (they would connect elsewhere than the checked address).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import urllib.parse

import httpx

from mesh import uripolicy
from mesh.errors import LoadFailed, PermissionDenied, quote_id
from puller.storage import Auth, DiskFull, Reserve, archive, is_disk_full, open_target
from puller.storage.credentials import Credentials

_CHUNK = 1024 * 1024
RESOLVE_TIMEOUT_S = 10.0


class HttpClient:
    def __init__(self, timeout_s: float, max_bytes: int, egress: uripolicy.Egress | None = None,
                 max_redirects: int = 3, credentials: Credentials | None = None,
                 prefixes: uripolicy.TenantPrefixes | None = None) -> None:
        self.prefixes = prefixes or uripolicy.TenantPrefixes()
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.egress = egress or uripolicy.Egress(setting="MESH_RUNTIME")
        self.max_redirects = max_redirects
        self.credentials = credentials or Credentials("")

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        shown = uripolicy.show(uri)
        auth = auth or Auth()
        headers = await asyncio.to_thread(self.credentials.headers, auth.tenant, auth.credentials_ref)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._pull(uri, target, reserve, headers, auth.tenant)
        except TimeoutError as exc:
            raise LoadFailed(
                f"download of {shown} took longer than {self.timeout_s}s (MESH_RUNTIME_DOWNLOAD_TIMEOUT_S)"
            ) from exc
        except httpx.HTTPError:
            # One text for refused, reset, timed out, TLS failure: no port scanning through it.
            raise LoadFailed(f"download of {shown} failed: no connection or no answer from its host") from None

    async def pull_tree(self, uri: str, folder: str, reserve: Reserve | None = None,
                        auth: Auth | None = None) -> None:
        """A single file as folder/model.onnx, or an archive (.tar, .tar.gz, .tgz, .zip)
        unpacked into the folder (puller/storage/archive.py). HTTP has no listing, so a folder (a
        URI ending in /) is refused: pack it, or serve it from file:// or s3:// (docs/STORAGE.md)."""
        path = urllib.parse.urlsplit(uri).path
        if len(path) > 1 and path.endswith("/"):
            raise LoadFailed(f"cannot read {uripolicy.show(uri)}: an http(s) URI names one file; a model "
                             "folder (model.onnx with external data) must be an archive (.tar.gz, .zip) "
                             "or come from file:// or s3://")
        if not archive.is_archive(uri):
            await self.pull(uri, os.path.join(folder, "model.onnx"), reserve, auth)
            return
        packed = os.path.join(folder, ".archive")  # a dot file: never part of the model
        await self.pull(uri, packed, reserve, auth)
        loop = asyncio.get_running_loop()
        size = await asyncio.to_thread(os.path.getsize, packed)

        async def reserve_all(unpacked: int) -> None:
            if reserve is not None:
                await reserve(size + unpacked)

        def room(unpacked: int) -> None:  # in the unpacking thread: the archive and its files
            asyncio.run_coroutine_threadsafe(reserve_all(unpacked), loop).result()

        try:
            await asyncio.to_thread(archive.unpack, packed, folder, self.max_bytes, uripolicy.show(uri), room)
        finally:
            await asyncio.to_thread(_unlink, packed)

    async def _pull(self, uri: str, target: str, reserve: Reserve | None, headers: dict[str, str],
                    tenant: str) -> None:
        timeout = httpx.Timeout(self.timeout_s)
        origin = _origin(urllib.parse.urlsplit(uri))
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            url = uri
            for _ in range(self.max_redirects + 1):
                parts = self._checked(uri, url)
                self._tenant_may_fetch(uri, url, parts, tenant)
                address = await self._address(uri, parts)
                sent = headers if _origin(parts) == origin else {}  # no credentials to another origin
                request = client.build_request(
                    "GET", _pinned(parts, address), headers={**sent, "Host": _host_header(parts)},
                    extensions={"sni_hostname": parts.hostname} if parts.scheme.lower() == "https" else {},
                )
                resp = await client.send(request, stream=True)
                try:
                    if resp.is_redirect:
                        url = _redirect_target(uri, url, resp.headers.get("location", ""))
                        continue
                    if resp.status_code != 200:
                        raise LoadFailed(f"download of {uripolicy.show(uri)} failed: HTTP {resp.status_code}")
                    await self._save(uri, resp, target, reserve)
                    return
                finally:
                    await resp.aclose()
            raise LoadFailed(f"download of {uripolicy.show(uri)} redirected more than {self.max_redirects} "
                             "times (MESH_RUNTIME_MAX_REDIRECTS)")

    def _checked(self, uri: str, url: str) -> urllib.parse.SplitResult:
        """The hop's URL, checked like a registration (credentials excepted for a redirect's
        own signed query: it is not stored anywhere)."""
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise LoadFailed(f"download of {uripolicy.show(uri)} failed: unparsable redirect") from None
        if parts.scheme.lower() not in ("http", "https") or "@" in parts.netloc:
            raise LoadFailed(f"download of {uripolicy.show(uri)}: refusing a redirect to a non-http(s) "
                             "URL or one with credentials")
        uripolicy.check_http_form(uri, parts._replace(fragment=""))
        return parts

    def _tenant_may_fetch(self, uri: str, url: str, parts: urllib.parse.SplitResult, tenant: str) -> None:
        """The tenant's storage prefixes, on the registered URI and on every redirect hop."""
        try:
            self.prefixes.check(url, parts, tenant)
        except PermissionDenied:
            hop = "its URI" if url == uri else "a redirect"
            raise LoadFailed(f"download of {uripolicy.show(uri)}: {hop} leaves the storage prefixes "
                             "this tenant may use (MESH_RUNTIME_TENANT_STORAGE_PREFIXES)") from None

    async def _address(self, uri: str, parts: urllib.parse.SplitResult) -> uripolicy.IP:
        """The address to connect to: every address of the host is checked, the first is used."""
        host = parts.hostname or ""
        literal = uripolicy.host_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                    infos = await loop.getaddrinfo(host, parts.port or _default_port(parts), type=socket.SOCK_STREAM)
            except (OSError, TimeoutError, UnicodeError):
                raise LoadFailed(f"download of {uripolicy.show(uri)} failed: cannot resolve its host "
                                 f"{quote_id(host, 80)}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        for address in addresses:
            self.egress.check(uri, address, host, literal=literal is not None)
        return addresses[0]

    async def _save(self, uri: str, resp: httpx.Response, target: str, reserve: Reserve | None) -> None:
        header = resp.headers.get("content-length", "")
        declared = int(header) if header.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            raise LoadFailed(self._too_big(uri, declared))
        if declared is not None and reserve is not None:
            await reserve(declared)  # room on the cache disk before the first byte
        total = 0
        try:
            out = await asyncio.to_thread(open_target, target)
            try:
                async for chunk in resp.aiter_bytes(_CHUNK):
                    if total + len(chunk) > self.max_bytes:
                        raise LoadFailed(self._too_big(uri, total + len(chunk)))
                    await asyncio.to_thread(_write_all, out, chunk)
                    total += len(chunk)
            finally:
                await asyncio.to_thread(_close, out)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(total, declared) from exc
            raise LoadFailed(f"cannot write the download of {uripolicy.show(uri)}: {exc.strerror}") from exc

    def _too_big(self, uri: str, size: int) -> str:
        return (
            f"artifact {uripolicy.show(uri)} is over the limit of {self.max_bytes} bytes (at least {size}; "
            "MESH_RUNTIME_MAX_ARTIFACT_BYTES)"
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close(fd: int) -> None:
    os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _default_port(parts: urllib.parse.SplitResult) -> int:
    return 443 if parts.scheme.lower() == "https" else 80


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or _default_port(parts)


def _host_header(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    return shown if parts.port in (None, _default_port(parts)) else f"{shown}:{parts.port}"


def _pinned(parts: urllib.parse.SplitResult, address: uripolicy.IP) -> str:
    """The URL with its host replaced by the checked address."""
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{host}:{parts.port or _default_port(parts)}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def _redirect_target(uri: str, current: str, location: str) -> str:
    shown = uripolicy.show(uri)
    if not location:
        raise LoadFailed(f"download of {shown}: redirect without a Location")
    url = urllib.parse.urljoin(current, location)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise LoadFailed(f"download of {shown}: refusing a redirect to a non-http(s) URL")
    if urllib.parse.urlsplit(current).scheme.lower() == "https" and scheme == "http":
        raise LoadFailed(f"download of {shown}: refusing a redirect from https to http")
    return url


class HttpProvider:
    def __init__(self, timeout_s: float, max_bytes: int, egress: uripolicy.Egress | None = None,
                 max_redirects: int = 3, credentials: Credentials | None = None,
                 prefixes: uripolicy.TenantPrefixes | None = None) -> None:
        self._client = HttpClient(timeout_s, max_bytes, egress, max_redirects, credentials, prefixes)

    def client(self, uri: str) -> HttpClient:
        return self._client
