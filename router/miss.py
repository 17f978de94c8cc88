"""The miss path: ask the placement leader to load a model, then wait for a ready copy.

One EnsureLoaded per model however many requests miss at once (single flight); the shared
call is bounded by the router's default deadline, each waiter by its own deadline, so a
caller that gives up early neither cancels the load nor cuts it short for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from mesh import errors
from mesh.errors import DeadlineExceeded, Kind, MeshError, Unavailable
from mesh.metrics import Metrics
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc
from mesh.rpc.server import ChannelPool
from mesh.singleflight import SingleFlight
from mesh.state import MeshState
from router.table import RouteTable

log = logging.getLogger(__name__)

# Placement's answers that are final for this request and reach the caller as they are.
_PASS_THROUGH = {
    grpc.StatusCode.NOT_FOUND: Kind.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: Kind.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Kind.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT: Kind.INVALID_ARGUMENT,
}
LEADER_WAIT_S = 0.5  # how long to wait for a new leader before asking (again)


class MissHandler:
    def __init__(
        self,
        state: MeshState,
        table: RouteTable,
        pool: ChannelPool,
        metrics: Metrics,
        load_timeout_s: float,
    ) -> None:
        self.state = state
        self.table = table
        self.pool = pool
        self.metrics = metrics
        self.load_timeout_s = load_timeout_s
        self.flights: SingleFlight[str, None] = SingleFlight()

    async def ensure(self, model_id: str, deadline: float) -> None:
        """Returns once this router's table has a ready copy of `model_id`.

        `deadline` is in event-loop time. Raises NotFound for an unregistered model (without
        asking placement), placement's NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED as
        they are, DeadlineExceeded when the deadline passes first.
        """
        if model_id not in self.state.models:
            raise errors.model_not_found(model_id)
        if self.table.ready(model_id):
            return
        m = self.metrics
        m.cache_misses.labels(m.service).inc()
        start = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await self._load_or_ready(model_id)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model '{model_id}' was not ready before the deadline; it may still be loading, retry"
            ) from None
        m.cache_miss_seconds.labels(m.service).observe(time.perf_counter() - start)

    async def _load_or_ready(self, model_id: str) -> None:
        """Asks placement (shared flight) and watches this router's own table at once: the copy
        is routable as soon as the table has it, often before placement's answer arrives.
        Placement's error still wins while no copy is ready."""
        flight = asyncio.ensure_future(self.flights.do(model_id, lambda: self._load(model_id)))
        ready = asyncio.ensure_future(self.state.wait_for(lambda: self.table.ready(model_id), None))
        try:
            done, _ = await asyncio.wait({flight, ready}, return_when=asyncio.FIRST_COMPLETED)
            if ready not in done:
                flight.result()  # placement's error, raised here
                await ready
        finally:
            for task in (flight, ready):
                task.cancel()  # the shared load goes on for its other waiters (shielded)
            await asyncio.gather(flight, ready, return_exceptions=True)

    async def _load(self, model_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout_s
        request = internal_pb2.EnsureLoadedRequest(model_id=model_id)
        while True:
            if self.table.ready(model_id):
                return
            leader = self.state.leader
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"placement did not load model '{model_id}' in time; retry")
            if leader is None:
                log.info("no placement leader; waiting to load %s", model_id)
                await self._await_leader_change(None, remaining)
                continue
            stub = internal_pb2_grpc.PlacementStub(self.pool.get(leader.address))
            try:
                await stub.EnsureLoaded(request, timeout=remaining)
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in _PASS_THROUGH:
                    raise MeshError(exc.details() or code.name, kind=_PASS_THROUGH[code]) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # loop re-checks the deadline
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise Unavailable(f"placement could not load model '{model_id}': "
                                      f"{code.name}: {exc.details()}") from None
                log.info("placement leader %s unavailable for %s; waiting for a new leader",
                         leader.address, model_id)
                await self._await_leader_change(leader.address, remaining)

    async def _await_leader_change(self, address: str | None, remaining: float) -> None:
        def changed() -> bool:
            leader = self.state.leader
            return leader is not None and leader.address != address

        try:
            await self.state.wait_for(changed, min(LEADER_WAIT_S, remaining))
        except TimeoutError:
            pass

    async def close(self) -> None:
        await self.flights.close()
