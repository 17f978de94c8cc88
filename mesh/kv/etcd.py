"""A small asyncio etcd v3 client on grpc.aio, using the etcd stubs that ship with `aetcd`.

We own the loops that matter (watch resume, lease keep-alive) instead of trusting a client
library's: `watch` yields whole responses and raises `Compacted`, so the caller re-lists and
diffs (see view.py); `Lease.keep_alive` renews every TTL/3 and reports loss.
Every call carries a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
from collections.abc import AsyncIterator, Sequence

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from mesh.errors import Conflict, Unavailable
from mesh.kv.keys import prefix_end
from mesh.settings import CommonSettings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# etcd rejects a transaction with more operations than this (--max-txn-ops, default 128).
MAX_TXN_OPS = 128
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

EQUAL = rpc_pb2.Compare.EQUAL
CREATE = rpc_pb2.Compare.CREATE
MOD = rpc_pb2.Compare.MOD
VALUE = rpc_pb2.Compare.VALUE
VERSION = rpc_pb2.Compare.VERSION


@dataclasses.dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


@dataclasses.dataclass(frozen=True)
class Event:
    key: str
    value: bytes | None  # None for a delete
    mod_revision: int


@dataclasses.dataclass(frozen=True)
class WatchBatch:
    events: tuple[Event, ...]
    revision: int  # header revision: everything up to here has been delivered


class Compacted(Exception):
    """The watch's start revision was compacted away: re-list and diff."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


def _kv(item: kv_pb2.KeyValue) -> KV:
    return KV(
        key=item.key.decode(),
        value=item.value,
        mod_revision=item.mod_revision,
        create_revision=item.create_revision,
        lease=item.lease,
    )


def compare(key: str, target: int, value: int | bytes, result: int = EQUAL) -> rpc_pb2.Compare:
    cmp = rpc_pb2.Compare(key=key.encode(), target=target, result=result)
    if target == CREATE:
        cmp.create_revision = int(value)  # type: ignore[arg-type]
    elif target == MOD:
        cmp.mod_revision = int(value)  # type: ignore[arg-type]
    elif target == VERSION:
        cmp.version = int(value)  # type: ignore[arg-type]
    else:
        cmp.value = value  # type: ignore[assignment]
    return cmp


def put_op(key: str, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key.encode(), value=value, lease=lease))


def delete_op(key: str) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key.encode()))


def _unavailable(exc: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(f"etcd unavailable: {exc.code().name}: {exc.details()}")


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM bytes for a TLS connection to etcd; cert and key only for mutual TLS."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None

    @classmethod
    def from_files(cls, ca_file: str, cert_file: str = "", key_file: str = "") -> Tls:
        if bool(cert_file) != bool(key_file):
            raise ValueError("etcd client TLS needs both MESH_ETCD_CERT_FILE and MESH_ETCD_KEY_FILE")
        read = lambda path: pathlib.Path(path).read_bytes() if path else None  # noqa: E731
        return cls(ca=read(ca_file) or b"", cert=read(cert_file), key=read(key_file))


class EtcdClient:
    """One channel to etcd; endpoints tried in order by gRPC's pick_first."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT, tls: Tls | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed (MESH_ETCD_ENDPOINTS)")
        self.endpoints = list(endpoints)
        target = self.endpoints[0] if len(self.endpoints) == 1 else "ipv4:" + ",".join(self.endpoints)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
            self._channel = grpc.aio.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)
        self._lease = rpc_pb2_grpc.LeaseStub(self._channel)
        self.timeout = timeout

    @classmethod
    def from_settings(cls, common: CommonSettings) -> EtcdClient:
        """The client a process uses: endpoints and (when a CA is configured) TLS from settings."""
        tls = None
        if common.etcd_ca_file:
            tls = Tls.from_files(common.etcd_ca_file, common.etcd_cert_file, common.etcd_key_file)
        return cls(common.endpoints(), tls=tls)

    async def close(self) -> None:
        await self._channel.close()

    async def get(self, key: str) -> KV | None:
        kvs, _ = await self._range(rpc_pb2.RangeRequest(key=key.encode()))
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under `prefix` and the revision they were read at (linearizable)."""
        raw = prefix.encode()
        return await self._range(rpc_pb2.RangeRequest(key=raw, range_end=prefix_end(raw)))

    async def _range(self, request: rpc_pb2.RangeRequest) -> tuple[list[KV], int]:
        try:
            resp = await self._kv.Range(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return [_kv(item) for item in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        try:
            resp = await self._kv.Put(
                rpc_pb2.PutRequest(key=key.encode(), value=value, lease=lease), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return resp.header.revision

    async def delete(self, key: str) -> int:
        """Deletes one key; returns how many were deleted (0 or 1)."""
        try:
            resp = await self._kv.DeleteRange(
                rpc_pb2.DeleteRangeRequest(key=key.encode()), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return resp.deleted

    async def delete_prefix(self, prefix: str) -> int:
        raw = prefix.encode()
        try:
            resp = await self._kv.DeleteRange(
                rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_end(raw)), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return resp.deleted

    async def txn(
        self,
        compares: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> tuple[bool, int]:
        """Runs a transaction; returns (succeeded, revision)."""
        request = rpc_pb2.TxnRequest(compare=compares, success=success, failure=failure)
        try:
            resp = await self._kv.Txn(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return resp.succeeded, resp.header.revision

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        """Puts `key` only if it does not exist; raises Conflict when it does."""
        ok, rev = await self.txn([compare(key, CREATE, 0)], [put_op(key, value, lease)])
        if not ok:
            raise Conflict(f"key exists: {key}")
        return rev

    async def compact(self, revision: int) -> None:
        await self._kv.Compact(rpc_pb2.CompactionRequest(revision=revision), timeout=self.timeout)

    # -- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        try:
            resp = await self._lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        return Lease(self, resp.ID, resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _unavailable(exc) from exc

    # -- watch --------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Yields every change under `prefix` from `start_revision` on, one batch per response.

        Raises Compacted when etcd no longer has `start_revision`, Unavailable when the stream
        breaks; the caller resumes from the last batch's revision + 1 or re-lists.
        """
        raw = prefix.encode()
        create = rpc_pb2.WatchCreateRequest(
            key=raw, range_end=prefix_end(raw), start_revision=start_revision, progress_notify=True
        )

        async def requests() -> AsyncIterator[rpc_pb2.WatchRequest]:
            yield rpc_pb2.WatchRequest(create_request=create)
            await asyncio.Event().wait()  # keep the request side open until cancelled

        call = self._watch.Watch(requests())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise Unavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    continue
                events = tuple(
                    Event(
                        key=ev.kv.key.decode(),
                        value=None if ev.type == kv_pb2.Event.DELETE else ev.kv.value,
                        mod_revision=ev.kv.mod_revision,
                    )
                    for ev in resp.events
                )
                yield WatchBatch(events=events, revision=resp.header.revision)
        except grpc.aio.AioRpcError as exc:
            raise _unavailable(exc) from exc
        finally:
            call.cancel()


class Lease:
    """A granted lease. `keep_alive` renews it every TTL/3 until cancelled or lost."""

    def __init__(self, client: EtcdClient, lease_id: int, ttl: int) -> None:
        self.client = client
        self.id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()

    async def keep_alive(self) -> None:
        """Runs until cancelled; sets `lost` and returns when etcd says the lease expired or
        renewals have failed for longer than the TTL (we may already be dead: stop acting)."""
        interval = max(self.ttl / 3, 0.2)
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while not self.lost.is_set():
            call = self.client._lease.LeaseKeepAlive(
                _one(rpc_pb2.LeaseKeepAliveRequest(ID=self.id)), timeout=interval
            )
            try:
                resp = await call.read()
                if resp is grpc.aio.EOF or resp.TTL <= 0:
                    log.warning("lease %x expired", self.id)
                    self.lost.set()
                    return
                last_ok = loop.time()
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                log.warning("lease %x keep-alive failed: %s", self.id, exc)
                if loop.time() - last_ok > self.ttl:
                    self.lost.set()
                    return
            finally:
                call.cancel()
            await asyncio.sleep(interval)

    async def revoke(self) -> None:
        await self.client.revoke(self.id)


async def _one(item: rpc_pb2.LeaseKeepAliveRequest) -> AsyncIterator[rpc_pb2.LeaseKeepAliveRequest]:
    yield item
