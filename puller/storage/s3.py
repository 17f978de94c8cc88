"""s3:// artifacts: one object (s3://bucket/key) or every object under a prefix
(s3://bucket/prefix/, a multi-file model), read from the S3 API the operator configured.

Why boto3 in a worker thread rather than aiobotocore: boto3 is what moto, MinIO's docs and
every operator's tooling speak, its releases track botocore without aiobotocore's exact pins
(which fight the boto3 other packages want), and its streamed body read in a thread releases
the GIL on every socket read; measured against a plain httpx download of the same bytes from
the same server (docs/BENCHMARKS.md "S3 pulls", bench/s3_pull.py). Each object is one
thread job that streams 1 MiB chunks to the target; the event loop only waits on it. A
cancelled or timed-out pull sets an event the thread checks between chunks, so it stops
within one chunk (or the read timeout) and never writes after the cache removed its file.

Where things come from:
- the endpoint, region and addressing style: the pod's settings (MESH_RUNTIME_S3_*), never
  the URI (mesh/uripolicy.py refuses endpoints, ports and credentials in s3 URIs);
- credentials: a model's credentials_ref (a Secret under MESH_RUNTIME_CREDENTIALS_DIR,
  puller/storage/credentials.py), else the pod's profile (MESH_RUNTIME_S3_PROFILE), else the
  environment and botocore's default chain (AWS_ACCESS_KEY_ID, web identity, instance role).

Checks: the tenant's storage prefixes again (what the pod reads), the size limit before a byte
is written (Content-Length, or the listing's sizes for a prefix), the byte count, and the MD5
of a single-part object against its ETag (multipart ETags are not digests; the spec's sha256,
checked by the cache, covers those). Requests are retried by botocore (standard mode: jittered
exponential backoff, MESH_RUNTIME_S3_MAX_ATTEMPTS); a body cut short resumes with a Range
request pinned to the ETag (If-Match), so a changed object is never stitched onto the old one.
Errors name the URI and what to do, never a key, the endpoint or a pod path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh import uripolicy
from mesh.errors import LoadFailed, PermissionDenied
from puller.storage import Auth, DiskFull, Reserve, is_disk_full, open_target
from puller.storage.credentials import Credentials
from puller.storage.s3errors import describe, resumable

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
MAX_FILES = 1000  # objects in one multi-file artifact
MAX_DEPTH = 8  # folder levels below the prefix
PARALLEL_OBJECTS = 4  # objects of one prefix downloaded at once
_MD5 = re.compile(r'^"?([0-9a-f]{32})"?$')


@dataclasses.dataclass(frozen=True)
class S3Config:
    endpoint_url: str = ""
    region: str = ""
    addressing_style: str = "auto"
    profile: str = ""
    max_attempts: int = 4
    verify_tls: bool = True
    timeout_s: float = 300.0
    max_bytes: int = 4 * 1024**3


@dataclasses.dataclass(frozen=True)
class S3Object:
    key: str  # the whole key
    relative: str  # below the prefix ("model.onnx" for a single object)
    size: int
    etag: str = ""


class _Cancelled(Exception):
    """The pull was cancelled or timed out while a thread was reading."""


def make_client(config: S3Config, keys: dict[str, str] | None = None) -> Any:
    """A boto3 S3 client for `config` (thread-safe; one per set of credentials)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=config.profile or None, **(keys or {}))
    return session.client(
        "s3", endpoint_url=config.endpoint_url or None, region_name=config.region or None,
        verify=config.verify_tls,
        config=Config(s3={"addressing_style": config.addressing_style},
                      retries={"mode": "standard", "total_max_attempts": config.max_attempts},
                      connect_timeout=10, read_timeout=60, max_pool_connections=PARALLEL_OBJECTS * 2,
                      user_agent_extra="meshserve"),
    )


class S3Client:
    def __init__(self, config: S3Config, credentials: Credentials | None = None,
                 prefixes: uripolicy.TenantPrefixes | None = None,
                 client_factory: Callable[[S3Config, dict[str, str] | None], Any] = make_client) -> None:
        self.config = config
        self.credentials = credentials or Credentials("")
        self.prefixes = prefixes or uripolicy.TenantPrefixes(setting="MESH_RUNTIME_TENANT_STORAGE_PREFIXES")
        self._factory = client_factory
        self._clients: dict[tuple[tuple[str, str], ...], Any] = {}
        self._clients_lock = threading.Lock()

    # -- the StorageClient interface ------------------------------------------------------------

    async def pull(self, uri: str, target: str, reserve: Reserve | None = None, auth: Auth | None = None) -> None:
        """One object into the file `target` (an s3 URI ending in / is a folder: `pull_tree`)."""
        bucket, key = self._checked(uri, auth)
        if not key or key.endswith("/"):
            raise LoadFailed(f"{uripolicy.show(uri)} is a prefix (a folder); it is pulled as a folder")
        s3 = await self._client(auth)
        await self._bounded(uri, self._get_to(s3, uri, bucket, S3Object(key, "model.onnx", -1), target, reserve))

    async def pull_tree(self, uri: str, folder: str, reserve: Reserve | None = None,
                        auth: Auth | None = None) -> None:
        """The artifact into the empty folder `folder`: one object as model.onnx, or every
        object under a prefix at its relative path (model.onnx among them)."""
        bucket, key = self._checked(uri, auth)
        if key and not key.endswith("/"):
            await self.pull(uri, os.path.join(folder, "model.onnx"), reserve, auth)
            return
        s3 = await self._client(auth)

        async def run() -> None:
            objects = await self._thread(self._list, s3, uri, bucket, key)
            total = sum(o.size for o in objects)
            if total > self.config.max_bytes:
                raise LoadFailed(_too_big(uri, self.config.max_bytes, total))
            if reserve is not None:
                await reserve(total)
            for o in objects:
                parent = os.path.dirname(o.relative)
                if parent:
                    await asyncio.to_thread(os.makedirs, os.path.join(folder, parent), 0o700, True)
            gate = asyncio.Semaphore(PARALLEL_OBJECTS)

            async def one(o: S3Object) -> None:
                async with gate:
                    await self._get_to(s3, uri, bucket, o, os.path.join(folder, o.relative), None)

            async with asyncio.TaskGroup() as group:
                for o in objects:
                    group.create_task(one(o))

        try:
            await self._bounded(uri, run())
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None

    # -- parts ----------------------------------------------------------------------------------

    def _checked(self, uri: str, auth: Auth | None) -> tuple[str, str]:
        parts = uripolicy.parse(uri, {"s3"}, "MESH_RUNTIME")
        try:
            self.prefixes.check(uri, parts, (auth or Auth()).tenant)
        except PermissionDenied:
            raise LoadFailed(f"cannot read {uripolicy.show(uri)}: it is outside the storage prefixes this "
                             "tenant may use (MESH_RUNTIME_TENANT_STORAGE_PREFIXES)") from None
        return uripolicy.s3_location(uri)

    async def _client(self, auth: Auth | None) -> Any:
        auth = auth or Auth()
        keys = await asyncio.to_thread(self.credentials.s3_keys, auth.tenant, auth.credentials_ref)
        ident = tuple(sorted(keys.items()))
        with self._clients_lock:
            client = self._clients.get(ident)
        if client is None:
            try:
                client = await asyncio.to_thread(self._factory, self.config, keys or None)
            except Exception as exc:
                raise describe(exc, "s3://", "") or LoadFailed("cannot create the S3 client: check the pods' "
                                                              "MESH_RUNTIME_S3_* settings") from None
            with self._clients_lock:
                client = self._clients.setdefault(ident, client)
        return client

    async def _bounded(self, uri: str, job: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self.config.timeout_s):
                await job
        except TimeoutError:
            raise LoadFailed(f"download of {uripolicy.show(uri)} took longer than {self.config.timeout_s}s "
                             "(MESH_RUNTIME_DOWNLOAD_TIMEOUT_S)") from None

    async def _thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args, cancel)` in a worker thread; a cancel of the caller stops it at its next
        chunk, and returns only once it stopped (so nothing writes after the cache cleans up)."""
        cancel = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args, cancel))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(BaseException):
                await job
            raise

    def _list(self, s3: Any, uri: str, bucket: str, prefix: str, cancel: threading.Event) -> list[S3Object]:
        """Every object under `prefix`, checked as a model folder; raises LoadFailed."""
        shown = uripolicy.show(uri)
        objects: list[S3Object] = []
        try:
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                if cancel.is_set():
                    raise _Cancelled
                for item in page.get("Contents", ()):
                    rel = item["Key"][len(prefix):]
                    if rel.endswith("/") and int(item.get("Size", 0)) == 0:
                        continue  # a "folder" marker some tools write
                    if len(objects) >= MAX_FILES:
                        raise LoadFailed(f"cannot read {shown}: more than {MAX_FILES} objects under the prefix")
                    objects.append(S3Object(item["Key"], _relative(shown, rel), int(item["Size"]),
                                            str(item.get("ETag", ""))))
        except (LoadFailed, _Cancelled):
            raise
        except Exception as exc:
            raise describe(exc, uri, bucket) or exc from None
        if not objects:
            raise LoadFailed(f"cannot read {shown}: no objects under the prefix (check the bucket and prefix)")
        if not any(o.relative == "model.onnx" for o in objects):
            raise LoadFailed(f"cannot read {shown}: the folder has no model.onnx at its top")
        return objects

    async def _get_to(self, s3: Any, uri: str, bucket: str, obj: S3Object, target: str,
                      reserve: Reserve | None) -> None:
        """One object into `target`: size checked (and room reserved) from its headers before
        its body is read; resumed after a cut; MD5 checked against a single-part ETag."""
        start = time.perf_counter()
        opened = await self._thread(self._open, s3, uri, bucket, obj.key, 0, "")
        size = int(opened["ContentLength"])
        if size > self.config.max_bytes:
            opened["Body"].close()
            raise LoadFailed(_too_big(uri, self.config.max_bytes, size))
        if reserve is not None:
            try:
                await reserve(size)
            except BaseException:
                opened["Body"].close()
                raise
        await self._thread(self._save, s3, uri, bucket, obj.key, opened, size, target)
        seconds = time.perf_counter() - start
        log.debug("s3 %s: %d bytes in %.2fs (%.0f MB/s)", uripolicy.show(uri), size, seconds,
                  size / 1e6 / max(seconds, 1e-6))

    def _open(self, s3: Any, uri: str, bucket: str, key: str, offset: int, etag: str,
              cancel: threading.Event) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if etag:
            args["IfMatch"] = etag
        try:
            return s3.get_object(**args)  # type: ignore[no-any-return]
        except Exception as exc:
            raise describe(exc, uri, bucket) or exc from None

    def _save(self, s3: Any, uri: str, bucket: str, key: str, opened: dict[str, Any], size: int,
              target: str, cancel: threading.Event) -> None:
        etag = str(opened.get("ETag", ""))
        single = _MD5.match(etag)  # a multipart ETag ("...-N") is no digest of the bytes
        md5 = _Hasher() if single else None
        written, cuts = 0, 0
        body = opened["Body"]
        try:
            out = open_target(target)
        except OSError as exc:
            body.close()
            raise LoadFailed(f"cannot write the download of {uripolicy.show(uri)}: {exc.strerror}") from exc
        try:
            while True:
                try:
                    for chunk in body.iter_chunks(_CHUNK):
                        if cancel.is_set():
                            raise _Cancelled
                        if written + len(chunk) > size:
                            raise LoadFailed(f"cannot read {uripolicy.show(uri)}: S3 sent more bytes than "
                                             "its Content-Length")
                        if md5 is not None:
                            md5.update(chunk)  # in its own thread, beside the next read
                        _write_all(out, chunk)
                        written += len(chunk)
                except resumable() as exc:
                    body.close()
                    cuts += 1
                    if cuts >= self.config.max_attempts:
                        raise LoadFailed(f"download of {uripolicy.show(uri)} was cut off {cuts} times "
                                         f"({type(exc).__name__}); retry later") from None
                    delay = min(0.2 * 2 ** cuts, 5.0) * random.uniform(0.5, 1.0)
                    log.info("s3 %s: the body was cut after %d bytes (%s), resuming in %.1fs",
                             uripolicy.show(uri), written, type(exc).__name__, delay)
                    if cancel.wait(delay):
                        raise _Cancelled from None
                    body = self._open(s3, uri, bucket, key, written, etag, cancel)["Body"]
                    continue
                break
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFull(written, size) from exc
            raise LoadFailed(f"cannot write the download of {uripolicy.show(uri)}: {exc.strerror}") from exc
        finally:
            body.close()
            os.close(out)
            digest = md5.hexdigest() if md5 is not None else ""
        if written != size:
            raise LoadFailed(f"download of {uripolicy.show(uri)} ended after {written} of {size} bytes; retry")
        if single and digest != single.group(1):
            raise LoadFailed(f"download of {uripolicy.show(uri)} does not match its ETag (MD5); retry")


class _Hasher:
    """MD5 of a stream, computed in a second thread while the next chunk is read and written
    (hashlib releases the GIL on large buffers): the check costs no time on a fast link."""

    def __init__(self) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="s3-md5")
        self._last: concurrent.futures.Future[None] | None = None

    def update(self, chunk: bytes) -> None:
        if self._last is not None:
            self._last.result()
        self._last = self._pool.submit(self._md5.update, chunk)

    def hexdigest(self) -> str:
        try:
            if self._last is not None:
                self._last.result()
            return self._md5.hexdigest()
        finally:
            self._pool.shutdown(wait=True)


def _relative(shown: str, rel: str) -> str:
    """An object's path below the prefix, refused when it could leave the folder or is odd."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts)
            or len(parts) > MAX_DEPTH or posixpath.normpath(rel) != rel):
        raise LoadFailed(f"cannot read {shown}: an object under the prefix has a key that is not a plain "
                         "relative path (empty, '.' or '..' segments)")
    return rel


def _too_big(uri: str, limit: int, size: int) -> str:
    return (f"artifact {uripolicy.show(uri)} is {size} bytes, over the limit of {limit} "
            "(MESH_RUNTIME_MAX_ARTIFACT_BYTES)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class S3Provider:
    def __init__(self, config: S3Config, credentials: Credentials | None = None,
                 prefixes: uripolicy.TenantPrefixes | None = None) -> None:
        self._client = S3Client(config, credentials, prefixes)

    def client(self, uri: str) -> S3Client:
        return self._client
