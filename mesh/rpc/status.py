"""The one table from error kinds to gRPC status codes, and the handler wrapping applying it.

Every method handler of every server is wrapped once, when it is registered (StatusServer,
built by mesh.rpc.server.make_server): a MeshError becomes its status, anything else INTERNAL,
and every RPC is counted and timed by method and code. This replaces a grpc.aio
ServerInterceptor, which grpc runs per RPC (an extra coroutine, a handler lookup and a fresh
closure for every call); profiling showed that cost on the hot path (docs/BENCHMARKS.md).

A request whose bytes do not parse is INVALID_ARGUMENT, never grpc's own UNKNOWN "Unexpected
<class DecodeError>" (each handler's request deserializer is wrapped: see `tolerant`), and
every message a caller sees has bare filesystem paths redacted (errors.redact_paths): the last
guard, whichever code formatted an OS or onnxruntime error into a MeshError.

An Overloaded error (a shed) also carries `grpc-retry-pushback-ms` in its trailing metadata,
and a server built with an InFlightLimit sheds RPCs beyond it that way before running them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.errors import InvalidArgument, Kind, MeshError, Overloaded, redact_paths
from mesh.metrics import Metrics

log = logging.getLogger(__name__)

CODES: dict[Kind, grpc.StatusCode] = {kind: getattr(grpc.StatusCode, kind.value) for kind in Kind}
_MAX_CACHED_METHODS = 1024  # a generic handler answering any name must not grow the cache forever


PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's retry hint (A6 retry design), read by grpc clients
MIN_PUSHBACK_MS, MAX_PUSHBACK_MS = 10, 1000


def pushback_ms(latency_s: float) -> int:
    """Retry hint of a shed: about the time the work in front needs to turn over (a recent
    request's latency), never below MIN (a retry storm) nor above MAX."""
    return min(max(round(latency_s * 1000), MIN_PUSHBACK_MS), MAX_PUSHBACK_MS)


def code_of(exc: BaseException) -> grpc.StatusCode:
    return CODES[exc.kind] if isinstance(exc, MeshError) else grpc.StatusCode.INTERNAL


ANSWERED_KEY = "mesh-error"  # set on every status our own code answers with (its kind)


def trailing_of(exc: MeshError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a MeshError's status carries: its kind (so a router tells a pod that
    answered UNAVAILABLE, e.g. "not loaded on this pod", from one it could not reach) and the
    retry hint of a shed."""
    out: tuple[tuple[str, str], ...] = ((ANSWERED_KEY, exc.kind.value.lower()),)
    if isinstance(exc, Overloaded):
        out += ((PUSHBACK_KEY, str(exc.retry_after_ms)),)
    return out


def answered(metadata: Any) -> bool:
    """Whether a failed call's trailing metadata says our own server code answered it."""
    return any(k == ANSWERED_KEY for k, _ in metadata or ())


def pushback_of(metadata: Any) -> tuple[tuple[str, str], ...]:
    """The retry hint among a call's trailing metadata, to pass on across a hop (router)."""
    return tuple((k, v) for k, v in metadata or () if k == PUSHBACK_KEY)


class Malformed:
    """What a tolerant deserializer returns for bytes that are not a valid message: the
    handler wrapping answers it INVALID_ARGUMENT instead of running the handler."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"malformed request: the bytes are not a valid {self.message} "
                               "protobuf message (truncated, corrupt or of another type)")


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` returning a Malformed for bytes it cannot parse instead of raising.

    grpc.aio runs the request deserializer outside the handler and answers its exception
    with UNKNOWN and the exception's text (a protobuf DecodeError): a client sending a corrupt
    ModelInferRequest to a pod saw that. Only the parse is tolerated, nothing else."""
    if deserializer is None:  # bytes handlers (the router's V2 service) parse themselves
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request"

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, RuntimeWarning-as-error, ...: all malformed
            return Malformed(name)

    return parse


async def _checked(requests: Any) -> Any:
    """A request stream whose malformed message ends the RPC with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, Malformed):
            raise request.error()
        yield request


class InFlightLimit:
    """A server-wide bound on RPCs in progress; beyond it an RPC is answered at once with
    RESOURCE_EXHAUSTED, a pushback hint (the recent mean duration of an RPC, clamped) and a
    message naming the setting to tune. grpc's own `maximum_concurrent_rpcs` is set to
    `backstop`, above it, for bursts arriving faster than this answers them. Event-loop only."""

    MIN_PUSHBACK_MS, MAX_PUSHBACK_MS = MIN_PUSHBACK_MS, MAX_PUSHBACK_MS

    def __init__(self, limit: int, setting: str = "") -> None:
        self.limit = limit
        self.setting = setting
        self.active = 0
        self.backstop = limit + max(16, limit // 4)
        self.mean_s = 0.0  # EWMA of admitted unary RPC durations

    def overloaded(self) -> Overloaded:
        ms = pushback_ms(self.mean_s)
        tune = f" (raise {self.setting} or add replicas)" if self.setting else ""
        return Overloaded(
            f"server busy: {self.active} RPCs in progress, its limit{tune}; retry after {ms} ms", ms
        )

    def finished(self, seconds: float) -> None:
        self.mean_s += 0.05 * (seconds - self.mean_s)


class _Recorder:
    """Counts and times one method; metric children are looked up once, not per request."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.seconds = metrics.request_seconds.labels(metrics.service, method)
        self.counts: dict[grpc.StatusCode, Any] = {}

    def __call__(self, code: grpc.StatusCode, start: float) -> None:
        counter = self.counts.get(code)
        if counter is None:
            m = self.metrics
            counter = self.counts[code] = m.requests.labels(m.service, self.method, code.name)
        counter.inc()
        elapsed = time.perf_counter() - start
        self.seconds.observe(elapsed)
        self.metrics.request_done(self.method, code.name, elapsed)


async def _fail(exc: BaseException, context: grpc.aio.ServicerContext, record: _Recorder, start: float) -> None:
    """Records a failed RPC and aborts with its status; the caller re-raises `exc`."""
    if isinstance(exc, grpc.aio.AbortError):
        record(context.code() or grpc.StatusCode.UNKNOWN, start)
        return
    if isinstance(exc, MeshError):
        code = code_of(exc)
        record(code, start)
        await context.abort(code, redact_paths(exc.message), trailing_metadata=trailing_of(exc))
    if isinstance(exc, Exception):
        log.exception("unhandled error in %s", record.method)
        record(grpc.StatusCode.INTERNAL, start)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {record.method}")
    # BaseException (cancellation): nothing to answer; grpc cancels the RPC.


def _unary_response(fn: Callable[..., Any], record: _Recorder, limit: InFlightLimit | None) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            if isinstance(request, Malformed):
                raise request.error()
            response = await fn(request, context)
        except BaseException as exc:
            await _fail(exc, context, record, start)
            raise
        record(context.code() or grpc.StatusCode.OK, start)
        return response

    if limit is None:
        return wrapped

    async def limited(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if limit.active >= limit.limit:
            record.metrics.shed.labels(record.metrics.service, "rpc_limit").inc()
            await _fail(limit.overloaded(), context, record, time.perf_counter())  # aborts
        limit.active += 1
        start = time.perf_counter()
        try:
            return await wrapped(request, context)
        finally:
            limit.active -= 1
            limit.finished(time.perf_counter() - start)

    return limited


def _stream_response(fn: Callable[..., Any], record: _Recorder, limit: InFlightLimit | None) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        if limit is not None and limit.active >= limit.limit:
            record.metrics.shed.labels(record.metrics.service, "rpc_limit").inc()
            await _fail(limit.overloaded(), context, record, start)  # aborts
        if limit is not None:
            limit.active += 1
        try:
            if isinstance(request, Malformed):
                raise request.error()
            async for item in fn(request, context):
                yield item
        except BaseException as exc:
            await _fail(exc, context, record, start)
            raise
        finally:
            if limit is not None:
                limit.active -= 1
        record(context.code() or grpc.StatusCode.OK, start)

    return wrapped


def instrument(
    handler: grpc.RpcMethodHandler, method: str, metrics: Metrics, limit: InFlightLimit | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with status mapping and metrics (and the server's in-flight limit, when it
    has one) applied to whichever behaviour it has."""
    record = _Recorder(metrics, method.rsplit("/", 1)[-1])
    h: Any = handler._replace(request_deserializer=tolerant(handler.request_deserializer))  # type: ignore[attr-defined]
    if h.unary_unary:
        return h._replace(unary_unary=_unary_response(h.unary_unary, record, limit))
    if h.stream_unary:
        return h._replace(stream_unary=_unary_response(_streamed(h.stream_unary), record, limit))
    if h.unary_stream:
        return h._replace(unary_stream=_stream_response(h.unary_stream, record, limit))
    if h.stream_stream:
        return h._replace(stream_stream=_stream_response(_streamed(h.stream_stream), record, limit))
    return handler


def _streamed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A client-streaming handler reading its requests through _checked."""

    def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return fn(_checked(requests), context)

    return call


class WrappingGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped by `wrap(handler, method)` the first
    time each is asked for (the status layer here, authentication in router/auth.py)."""

    def __init__(self, inner: grpc.GenericRpcHandler,
                 wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler]) -> None:
        self.inner = inner
        self.wrap = wrap
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = self.inner.service(details)
        if handler is None:
            return None
        wrapped = self.wrap(handler, method)
        if len(self._cache) < _MAX_CACHED_METHODS:
            self._cache[method] = wrapped
        return wrapped


class StatusServer:
    """A grpc.aio.Server that instruments every handler registered on it (generated
    `add_*Servicer_to_server` functions and generic handlers alike). Everything else is the
    grpc server's own."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics, limit: InFlightLimit | None = None) -> None:
        self.server = server
        self.metrics = metrics
        self.limit = limit  # RPCs in progress beyond it are shed (health checks are not counted)
        # grpc.health.v1 for Kubernetes grpc probes: NOT_SERVING until the process says it
        # is ready, and again while it drains. Not instrumented (probes are not traffic).
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

    async def set_serving(self, serving: bool) -> None:
        """The overall ("") health status Kubernetes' grpc readiness probe reads."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(
            [WrappingGeneric(h, lambda hd, m: instrument(hd, m, self.metrics, self.limit)) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service,
            {name: instrument(h, f"/{service}/{name}", self.metrics, self.limit) for name, h in handlers.items()},
        )

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self.server.add_secure_port(address, credentials)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

