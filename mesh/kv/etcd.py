"""A small asyncio etcd v3 client on grpc.aio, using the etcd stubs that ship with `aetcd`.

We own the loops that matter (watch resume, lease keep-alive) instead of trusting a client
library's: `watch` yields whole responses and raises `Compacted`, so the caller re-lists and
diffs (see view.py); `Lease.keep_alive` (lease.py) renews every TTL/3 and reports doubt and
loss. Any number of endpoints, names or addresses; calls fail over between members and etcd's
errors become the mesh's kinds (members.py). Every call carries a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2

from mesh.errors import Conflict, LeaseNotFound, MeshError, Unavailable
from mesh.kv.keys import prefix_end
from mesh.kv.lease import Lease
from mesh.kv.members import METADATA, Fault, Member, Members, classify
from mesh.settings import CommonSettings

__all__ = ["KV", "Compacted", "EtcdClient", "Event", "Lease", "Tls", "WatchBatch", "compare", "delete_op", "put_op"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0
# A call waits this long for one member while another is left to try (members.py); a read
# is then retried there, a write fails UNAVAILABLE (indeterminate: it is never sent twice).
MEMBER_TIMEOUT = 2.0
# A watch asks for progress this often; a member silent for WATCH_PROGRESS_S + MEMBER_TIMEOUT
# (stopped, or its connection blackholed) loses the watch to the next member.
WATCH_PROGRESS_S = 2.0
# etcd rejects a transaction with more operations than this (--max-txn-ops, default 128).
MAX_TXN_OPS = 128

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
    """Calls go to one member until it fails, then to the next (members.py)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT, tls: Tls | None = None,
                 member_timeout: float = MEMBER_TIMEOUT) -> None:
        self._members = Members(endpoints, tls, min(member_timeout, timeout))
        self.endpoints = [m.endpoint for m in self._members.members]
        self.timeout = timeout

    @classmethod
    def from_settings(cls, common: CommonSettings) -> EtcdClient:
        """The client a process uses: endpoints and (when a CA is configured) TLS from settings."""
        tls = None
        if common.etcd_ca_file:
            tls = Tls.from_files(common.etcd_ca_file, common.etcd_cert_file, common.etcd_key_file)
        return cls(common.endpoints(), tls=tls)

    @property
    def member(self) -> str:
        """The endpoint calls go to now."""
        return self._members.active.endpoint

    async def close(self) -> None:
        await self._members.close()

    async def _read(self, method: str, request: object, timeout: float | None = None) -> object:
        """A call etcd may safely get twice: retried on the next member after a member fault."""
        return await self._members.call(
            lambda m, t: getattr(m.kv, method)(request, timeout=t, metadata=METADATA),
            timeout or self.timeout, retry_safe=True)

    async def _write(self, method: str, request: object) -> object:
        """A mutation: sent to a second member only when the first surely did not apply it."""
        return await self._members.call(
            lambda m, t: getattr(m.kv, method)(request, timeout=t, metadata=METADATA),
            self.timeout, retry_safe=False)

    async def get(self, key: str) -> KV | None:
        kvs, _ = await self._range(rpc_pb2.RangeRequest(key=key.encode()))
        return kvs[0] if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under `prefix` and the revision they were read at (linearizable)."""
        raw = prefix.encode()
        return await self._range(rpc_pb2.RangeRequest(key=raw, range_end=prefix_end(raw)))

    async def _range(self, request: rpc_pb2.RangeRequest) -> tuple[list[KV], int]:
        resp = await self._read("Range", request)
        return [_kv(item) for item in resp.kvs], resp.header.revision  # type: ignore[attr-defined]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._write("Put", rpc_pb2.PutRequest(key=key.encode(), value=value, lease=lease))
        return resp.header.revision  # type: ignore[attr-defined]

    async def delete(self, key: str) -> int:
        """Deletes one key; returns how many were deleted (0 or 1)."""
        resp = await self._write("DeleteRange", rpc_pb2.DeleteRangeRequest(key=key.encode()))
        return resp.deleted  # type: ignore[attr-defined]

    async def delete_prefix(self, prefix: str) -> int:
        raw = prefix.encode()
        resp = await self._write("DeleteRange", rpc_pb2.DeleteRangeRequest(key=raw, range_end=prefix_end(raw)))
        return resp.deleted  # type: ignore[attr-defined]

    async def txn(
        self,
        compares: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> tuple[bool, int]:
        """Runs a transaction; returns (succeeded, revision)."""
        resp = await self._write("Txn", rpc_pb2.TxnRequest(compare=compares, success=success, failure=failure))
        return resp.succeeded, resp.header.revision  # type: ignore[attr-defined]

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        """Puts `key` only if it does not exist; raises Conflict when it does."""
        ok, rev = await self.txn([compare(key, CREATE, 0)], [put_op(key, value, lease)])
        if not ok:
            raise Conflict(f"key exists: {key}")
        return rev

    async def compact(self, revision: int) -> None:
        await self._read("Compact", rpc_pb2.CompactionRequest(revision=revision))

    # -- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        # Retried like a read: a lease granted twice expires by itself.
        sent = time.monotonic()
        resp = await self._members.call(
            lambda m, t: m.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=t, metadata=METADATA),
            self.timeout, retry_safe=True)
        return Lease(self, resp.ID, resp.TTL, sent_at=sent)

    async def revoke(self, lease_id: int, timeout: float | None = None) -> None:
        """Revokes a lease; one etcd no longer has counts as revoked."""
        try:
            await self._members.call(
                lambda m, t: m.lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease_id), timeout=t,
                                                 metadata=METADATA),
                timeout or self.timeout, retry_safe=True)
        except LeaseNotFound:
            pass

    async def renew(self, lease_id: int, timeout: float | None = None) -> int:
        """One keep-alive round trip; returns the lease's fresh TTL (<= 0: etcd no longer has it)."""

        async def attempt(member: Member, attempt_timeout: float) -> int:
            call = member.lease.LeaseKeepAlive(_one(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id)),
                                               timeout=attempt_timeout, metadata=METADATA)
            try:
                resp = await call.read()
            finally:
                call.cancel()
            if resp is grpc.aio.EOF:
                raise Unavailable(f"etcd member {member.endpoint} ended a lease keep-alive without an answer")
            return int(resp.TTL)

        return await self._members.call(attempt, timeout or self.timeout, retry_safe=True)

    # -- watch --------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Yields every change under `prefix` from `start_revision` on, one batch per response.

        Raises Compacted when etcd no longer has `start_revision`, Unavailable when the stream
        breaks or its member goes silent (the member is then passed over); the caller resumes
        from the last batch's revision + 1, or re-lists, on the next member.
        """
        raw = prefix.encode()
        create = rpc_pb2.WatchCreateRequest(
            key=raw, range_end=prefix_end(raw), start_revision=start_revision, progress_notify=True
        )

        async def requests() -> AsyncIterator[rpc_pb2.WatchRequest]:
            yield rpc_pb2.WatchRequest(create_request=create)
            while True:  # keeps the request side open until cancelled, and proves the member alive
                await asyncio.sleep(WATCH_PROGRESS_S)
                yield rpc_pb2.WatchRequest(progress_request=rpc_pb2.WatchProgressRequest())

        member = self._members.pick()
        assert member is not None
        silence = WATCH_PROGRESS_S + self._members.member_timeout
        call = member.watch.Watch(requests(), metadata=METADATA)
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        resp = await call.read()
                except TimeoutError:
                    fault = Fault(Unavailable(f"etcd member {member.endpoint} sent nothing on a watch "
                                              f"for {silence:.0f}s"), True, True)
                    self._members.failed(member, fault)
                    raise fault.error from None
                if resp is grpc.aio.EOF:
                    raise Unavailable(f"etcd member {member.endpoint} ended the watch stream")
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise _cancelled(member, resp.cancel_reason)
                # An answer to our progress request (watch id -1) only proves the member alive:
                # etcd before 3.5.8 sends it ahead of events still queued, so its revision must
                # not move the resume point. etcd's own progress notifications do (when synced).
                if resp.watch_id == -1 or (resp.created and not resp.events):
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
            fault = classify(exc, member.endpoint)
            if fault.member_fault:
                self._members.failed(member, fault)
            raise fault.error from exc
        finally:
            call.cancel()


def _cancelled(member: Member, reason: str) -> MeshError:
    if "permission denied" in reason.lower():
        return Unavailable(f"etcd denied meshserve's watch ({reason}); check this process's etcd user and role")
    return Unavailable(f"etcd member {member.endpoint} cancelled the watch: {reason}")


async def _one(item: rpc_pb2.LeaseKeepAliveRequest) -> AsyncIterator[rpc_pb2.LeaseKeepAliveRequest]:
    yield item
