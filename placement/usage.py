"""Per-model recency and in-flight work, asked of each runtime pod (mesh.v1.Runtime/GetUsage).

Only needed when placement must choose eviction victims. A pod that does not answer within a
short timeout is not waited for: the controller falls back to what etcd knows (the copy's
last update time, nothing in flight).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

import grpc

from mesh.pb.v1 import internal_pb2, internal_pb2_grpc
from mesh.rpc.server import ChannelPool

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    last_used_ms: int
    in_flight: int


class UsageSource(Protocol):
    async def get(self, address: str) -> dict[str, Usage] | None:
        """model id -> usage on the pod at `address`; None when the pod did not answer."""
        ...

    async def forget(self, addresses: set[str]) -> None:
        """Drops whatever is kept for pods not in `addresses` (they are gone)."""
        ...


class GrpcUsage:
    """Asks pods over one long-lived channel per pod address."""

    def __init__(self, timeout: float = 1.0, max_message_bytes: int = 4 * 1024 * 1024) -> None:
        self.timeout = timeout
        self._pool = ChannelPool(max_message_bytes)

    async def get(self, address: str) -> dict[str, Usage] | None:
        stub = internal_pb2_grpc.RuntimeStub(self._pool.get(address))
        try:
            resp = await stub.GetUsage(internal_pb2.GetUsageRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            log.info("GetUsage from %s failed (%s); using recency from etcd", address, exc.code().name)
            return None
        return {m.model_id: Usage(m.last_used_unix_ms, m.in_flight) for m in resp.models}

    async def forget(self, addresses: set[str]) -> None:
        """Closes channels to pods not in `addresses` (they are gone)."""
        for address in set(self._pool.addresses()) - addresses:
            await self._pool.discard(address)

    async def close(self) -> None:
        await self._pool.close()
