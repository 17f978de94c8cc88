"""The store protocol: the part of the etcd client that the View, the leader's fenced writes and
placement's decider use, so tests can run them over an in-memory store (mesh/kv/memory.py)
that models revisions, compaction and watch lag, and production over etcd (mesh/kv/etcd.py).

Records (KV, Event, WatchBatch) and Compacted are etcd.py's, shared by both implementations.
`prefix_compare` builds the range compares etcd 3.3+ supports (every key under a prefix must
satisfy it; an empty range compares as one absent key, whose revisions are 0).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from aetcd.rpc import rpc_pb2

from mesh.kv.etcd import KV, MOD, Compacted, Event, WatchBatch, compare
from mesh.kv.keys import prefix_end

__all__ = ["KV", "Compacted", "Event", "Store", "WatchBatch", "prefix_compare", "range_compare"]

LESS = rpc_pb2.Compare.LESS


class Store(Protocol):
    async def get(self, key: str) -> KV | None: ...

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under `prefix` and the revision they were read at."""
        ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    async def delete(self, key: str) -> int: ...

    async def txn(
        self,
        compares: Sequence[rpc_pb2.Compare],
        success: Sequence[rpc_pb2.RequestOp],
        failure: Sequence[rpc_pb2.RequestOp] = (),
    ) -> tuple[bool, int]:
        """Runs a transaction; returns (succeeded, revision)."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Every change under `prefix` from `start_revision` on, one batch per revision (or
        response); raises Compacted when that revision is gone, Unavailable when broken."""
        ...


def range_compare(start: str, end: bytes, target: int, value: int, result: int) -> rpc_pb2.Compare:
    """A compare over the key range [start, end) (end exclusive, raw bytes)."""
    cmp = compare(start, target, value, result)
    cmp.range_end = end
    return cmp


def prefix_compare(prefix: str, target: int = MOD, value: int = 0, result: int = LESS) -> rpc_pb2.Compare:
    """A compare every key under `prefix` must pass, e.g. mod_revision < value."""
    return range_compare(prefix, prefix_end(prefix.encode()), target, value, result)
