"""What the pod tells etcd, kept true: the resync loop that rewrites a record until etcd has it.

The pod's own records are held here as the truth, in memory:

    copies/<m>/<id>    the copy record of every model this pod has (absent: no key), leased
    stats/<m>          a stats record (or a patch to merge into the stored one) not yet written
    instances/<id>     built when written (`instance_fn`), so it is always the current one, leased

Changing the truth only marks the record dirty; one loop (`run`) writes dirty records, each
one at most once at a time and always with the truth as it is when the write starts, so a
late write can never bring back a record a later change removed. Everything dirty goes in one
transaction (chunked under etcd's operation limit): a model's copy record with its pending
stats (whoever sees a copy LOADED sees its size), and a miss's victim leaving, the new copy
and the instance record as one revision, one watch event batch per watcher. A fresh LOADING
record waits `loading_hold_s` first: a quicker load is written as LOADED only. A failed
write leaves the record dirty and is retried with backoff until etcd takes it; without a
lease nothing leased is written until `mark_all` after a new grant (a write etcd refuses for
"lease not found" tells the owner its lease is gone). An outage is logged
once when writes start failing and once when they succeed again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.errors import LeaseNotFound
from mesh.kv.etcd import MAX_TXN_OPS, EtcdClient, delete_op, put_op
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.types import CopyRecord, InstanceRecord, ModelStats

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
_INSTANCE = ""  # the dirty-set entry of the instance record (no model id is empty)
TXN_OPS = MAX_TXN_OPS - 8  # operations per transaction, under etcd's limit


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "message", "") or exc) or type(exc).__name__


class Publisher:
    def __init__(
        self,
        client: EtcdClient,
        keys: Keys,
        instance_id: str,
        metrics: Metrics,
        instance_fn: Callable[[], InstanceRecord],
        lease_id: Callable[[], int | None],
        lease_gone: Callable[[int], None] = lambda lease_id: None,
        loading_hold_s: float = 0.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.instance_id = instance_id
        self.metrics = metrics
        self.instance_fn = instance_fn
        self.lease_id = lease_id
        self.lease_gone = lease_gone  # etcd refused a write naming the lease: re-grant
        self.loading_hold_s = loading_hold_s
        self._held: dict[str, asyncio.TimerHandle] = {}  # fresh LOADING records not written yet
        self.copies: dict[str, CopyRecord] = {}
        self._stats: dict[str, ModelStats] = {}  # whole records to put
        self._patches: dict[str, dict[str, Any]] = {}  # fields to merge into the stored record
        self._dirty: set[str] = set()
        self._kick = asyncio.Event()
        self._synced = asyncio.Event()
        self._synced.set()
        self._failing_since: float | None = None
        self.rewrites = 0  # writes that succeeded after an earlier one of theirs failed
        self._retrying: set[str] = set()

    # -- the truth ----------------------------------------------------------------------------

    def set_copy(
        self,
        model_id: str,
        record: CopyRecord | None,
        stats: ModelStats | None = None,
        stats_patch: dict[str, Any] | None = None,
    ) -> None:
        """The model's copy record is now `record` (None: there is none); `stats` replaces its
        stats record, `stats_patch` changes some fields of it (with the copy, in one txn)."""
        previous = self.copies.get(model_id)
        if record is None:
            self.copies.pop(model_id, None)
        else:
            self.copies[model_id] = record
        if stats is not None:
            self._stats[model_id] = stats
            self._patches.pop(model_id, None)
        if stats_patch:
            if model_id in self._stats:
                self._stats[model_id] = dataclasses.replace(self._stats[model_id], **stats_patch)
            else:
                self._patches[model_id] = {**self._patches.get(model_id, {}), **stats_patch}
        held = self._held.pop(model_id, None)
        if held is not None:
            held.cancel()
            if record is None and stats is None and not stats_patch:
                return  # a load that never showed ended: etcd never had its record
        elif (record is not None and previous is None and record.state is types.CopyState.LOADING
              and stats is None and not stats_patch and self.loading_hold_s > 0):
            # A fresh LOADING record is written only if the load outlasts the hold: a load of
            # a disk-cached model mostly ends first and goes from no record to LOADED in one
            # write instead of two, each a watch event for every router and placement replica
            # on the cores the session creation runs on (the miss path, docs/BENCHMARKS.md).
            self._held[model_id] = asyncio.get_running_loop().call_later(
                self.loading_hold_s, self._release, model_id)
            return
        self._mark(model_id)

    def _release(self, model_id: str) -> None:
        if self._held.pop(model_id, None) is not None:
            self._mark(model_id)

    def instance_changed(self) -> None:
        self._mark(_INSTANCE)

    def mark_all(self) -> None:
        """Everything again (a new lease: every leased record must be re-put under it)."""
        for model_id in self.copies:
            self._dirty.add(model_id)
        self._mark(_INSTANCE)

    def forget(self, model_id: str) -> None:
        """Drops what is pending for a model without writing it (shutdown)."""
        self.copies.pop(model_id, None)
        self._stats.pop(model_id, None)
        self._patches.pop(model_id, None)
        self._dirty.discard(model_id)
        held = self._held.pop(model_id, None)
        if held is not None:
            held.cancel()

    def _mark(self, entry: str) -> None:
        self._dirty.add(entry)
        self._synced.clear()
        self.metrics.unsynced_records.set(len(self._dirty))
        self._kick.set()

    @property
    def dirty(self) -> set[str]:
        """Records etcd may not agree with yet ("" is the instance record)."""
        return set(self._dirty)

    async def wait_synced(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._synced.wait()
        except TimeoutError:
            pass
        return self._synced.is_set()

    # -- writing ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The resync loop: runs until cancelled."""
        backoff = MIN_BACKOFF_S
        while True:
            await self._kick.wait()
            self._kick.clear()
            if await self.flush():
                backoff = MIN_BACKOFF_S
                continue
            if self.lease_id() is None:
                continue  # no lease: the grant's mark_all kicks us again
            # Retry with backoff; a fresh change (kick) does not cut the wait short, as etcd
            # is failing anyway.
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            self._kick.set()

    async def flush(self) -> bool:
        """Writes every dirty record once, in as few transactions as etcd allows (one, but for
        a pod re-putting hundreds of records under a new lease): one revision, one watch
        event batch for every router and placement replica, instead of one per record. True
        when etcd took them all. A record changed while the flush ran is dirty again, but
        that is no failure: `run` writes it at once (its kick is set), never after a backoff."""
        lease = self.lease_id()
        if lease is None:
            return not self._dirty
        entries, self._dirty = self._dirty, set()
        chunks: list[list[tuple[str, list[rpc_pb2.RequestOp], Callable[[], None]]]] = [[]]
        size = 0
        try:
            for entry in sorted(entries):
                ops, written = await self._ops(entry, lease)
                if size + len(ops) > TXN_OPS and chunks[-1]:
                    chunks.append([])
                    size = 0
                chunks[-1].append((entry, ops, written))
                size += len(ops)
        except asyncio.CancelledError:
            self._dirty |= entries
            raise
        except Exception as exc:  # noqa: BLE001 - a stats read failed: retried like a write
            self._dirty |= entries
            return self._failed([exc], lease)
        results = await asyncio.gather(
            *(self.client.txn([], [op for _, ops, _ in chunk for op in ops]) for chunk in chunks if chunk),
            return_exceptions=True)
        failed: list[BaseException] = []
        for chunk, result in zip((c for c in chunks if c), results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                self._dirty |= entries
                raise result
            for entry, _, written in chunk:
                if isinstance(result, BaseException):
                    self._dirty.add(entry)
                    self._retrying.add(entry)
                    continue
                written()
                if entry in self._retrying:
                    self._retrying.discard(entry)
                    self.rewrites += 1
            if isinstance(result, BaseException):
                failed.append(result)
        self.metrics.unsynced_records.set(len(self._dirty))
        if failed:
            return self._failed(failed, lease)
        if self._failing_since is not None:
            log.info(
                "etcd writes of this pod's records succeed again after %.1fs; every record rewritten",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        if not self._dirty:
            self._synced.set()
        return True

    def _failed(self, failed: list[BaseException], lease: int) -> bool:
        self.metrics.record_write_failures.inc(len(failed))
        if any(isinstance(exc, LeaseNotFound) for exc in failed):
            self.lease_gone(lease)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "etcd writes of this pod's records failing (%s); rewriting them until etcd takes them",
                _reason(failed[0]),
            )
        return False

    async def _ops(self, entry: str, lease: int) -> tuple[list[rpc_pb2.RequestOp], Callable[[], None]]:
        """The operations writing `entry`'s record as the truth has it now, and what to call
        once etcd took them (drops the stats that were pending unless they changed since)."""
        if entry == _INSTANCE:
            record = self.instance_fn()
            return [put_op(self.keys.instance(self.instance_id), types.encode(record), lease)], lambda: None
        model_id = entry
        key = self.keys.copy(model_id, self.instance_id)
        copy = self.copies.get(model_id)
        full, patch = self._stats.get(model_id), self._patches.get(model_id)
        stats = full
        if stats is None and patch is not None:
            stats = await self._merged(model_id, patch)
        ops: list[rpc_pb2.RequestOp] = []
        if stats is not None:
            ops.append(put_op(self.keys.stats(model_id), types.encode(stats)))
        ops.append(delete_op(key) if copy is None else put_op(key, types.encode(copy), lease))

        def written() -> None:
            if full is not None and self._stats.get(model_id) is full:
                del self._stats[model_id]
            if patch is not None and self._patches.get(model_id) is patch:
                del self._patches[model_id]

        return ops, written

    async def _merged(self, model_id: str, patch: dict[str, Any]) -> ModelStats:
        """The stored stats record with `patch` applied (keeps what earlier loads measured)."""
        current = await self.client.get(self.keys.stats(model_id))
        stats = ModelStats(model_id=model_id)
        if current is not None:
            try:
                stats = types.decode(ModelStats, current.value)
            except ValueError:
                pass
        return dataclasses.replace(stats, **patch)
