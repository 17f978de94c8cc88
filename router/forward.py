"""Byte forwarding of ModelInfer / ModelStreamInfer to runtime pods.

Requests and responses stay bytes end to end: the router reads the model id from the wire
(modelid.py) and never parses tensors. Channels are long-lived, one per pod address. A copy
answering UNAVAILABLE (or unreachable) is excluded and the request re-sent to another ready
copy, at most `forward_attempts` tries; when no copy is left the miss path runs once. Any other
status of a pod reaches the caller with the pod's code and details unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from mesh import errors
from mesh.errors import MeshError, Unavailable
from mesh.metrics import Metrics
from mesh.rpc.server import ChannelPool
from mesh.settings import RouterSettings
from mesh.state import MeshState
from router import modelid, policy, v2
from router.miss import MissHandler
from router.table import RouteTable

log = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Connection-level metadata that belongs to one hop, never forwarded.
_HOP_BY_HOP = frozenset(
    {"user-agent", "te", "content-type", "connection", "keep-alive", "host", "transfer-encoding",
     "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding"}
)
SWEEP_INTERVAL_S = 30.0


class PodStatus(Exception):
    """A pod's own non-retryable status, passed to the caller unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def forwarded_metadata(metadata: Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith(":") and not key.startswith("grpc-") and key not in _HOP_BY_HOP
    )


class Forwarder:
    def __init__(
        self,
        state: MeshState,
        table: RouteTable,
        miss: MissHandler,
        pool: ChannelPool,
        settings: RouterSettings,
        metrics: Metrics,
        rng: random.Random | None = None,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        """`on_request(model_id)` is told of every request for a registered model (usage
        telemetry); it must be O(1) and never block or raise."""
        self.on_request = on_request
        self.state = state
        self.table = table
        self.miss = miss
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._hits = metrics.cache_hits.labels(metrics.service)  # label lookup once, not per request

    # -- the domain call ----------------------------------------------------------------------

    async def infer(
        self, request: bytes, metadata: Iterable[tuple[str, Any]] | None, budget_s: float | None
    ) -> bytes:
        """Routes one serialized ModelInferRequest; returns the pod's response bytes.

        `budget_s` is the caller's remaining time (None: the default deadline). Raises
        MeshError for the mesh's own failures and PodStatus for a pod's answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (budget_s if budget_s is not None else self.settings.default_deadline_s)
        model_id, request = modelid.resolve(metadata, request)
        if not self.table.synced:
            await self._await_sync(deadline)
        if model_id not in self.state.models:
            raise errors.model_not_found(model_id)
        if self.on_request is not None:
            self.on_request(model_id)
        forward_md = forwarded_metadata(metadata)
        if self.table.ready(model_id):
            self._hits.inc()
        excluded: set[str] = set()
        missed = False
        attempts = 0
        while True:
            address = policy.pick(self.table.addresses(model_id), self.table.in_flight, excluded, self.rng)
            if address is None:
                # No copy (left): the copies may have been evicted or died; load once more.
                if missed:
                    raise Unavailable(f"no reachable copy of model '{model_id}'; retry")
                missed = True
                await self.miss.ensure(model_id, deadline)
                continue
            attempts += 1
            try:
                return await self._call(address, request, forward_md, deadline)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise PodStatus(code, exc.details() or "") from None
                log.info("copy of %s at %s unavailable: %s", model_id, address, exc.details())
                if attempts >= self.settings.forward_attempts:
                    raise Unavailable(
                        f"model '{model_id}': {attempts} copies tried, all unavailable; retry"
                    ) from None
                excluded.add(address)
                self.metrics.forward_retries.inc()

    async def _call(
        self, address: str, request: bytes, metadata: tuple[tuple[str, Any], ...], deadline: float
    ) -> bytes:
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            raise errors.DeadlineExceeded("deadline exceeded before the request reached a copy")
        call = self._calls.get(address)
        if call is None:
            call = self.pool.get(address).unary_unary(INFER_METHOD)
            self._calls[address] = call
        with self.table.track(address):
            return await call(request, timeout=timeout, metadata=metadata)

    async def _await_sync(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self.state.view.wait_synced()
        except TimeoutError:
            raise Unavailable("router has not loaded the mesh state from etcd yet; retry") from None

    async def sweep(self) -> None:
        """Closes channels to pods that are gone (run under a Supervisor)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            if not self.table.synced:
                continue
            live = self.table.live_addresses()
            for address in self.pool.addresses():
                if address not in live and not self.table.in_flight.get(address):
                    self._calls.pop(address, None)
                    await self.pool.discard(address)

    # -- gRPC handlers (bytes in, bytes out) ---------------------------------------------------

    def budget(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining time in seconds, or the default deadline when it set none."""
        remaining = context.time_remaining()
        return self.settings.default_deadline_s if remaining is None else remaining

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self.infer(request, context.invocation_metadata(), self.budget(context))
        except PodStatus as exc:
            await context.abort(exc.code, exc.details)
            raise  # unreachable: abort raises

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each message is routed on its own and answered in order; a failed message is
        answered with error_message and the stream goes on.

        Pipelined: up to `stream_window` messages of one stream are in flight at once (a
        reader task starts each as it arrives); responses are still yielded in arrival order.
        """
        metadata = context.invocation_metadata()
        window = asyncio.Semaphore(self.settings.stream_window)
        started: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue()  # unbounded: the semaphore bounds it

        async def read() -> None:
            try:
                async for request in requests:
                    await window.acquire()
                    started.put_nowait(asyncio.ensure_future(self._stream_one(request, metadata, context)))
            finally:
                started.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await started.get()) is not None:
                response = await task
                window.release()
                yield response
            await reader  # surfaces an error reading the request stream
        finally:
            reader.cancel()
            while not started.empty():
                left = started.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(self, request: bytes, metadata: Any, context: grpc.aio.ServicerContext) -> bytes:
        try:
            response = await self.infer(request, metadata, self.budget(context))
        except PodStatus as exc:
            return v2.stream_error(f"{exc.code.name}: {exc.details}")
        except MeshError as exc:
            return v2.stream_error(f"{exc.kind.value}: {exc.message}")
        return v2.stream_response(response)
