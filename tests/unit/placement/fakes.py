"""In-memory stand-ins for the View (what MeshState reads) and the Leader (fenced writes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.kv.etcd import MAX_TXN_OPS, Event
from mesh.kv.keys import Keys
from mesh.state import MeshState
from placement.usage import Usage


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


class FakeLeader:
    def __init__(self, view: FakeView) -> None:
        self.view = view
        self.is_leader = True
        self.writes: list[list[tuple[str, bytes | None]]] = []

    async def write(self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[object] = ()) -> bool:
        assert len(ops) <= MAX_TXN_OPS, f"{len(ops)} ops in one txn: etcd would reject it"
        if not self.is_leader:
            return False
        changes: list[tuple[str, bytes | None]] = []
        for op in ops:
            if op.HasField("request_put"):
                changes.append((op.request_put.key.decode(), op.request_put.value))
            else:
                changes.append((op.request_delete_range.key.decode(), None))
        self.writes.append(changes)
        self.view.apply(changes)
        return True


class FakeUsage:
    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Usage]] = {}
        self.calls = 0

    async def get(self, address: str) -> dict[str, Usage] | None:
        self.calls += 1
        return self.answers.get(address)

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
