"""In-memory stand-ins for the View (what MeshState reads) and the Leader (fenced writes).

Two worlds:
- `World`: a synchronous FakeView (a write is visible at once) and FakeLeader, which checks
  the decider's range fences against the FakeView's data, like etcd would;
- `StoreWorld`: the REAL View and MeshState over a MemoryStore (mesh/kv/memory.py) with a
  configurable watch lag, and a StoreLeader whose writes are the store's transactions, so
  fences are evaluated by the store. The decider's tests use this one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.kv.etcd import MAX_TXN_OPS, Event
from mesh.kv.keys import Keys
from mesh.kv.memory import Lag, MemoryStore
from mesh.kv.view import View
from mesh.state import MeshState
from placement.usage import Loaded, Usage


class FakeView:
    """The part of mesh.kv.view.View that MeshState and the controller use."""

    def __init__(self) -> None:
        self.revision = 0
        self._data: dict[str, tuple[int, bytes]] = {}
        self._listeners: list[Callable[[list[Event]], None]] = []
        self._changed = asyncio.Condition()

    def subscribe(self, listener: Callable[[list[Event]], None]) -> None:
        self._listeners.append(listener)

    def revisions(self) -> dict[str, int]:
        return {k: rev for k, (rev, _) in self._data.items()}

    async def wait_synced(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - View's signature
        return None

    async def wait_for(self, predicate: Callable[[], object], timeout: float | None) -> object:  # noqa: ASYNC109
        async with self._changed:
            return await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def apply(self, changes: Sequence[tuple[str, bytes | None]]) -> None:
        """Applies puts (bytes) and deletes (None) as one batch, synchronously."""
        self.revision += 1
        events = []
        for key, value in changes:
            if value is None:
                if self._data.pop(key, None) is not None:
                    events.append(Event(key, None, self.revision))
            else:
                self._data[key] = (self.revision, value)
                events.append(Event(key, value, self.revision))
        for listener in self._listeners:
            listener(events)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def op_changes(ops: Sequence[rpc_pb2.RequestOp]) -> list[tuple[str, bytes | None]]:
    """A transaction's operations as (key, value or None for a delete)."""
    return [(op.request_put.key.decode(), op.request_put.value) if op.HasField("request_put")
            else (op.request_delete_range.key.decode(), None) for op in ops]


class FakeLeader:
    def __init__(self, view: FakeView) -> None:
        self.view = view
        self.is_leader = True
        self.writes: list[list[tuple[str, bytes | None]]] = []
        self.rejected = 0

    def _holds(self, cmp: rpc_pb2.Compare) -> bool:
        """The decider's fences: every key in [key, range_end) has mod_revision < the value."""
        assert cmp.target == rpc_pb2.Compare.MOD and cmp.result == rpc_pb2.Compare.LESS and cmp.range_end
        start, end = cmp.key.decode(), cmp.range_end
        revs = [rev for key, rev in self.view.revisions().items() if key >= start and key.encode() < end]
        return all(rev < cmp.mod_revision for rev in revs)

    async def write(self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[rpc_pb2.Compare] = ()) -> bool:
        assert len(ops) <= MAX_TXN_OPS, f"{len(ops)} ops in one txn: etcd would reject it"
        if not self.is_leader:
            return False
        if not all(self._holds(c) for c in extra_compares):
            self.rejected += 1
            return False
        changes = op_changes(ops)
        self.writes.append(changes)
        self.view.apply(changes)
        return True


class FakeUsage:
    """The pods' Runtime service. `load` answers None (a pod that gives no copy: placement
    waits for etcd) unless `on_load` is set: then its result (it may await, and play the pod)."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Usage]] = {}
        self.calls = 0
        self.loads: list[tuple[str, str, bytes, tuple[str, ...]]] = []  # address, model, record, victims
        self.on_load: Callable[[str, str, bytes, tuple[str, ...]], Awaitable[Loaded | None]] | None = None

    async def get(self, address: str) -> dict[str, Usage] | None:
        self.calls += 1
        return self.answers.get(address)

    async def load(self, address: str, model_id: str, assignment: bytes, unassigned: Sequence[str],
                   timeout: float) -> Loaded | None:  # noqa: ASYNC109 - the protocol's signature
        call = (address, model_id, assignment, tuple(unassigned))
        self.loads.append(call)
        return None if self.on_load is None else await self.on_load(*call)

    async def forget(self, addresses: set[str]) -> None:
        self.answers = {a: u for a, u in self.answers.items() if a in addresses}


class World:
    """A MeshState over a FakeView, with helpers to write records like the other processes."""

    def __init__(self) -> None:
        self.keys = Keys("/t")
        self.view = FakeView()
        self.state = MeshState(self.view, self.keys)  # type: ignore[arg-type]
        self.leader = FakeLeader(self.view)

    def put(self, key: str, record: object) -> None:
        self.view.apply([(key, types.encode(record))])

    def model(self, model_id: str, size: int = 0) -> None:
        self.put(self.keys.model(model_id), types.ModelSpec(model_id, f"file:///m/{model_id}.onnx"))
        if size:
            self.put(self.keys.stats(model_id), types.ModelStats(model_id, size_bytes=size))

    def pod(self, instance_id: str, capacity: int) -> None:
        self.put(self.keys.instance(instance_id), types.InstanceRecord(instance_id, f"addr-{instance_id}", capacity))

    def kill(self, instance_id: str) -> None:
        self.view.apply([(self.keys.instance(instance_id), None)])

    def loaded(self, model_id: str, instance_id: str, size: int, at_ms: int = 0,
               state: types.CopyState = types.CopyState.LOADED, error: str = "") -> None:
        """Plays the pod: an assignment (if missing) and a copy report."""
        akey = self.keys.assignment(instance_id, model_id)
        if model_id not in self.state.assignments.get(instance_id, {}):
            self.put(akey, types.Assignment(model_id, instance_id, "file:///x", assigned_unix_ms=at_ms))
        copy = types.CopyRecord(model_id, instance_id, f"addr-{instance_id}", state, size, error=error,
                                updated_unix_ms=at_ms)
        self.put(self.keys.copy(model_id, instance_id), copy)


class StoreLeader:
    """Leader.write over a Store: leadership is a flag, the extra compares are the store's."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.is_leader = True
        self.writes = 0
        self.rejected = 0

    async def write(self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[rpc_pb2.Compare] = ()) -> bool:
        assert len(ops) <= MAX_TXN_OPS, f"{len(ops)} ops in one txn: etcd would reject it"
        if not self.is_leader:
            return False
        ok, _ = await self.store.txn(list(extra_compares), list(ops))
        if ok:
            self.writes += 1
        else:
            self.rejected += 1
        return ok


class StoreWorld:
    """The real View and MeshState over a MemoryStore whose watch lags by `lag`."""

    def __init__(self, lag: Lag = 0.0) -> None:
        self.keys = Keys("/t")
        self.store = MemoryStore(lag)
        self.view = View(self.store, self.keys.prefix())  # type: ignore[arg-type]
        self.state = MeshState(self.view, self.keys)
        self.leader = StoreLeader(self.store)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.view.run())
        await self.view.wait_synced(5.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.store.close()

    async def settle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Waits until the view shows everything written so far (releasing a held store)."""
        self.store.release()
        await self.view.wait_for(lambda: self.view.revision >= self.store.revision, timeout)

    def put(self, key: str, record: object) -> None:
        self.store.put_now(key, types.encode(record))

    def model(self, model_id: str, size: int = 0, artifact: int = 0, **spec: int) -> None:
        self.put(self.keys.model(model_id), types.ModelSpec(model_id, f"file:///m/{model_id}.onnx",
                                                            artifact_bytes=artifact, **spec))
        if size:
            self.put(self.keys.stats(model_id), types.ModelStats(model_id, size_bytes=size))

    def pod(self, instance_id: str, capacity: int, **fields: object) -> None:
        self.put(self.keys.instance(instance_id),
                 types.InstanceRecord(instance_id, f"addr-{instance_id}", capacity, **fields))  # type: ignore[arg-type]

    def kill(self, instance_id: str) -> None:
        self.store.delete_now(self.keys.instance(instance_id))

    def assignments(self) -> dict[str, dict[str, types.Assignment]]:
        """What etcd (the store) holds now, whatever the view shows: instance -> model -> record."""
        out: dict[str, dict[str, types.Assignment]] = {}
        for key, value in self.store.snapshot(self.keys.prefix("assignments")).items():
            _, (instance_id, model_id) = self.keys.parse(key)
            out.setdefault(instance_id, {})[model_id] = types.decode(types.Assignment, value)
        return out

    def copies(self) -> dict[tuple[str, str], types.CopyRecord]:
        out = {}
        for key, value in self.store.snapshot(self.keys.prefix("copies")).items():
            _, (model_id, instance_id) = self.keys.parse(key)
            out[(model_id, instance_id)] = types.decode(types.CopyRecord, value)
        return out

    def report(self, model_id: str, instance_id: str, state: types.CopyState, size: int = 0,
               error: str = "", at_ms: int = 0) -> None:
        """Plays the pod: a copy report (LOADED with its measured size, FAILED with a reason)."""
        copy = types.CopyRecord(model_id, instance_id, f"addr-{instance_id}", state, size, error=error,
                                updated_unix_ms=at_ms)
        self.put(self.keys.copy(model_id, instance_id), copy)

    def booked(self) -> dict[str, int]:
        """Per pod, from the store: measured sizes of LOADED copies + predicted bytes of
        assignments still in flight (no report yet, or LOADING). The capacity invariant."""
        copies = self.copies()
        out = {}
        for instance_id, models in self.assignments().items():
            total = 0
            for model_id, assignment in models.items():
                copy = copies.get((model_id, instance_id))
                if copy is None or copy.state is types.CopyState.LOADING:
                    total += assignment.predicted_bytes
                elif copy.state is types.CopyState.LOADED:
                    total += copy.size_bytes
            out[instance_id] = total
        return out
