"""placement's client of the runtime pods (mesh.v1.Runtime): per-model recency and in-flight
work (GetUsage), and the direct Load of an assignment placement has just written.

GetUsage is only needed when placement must choose eviction victims. A pod that does not
answer within a short timeout is not waited for: the controller falls back to what etcd knows
(the copy's last update time, nothing in flight). Load answers with the copy once it serves
(or failed) and with the pod's usage at that moment; a pod that does not answer it (an older
pod, a restart) leaves the controller waiting for the copy's etcd record, as without Load.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import grpc

from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, types_pb2
from mesh.rpc.server import ChannelPool
from mesh.rpc.tls import ClientTLS
from mesh.types import CopyRecord, CopyState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    last_used_ms: int
    in_flight: int


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A pod's answer to Load: the copy (LOADED, or FAILED with its reason) and its usage."""

    copy: CopyRecord
    usage: dict[str, Usage]


class UsageSource(Protocol):
    async def get(self, address: str) -> dict[str, Usage] | None:
        """model id -> usage on the pod at `address`; None when the pod did not answer."""
        ...

    async def load(self, address: str, model_id: str, assignment: bytes, unassigned: Sequence[str],
                   timeout: float) -> Loaded | None:  # noqa: ASYNC109 - the RPC's own deadline
        """Runtime/Load on the pod at `address`: `assignment` is the record of `model_id` as written, and
        `unassigned` the victims the same transaction deleted there. None when the pod did
        not answer with a copy (unreachable, too old to know Load, the load cancelled, the
        timeout passed): the caller then waits for etcd."""
        ...

    async def forget(self, addresses: set[str]) -> None:
        """Drops whatever is kept for pods not in `addresses` (they are gone)."""
        ...


class GrpcUsage:
    """Asks pods over one long-lived channel per pod address."""

    def __init__(self, timeout: float = 1.0, max_message_bytes: int = 4 * 1024 * 1024,
                 tls: ClientTLS | None = None) -> None:
        self.timeout = timeout
        self._pool = ChannelPool(max_message_bytes, tls)  # tls: internal mTLS to the pods

    async def get(self, address: str) -> dict[str, Usage] | None:
        stub = internal_pb2_grpc.RuntimeStub(self._pool.get(address))
        try:
            resp = await stub.GetUsage(internal_pb2.GetUsageRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("GetUsage from %s failed (%s); using recency from etcd", address, exc.code().name)
            return None
        return _usage(resp.models)

    async def load(self, address: str, model_id: str, assignment: bytes, unassigned: Sequence[str],
                   timeout: float) -> Loaded | None:  # noqa: ASYNC109 - the RPC's own deadline
        stub = internal_pb2_grpc.RuntimeStub(self._pool.get(address))
        request = internal_pb2.LoadRequest(assignment=assignment, unassigned=list(unassigned))
        try:
            resp = await stub.Load(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("direct Load on %s answered %s (%s); waiting for the pod's etcd record",
                     address, exc.code().name, exc.details())
            return None
        c = resp.copy
        state = CopyState[types_pb2.CopyState.Name(c.state)] if c.state else None
        if state not in (CopyState.LOADED, CopyState.FAILED) or not c.instance_id:
            return None
        copy = CopyRecord(model_id, c.instance_id, c.address, state, c.size_bytes,
                          error=c.error, measure_method=c.measure_method)
        return Loaded(copy, _usage(resp.models))

    async def forget(self, addresses: set[str]) -> None:
        """Closes channels to pods not in `addresses` (they are gone)."""
        for address in set(self._pool.addresses()) - addresses:
            await self._pool.discard(address)

    async def close(self) -> None:
        await self._pool.close()


def _usage(models: Sequence[internal_pb2.ModelUsage]) -> dict[str, Usage]:
    return {m.model_id: Usage(m.last_used_unix_ms, m.in_flight) for m in models}
