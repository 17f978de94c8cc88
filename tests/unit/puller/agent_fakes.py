"""Fakes for the pod agent's unit tests: an in-memory etcd (KV, leases, watch) whose writes can
be made to fail, an artifact cache that counts pins, an executor whose loads can be held or
made to fail. Each step a test wants to interrupt is a gate (an asyncio.Event) it opens."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import pathlib
from collections.abc import AsyncIterator, Sequence

import numpy as np

from mesh.errors import LeaseNotFound, LoadFailed, Unavailable
from mesh.kv.etcd import KV, Event, WatchBatch
from puller.cache import Artifact
from puller.datatypes import TensorSpec
from puller.executor import LoadedModel


class FakeLease:
    def __init__(self, etcd: FakeEtcd, lease_id: int, ttl: int) -> None:
        self.etcd, self.id, self.ttl = etcd, lease_id, ttl
        self.lost = asyncio.Event()

    async def keep_alive(self) -> None:
        await self.lost.wait()

    async def revoke(self) -> None:
        await self.etcd.revoke(self.id)

    def expired(self) -> None:
        self.lost.set()


class FakeEtcd:
    """The EtcdClient calls the agent makes. `down` fails every call (and breaks watches);
    `fail_writes` fails puts, deletes and transactions only; `fail_keys` fails writes that
    touch a key containing one of its strings."""

    def __init__(self) -> None:
        self.data: dict[str, KV] = {}
        self.revision = 1
        self.down = False
        self.fail_writes = False
        self.fail_keys: set[str] = set()
        self.leases: dict[int, FakeLease] = {}
        self.revoked: list[int] = []
        self.failed_writes = 0
        self._next_lease = 100
        self._watches: list[tuple[str, asyncio.Queue[WatchBatch | Exception]]] = []

    # -- failure injection --------------------------------------------------------------------

    def _check(self, write: bool = False, keys: Sequence[str] = ()) -> None:
        if self.down or (write and (self.fail_writes or any(f in k for f in self.fail_keys for k in keys))):
            if write:
                self.failed_writes += 1
            raise Unavailable("etcd unavailable: fake outage")

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            for _, q in self._watches:
                q.put_nowait(Unavailable("etcd unavailable: stream broken"))

    def expire(self, lease_id: int, tell: bool = True) -> None:
        """The lease ran out in etcd: its keys go; its holder learns it is lost at once, or
        (tell=False) only when a write naming it is refused."""
        lease = self.leases.pop(lease_id)
        self._drop_lease(lease_id)
        if tell:
            lease.lost.set()

    # -- KV -----------------------------------------------------------------------------------

    def value(self, key: str) -> bytes | None:
        kv = self.data.get(key)
        return kv.value if kv else None

    async def get(self, key: str) -> KV | None:
        self._check()
        return self.data.get(key)

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        self._check()
        return [kv for k, kv in sorted(self.data.items()) if k.startswith(prefix)], self.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check(write=True, keys=[key])
        return self._put(key, value, lease)

    async def delete(self, key: str) -> int:
        self._check(write=True, keys=[key])
        return self._delete(key)

    async def txn(self, compares: Sequence[object], success: Sequence[object], failure: Sequence[object] = ()) -> tuple[bool, int]:
        assert not compares
        keys = [self._op_key(op) for op in success]
        self._check(write=True, keys=keys)
        for op in success:
            if op.HasField("request_put"):  # type: ignore[attr-defined]
                put = op.request_put  # type: ignore[attr-defined]
                self._put(put.key.decode(), put.value, put.lease)
            else:
                self._delete(op.request_delete_range.key.decode())  # type: ignore[attr-defined]
        return True, self.revision

    @staticmethod
    def _op_key(op: object) -> str:
        if op.HasField("request_put"):  # type: ignore[attr-defined]
            return op.request_put.key.decode()  # type: ignore[attr-defined]
        return op.request_delete_range.key.decode()  # type: ignore[attr-defined]

    def _put(self, key: str, value: bytes, lease: int = 0) -> int:
        if lease and lease not in self.leases:
            raise LeaseNotFound("etcd: requested lease not found")
        self.revision += 1
        old = self.data.get(key)
        self.data[key] = KV(key, value, self.revision, old.create_revision if old else self.revision, lease)
        self._notify(Event(key, value, self.revision))
        return self.revision

    def _delete(self, key: str) -> int:
        if key not in self.data:
            return 0
        self.revision += 1
        del self.data[key]
        self._notify(Event(key, None, self.revision))
        return 1

    def _notify(self, ev: Event) -> None:
        for prefix, q in self._watches:
            if ev.key.startswith(prefix):
                q.put_nowait(WatchBatch((ev,), self.revision))

    # -- leases -------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> FakeLease:
        self._check()
        self._next_lease += 1
        lease = self.leases[self._next_lease] = FakeLease(self, self._next_lease, ttl)
        return lease

    async def revoke(self, lease_id: int) -> None:
        self._check()
        self.revoked.append(lease_id)
        if self.leases.pop(lease_id, None) is not None:
            self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        for key in [k for k, kv in self.data.items() if kv.lease == lease_id]:
            self._delete(key)

    # -- watch --------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchBatch]:
        self._check()
        q: asyncio.Queue[WatchBatch | Exception] = asyncio.Queue()
        entry = (prefix, q)
        self._watches.append(entry)
        try:
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._watches.remove(entry)

    async def close(self) -> None:
        pass


class FakeCache:
    """acquire/release with pin counts; `gate` holds a pull, `fail` fails it."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self.pins: collections.Counter[str] = collections.Counter()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.pulls = 0
        self.discarded: list[str] = []

    async def acquire(self, uri: str, sha256: str = "", tenant: str = "", credentials_ref: str = "") -> Artifact:
        key = uri.rsplit("/", 1)[-1]
        self.pins[key] += 1
        try:
            self.pulls += 1
            await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            return Artifact(key, self.folder / key, 1000 + len(key))
        except BaseException:
            self.release(key)
            raise

    def discard(self, key: str) -> None:
        """A load of `key` failed (the real cache deletes the artifact)."""
        assert self.pins[key] > 0, f"{key} discarded without a pin"
        self.discarded.append(key)

    def release(self, key: str) -> None:
        self.pins[key] -= 1
        assert self.pins[key] >= 0, f"pin of {key} released twice"
        if not self.pins[key]:
            del self.pins[key]


@dataclasses.dataclass
class FakeExecutor:
    """load() builds a LoadedModel of `size` bytes; `gate` holds a load, `fail` fails it."""

    size: int = 10_000
    threads: int = 1
    fail: Exception | None = None
    gate: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    loads: list[str] = dataclasses.field(default_factory=list)
    batches: list[int] = dataclasses.field(default_factory=list)
    finished: list[str] = dataclasses.field(default_factory=list)
    digests: list[str] = dataclasses.field(default_factory=list)
    on_resize: object = None

    def __post_init__(self) -> None:
        self.gate.set()

    async def load(self, model_id: str, path: str, batch: int = 0, sha256: str = "") -> LoadedModel:
        self.loads.append(model_id)
        self.batches.append(batch)
        self.digests.append(sha256)  # the sandbox's verdict key (puller/sandbox.py)
        await self.gate.wait()
        self.finished.append(model_id)
        if self.fail is not None:
            raise self.fail
        spec = TensorSpec("input", "FP32", (-1, 4))
        return LoadedModel(model_id, None, {"input": spec}, {"output": spec}, self.size, 7,  # type: ignore[arg-type]
                           measure_method="fake")

    async def run(self, model: LoadedModel, feeds: dict[str, np.ndarray], outputs: list[str], execution: object = None) -> list[np.ndarray]:
        return [feeds["input"]]


def load_failed(message: str) -> LoadFailed:
    return LoadFailed(message)
