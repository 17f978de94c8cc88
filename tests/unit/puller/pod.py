"""A pod agent over the fakes of agent_fakes.py, with helpers to assign models and read back
what the pod wrote to the fake etcd."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable

from mesh import types
from mesh.clock import FakeClock
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.types import Assignment, CopyRecord, CopyState, InstanceRecord, ModelStats
from puller.agent import Agent, Identity
from puller.table import ModelTable

from .agent_fakes import FakeCache, FakeEtcd, FakeExecutor

POD = "pod-a"
WAIT_S = 10.0


class Pod:
    def __init__(self, tmp_path: pathlib.Path, capacity: int = 100_000, size: int = 10_000) -> None:
        self.keys = Keys("/t")
        self.etcd = FakeEtcd()
        self.cache = FakeCache(tmp_path)
        self.executor = FakeExecutor(size=size)
        self.table = ModelTable()
        self.metrics = Metrics(service="runtime")
        self.agent = Agent(
            self.etcd, self.keys, Identity(POD, "127.0.0.1:1", capacity), 5,  # type: ignore[arg-type]
            self.cache, self.executor, self.table, self.metrics, FakeClock(), unload_timeout_s=5.0,  # type: ignore[arg-type]
        )

    async def start(self) -> Pod:
        await self.agent.start()
        return self

    async def stop(self) -> None:
        await self.agent.stop()
        self.agent.release()

    # -- acting as placement ------------------------------------------------------------------

    async def assign(self, model: str, uri: str = "", **fields: object) -> Assignment:
        record = Assignment(model_id=model, instance_id=POD, storage_uri=uri or f"file:///m/{model}.onnx",
                            assigned_unix_ms=1, **fields)  # type: ignore[arg-type]
        self.etcd._put(self.keys.assignment(POD, model), types.encode(record))
        return record

    async def unassign(self, model: str) -> None:
        self.etcd._delete(self.keys.assignment(POD, model))

    # -- reading etcd -------------------------------------------------------------------------

    def copy(self, model: str) -> CopyRecord | None:
        value = self.etcd.value(self.keys.copy(model, POD))
        return types.decode(CopyRecord, value) if value else None

    def state(self, model: str) -> CopyState | None:
        rec = self.copy(model)
        return rec.state if rec else None

    def stats(self, model: str) -> ModelStats | None:
        value = self.etcd.value(self.keys.stats(model))
        return types.decode(ModelStats, value) if value else None

    def instance(self) -> InstanceRecord | None:
        value = self.etcd.value(self.keys.instance(POD))
        return types.decode(InstanceRecord, value) if value else None

    async def until(self, predicate: Callable[[], object], what: str) -> None:
        try:
            async with asyncio.timeout(WAIT_S):
                while not predicate():  # noqa: ASYNC110 - polls what the agent wrote to the fake etcd
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise AssertionError(f"never happened: {what}") from None

    async def until_state(self, model: str, state: CopyState | None) -> None:
        await self.until(lambda: self.state(model) is state, f"{model} {state} in etcd")

    async def settle(self, turns: int = 20) -> None:
        """Lets every ready task run a few times (nothing the test holds can proceed)."""
        for _ in range(turns):
            await asyncio.sleep(0)
