"""Byte forwarding of ModelInfer / ModelStreamInfer to runtime pods.

Requests and responses stay bytes end to end: the router reads the model id from the wire
(modelid.py) and never parses tensors. Channels are long-lived, one per pod address. A copy
answering UNAVAILABLE or CANCELLED (its pod stopping), or unreachable, or not answering within
`attempt_timeout_s` while another copy is left, is excluded and the request re-sent to another
ready copy (ModelInfer is idempotent), at most `forward_attempts` tries. Pods that keep failing are ejected from picks
for a while (policy.Ejector), so a frozen or blackholed pod stops receiving requests within
seconds, not when its lease lapses. When no copy is left the miss path runs once, told which
pods to avoid, so placement loads a copy elsewhere; the copies placement answers with are
routed to at once, until the route table shows them. Any other status of a pod reaches the
caller with the pod's code and details unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from mesh import errors
from mesh.errors import Kind, MeshError, Unavailable
from mesh.metrics import Metrics
from mesh.rollout import RUNNING
from mesh.rpc.calls import settle
from mesh.rpc.server import ChannelPool
from mesh.rpc.status import answered, pushback_of
from mesh.settings import RouterSettings
from mesh.state import MeshState
from router import auth, policy, tenancy, v2
from router.miss import MissHandler
from router.quota import Quotas
from router.registry import unknown_model
from router.table import RouteTable

log = logging.getLogger(__name__)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Connection-level metadata that belongs to one hop, never forwarded; and the caller's
# credentials, which are the router's to check and never reach a pod.
_HOP_BY_HOP = frozenset(
    {"user-agent", "te", "content-type", "connection", "keep-alive", "host", "transfer-encoding",
     "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding", "authorization",
     auth.DIGEST_KEY}
)
SWEEP_INTERVAL_S = 30.0
# A miss avoiding the failed copies may still fail (no other pod fits, no leader): then the
# ejected copies are tried rather than none. Not for these, which are final.
_FINAL = frozenset({Kind.NOT_FOUND, Kind.DEADLINE_EXCEEDED})


class PodStatus(Exception):
    """A pod's own non-retryable status, passed to the caller unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = trailing  # the pod's retry hint (grpc-retry-pushback-ms) of a shed


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
        quotas: Quotas | None = None,
        on_rollout: Callable[[str, str, bool, float], None] | None = None,
    ) -> None:
        """`on_request(model_id)` is told of every request for a registered model (usage
        telemetry); it must be O(1) and never block or raise. `quotas`: the tenants' request
        quotas (router/quota.py), shared with the registry. `on_rollout(vmodel, model_id, ok,
        seconds)`, the same way, of every finished request through a vmodel whose rollout
        runs (router/telemetry.py record_rollout); a caller's cancellation is not counted."""
        self.on_request = on_request
        self.on_rollout = on_rollout
        self.quotas = quotas or Quotas(state, settings, metrics)
        self.namespace = tenancy.Namespace(state)
        self.state = state
        self.table = table
        self.miss = miss
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._hits = metrics.cache_hits.labels(metrics.service)  # label lookup once, not per request
        self.ejector = policy.Ejector(settings.eject_after_failures, settings.ejection_s,
                                      settings.ejection_max_s, time.monotonic)

    # -- the domain call ----------------------------------------------------------------------

    async def infer(
        self, request: bytes, metadata: Iterable[tuple[str, Any]] | None, budget_s: float | None
    ) -> bytes:
        """Routes one serialized ModelInferRequest of the RPC's caller; returns the pod's
        response bytes.

        The caller's tenant decides which model the id names (router/tenancy.py: another
        tenant's answers as an absent one) and which quotas apply (router/quota.py). `budget_s`
        is the caller's remaining time (None: the default deadline). Raises MeshError for the
        mesh's own failures and PodStatus for a pod's answer; both name the caller's id.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (budget_s if budget_s is not None else self.settings.default_deadline_s)
        principal = tenancy.caller()
        usage = self.quotas.admit(principal)  # RESOURCE_EXHAUSTED when over a tenant quota
        started = self.quotas.clock() if usage is not None else 0.0
        try:
            if not self.table.synced:
                await self._await_sync(deadline)
            public, spec, request, vmodel = self.namespace.route_vmodel(principal, metadata, request)
            if spec is None:
                raise unknown_model(self.state, public)
            model_id = spec.model_id
            at = time.perf_counter()
            ok = cancelled = False
            try:
                response = await self._forward(model_id, request, metadata, deadline)
                ok = True
            except MeshError as exc:
                raise self.namespace.renamed(exc, model_id, public) from None
            except PodStatus as exc:
                exc.details = tenancy.rename(exc.details, model_id, public)
                raise
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                if vmodel:  # A/B figures per vmodel and target (router/vmodels.py)
                    self._vmodel_done(vmodel, model_id, ok, cancelled, time.perf_counter() - at)
            return self.namespace.response(public, model_id, response)
        finally:
            self.quotas.done(usage, started)

    def _vmodel_done(self, vmodel: str, model_id: str, ok: bool, cancelled: bool, seconds: float) -> None:
        self.metrics.vmodel_request(vmodel, model_id, ok, seconds)
        if self.on_rollout is None or cancelled:
            return
        record = self.state.vmodels.get(vmodel)
        if record is not None and record.rollout.get("state") == RUNNING:
            self.on_rollout(vmodel, model_id, ok, seconds)

    async def _forward(
        self, model_id: str, request: bytes, metadata: Iterable[tuple[str, Any]] | None, deadline: float
    ) -> bytes:
        """Forwards `request` (naming the internal `model_id`) to a ready copy, loading one
        on a miss; retries as the module docstring says."""
        loop = asyncio.get_running_loop()
        if self.on_request is not None:
            self.on_request(model_id)
        forward_md = forwarded_metadata(metadata)
        self.metrics.bind(model_id)  # the modelId label of the request's metrics (opt-in)
        if self.table.ready(model_id):
            self._hits.inc()
        excluded: set[str] = set()
        hinted: list[str] = []  # placement's ready copies, while the table does not show any
        missed = False
        attempts = 0
        while True:
            routed = self.table.addresses(model_id)
            if hinted:  # placement's answer, beside copies the table still lists (maybe dead ones)
                live = self.table.live_addresses()  # never a pod the view saw go
                hinted = [a for a in hinted if a in live and a not in routed]
                routed = [*routed, *hinted]
            candidates = [a for a in routed if a not in excluded]
            admitted = self.ejector.admitted(candidates, self._connected)
            if not admitted and not missed:
                # No copy (left) that answers: the copies may have been evicted, died or be
                # stuck; load once more, elsewhere than the pods that failed.
                missed = True
                try:
                    hinted = await self.miss.ensure(model_id, deadline, self._avoid(excluded))
                    continue
                except MeshError as exc:
                    if not candidates or exc.kind in _FINAL:
                        raise
                    log.info("no copy of %s loaded elsewhere (%s); trying ejected copies", model_id, exc.message)
            if not admitted:
                admitted = candidates  # only ejected copies left: better tried than none
            # A copy at the per-pod cap is not picked; every copy at it: shed now, cheaply, on
            # this router's loop, instead of queueing in an overloaded pod (F21).
            cap = self.settings.max_in_flight_per_pod
            roomy = self.table.with_room(admitted, cap)
            if admitted and not roomy:
                raise self.table.shed(model_id, admitted, cap)
            address = policy.pick(roomy, self.table.in_flight, rng=self.rng)
            if address is None:
                raise Unavailable(f"no reachable copy of model '{model_id}'; retry")
            attempts += 1
            budget = deadline - loop.time()
            if budget <= 0:
                raise errors.DeadlineExceeded("deadline exceeded before the request reached a copy")
            # The attempt timeout only while another copy is left to retry on: the last copy
            # gets the whole budget (a first request after a load may be slow).
            timeout = min(budget, self.settings.attempt_timeout_s) if len(admitted) > 1 else budget
            started = self.ejector.clock()
            try:
                response = await self._call(address, request, forward_md, timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.CANCELLED:
                    # Not our doing (our own cancellation raises CancelledError here): the pod's
                    # server cancelled the call as it shut down, which grpc-core does to calls
                    # that reach a stopping server before its handler picked them up
                    # (grpc/grpc#41785). The pod went away: retried elsewhere like UNAVAILABLE.
                    code = grpc.StatusCode.UNAVAILABLE
                cut = code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < budget
                if answered(exc.trailing_metadata()):
                    # The pod itself said UNAVAILABLE (e.g. the copy just left it): alive, so
                    # not a reason to eject it; the request still goes to another copy.
                    self.ejector.success(address)
                elif code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout >= self.settings.attempt_timeout_s
                ):
                    self._failed(address, started)  # unreachable, or no answer in a whole attempt timeout
                elif code != grpc.StatusCode.DEADLINE_EXCEEDED:  # not an answer: our own timeout
                    self.ejector.success(address)  # the pod answered, with its own status
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and attempts < self.settings.forward_attempts:
                    # The pod shed it: another copy, only if one has room (else its shed, with
                    # the pod's hint, is the answer: no blind retry piling onto a full copy).
                    excluded.add(address)
                    if self.table.with_room([a for a in admitted if a not in excluded], cap):
                        self.metrics.forward_retries.inc()
                        continue
                if code != grpc.StatusCode.UNAVAILABLE and not cut:
                    raise PodStatus(code, exc.details() or "", pushback_of(exc.trailing_metadata())) from None
                log.info("copy of %s at %s %s: %s", model_id, address,
                         "timed out" if cut else "unavailable", exc.details())
                if attempts >= self.settings.forward_attempts:
                    raise Unavailable(
                        f"model '{model_id}': {attempts} copies tried, none answered; retry"
                    ) from None
                excluded.add(address)
                self.metrics.forward_retries.inc()
                continue
            self.ejector.success(address)
            return response

    def _failed(self, address: str, since: float) -> None:
        if self.ejector.failure(address, since):
            self.metrics.ejections.inc()
            log.warning("pod %s ejected from picks: unreachable or timed out %d times in a row "
                        "(or again right after an ejection)", address, self.settings.eject_after_failures)

    def _avoid(self, excluded: set[str]) -> frozenset[str]:
        """Instance ids of the pods at the failed and the ejected addresses (for placement)."""
        bad = excluded.union(self.ejector.ejected_addresses(self._connected))
        if not bad:
            return frozenset()
        return frozenset(i for i, inst in self.state.instances.items() if inst.address in bad)

    def _connected(self, address: str) -> bool:
        """Whether the channel to `address` is up (asks it to connect when it is idle)."""
        state = self.pool.get(address).get_state(try_to_connect=True)
        return state is grpc.ChannelConnectivity.READY

    async def _call(
        self, address: str, request: bytes, metadata: tuple[tuple[str, Any], ...], timeout: float
    ) -> bytes:
        call = self._calls.get(address)
        if call is None:
            call = self.pool.get(address).unary_unary(INFER_METHOD)
            self._calls[address] = call
        with self.table.track(address):
            # The caller giving up cancels the forwarded call in grpc-core only: cancelling
            # grpc's task awaiting it leaked its batch's C memory, ~0.7 KiB per call a client
            # cancelled (grpc/grpc#43360, issue 9 F23); and grpcio >= 1.83 never collects an
            # abandoned aio call, so it must be cancelled explicitly (grpc/grpc#43462).
            return await settle(call(request, timeout=timeout, metadata=metadata))

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
                    self.ejector.forget(address)
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
            await context.abort(exc.code, exc.details, trailing_metadata=exc.trailing)
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
