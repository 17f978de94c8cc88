"""puller.admission: per-model and per-pod limits, the shed's message and retry hint as a client
sees them over gRPC, deadlines checked before anything runs, and a cancelled request leaving
the executor's queue with its slot freed (a real Executor, a fake session that blocks)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

from mesh.clock import FakeClock
from mesh.errors import DeadlineExceeded, Overloaded
from mesh.metrics import Metrics
from mesh.rpc.server import make_server
from mesh.rpc.status import PUSHBACK_KEY
from puller.admission import MAX_PUSHBACK_MS, MIN_PUSHBACK_MS, Admission
from puller.datatypes import TensorSpec
from puller.executor import Executor, LoadedModel
from puller.table import Served


class BlockingSession:
    """Stands in for an onnxruntime session: counts runs, each blocks until `release`."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = threading.Event()
        self.gate = threading.Event()

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        self.started.set()
        self.gate.wait(30)
        return [feeds["input"] * 2]


def _served(model_id: str = "m", session: object = None) -> Served:
    spec = TensorSpec("input", "FP32", (-1, 4))
    model = LoadedModel(model_id, session, {"input": spec}, {"output": spec}, 0, 0)  # type: ignore[arg-type]
    return Served(model, "key", 0)


def _admission(per_model: int = 2, per_pod: int = 3) -> tuple[Admission, Metrics]:
    metrics = Metrics(service="runtime")
    return Admission(per_model, per_pod, metrics, FakeClock()), metrics


def _shed(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("mesh_shed_total", {"service": "runtime", "reason": reason}) or 0.0


def test_per_model_limit_sheds_with_a_hint_and_done_frees_the_slot() -> None:
    admission, metrics = _admission(per_model=2, per_pod=10)
    served = _served()
    admission.admit(served, None)
    admission.admit(served, None)
    with pytest.raises(Overloaded) as info:
        admission.admit(served, None)
    assert "MESH_RUNTIME_MAX_QUEUE_PER_MODEL" in info.value.message and "'m'" in info.value.message
    assert MIN_PUSHBACK_MS <= info.value.retry_after_ms <= MAX_PUSHBACK_MS
    assert served.in_flight == 2 and admission.admitted == 2  # the shed request took no slot
    assert _shed(metrics, "model_queue") == 1
    admission.done(served, 0.01, 5, ran=True)
    admission.admit(served, None)  # a freed slot admits again
    assert served.in_flight == 2 and served.last_used_unix_ms == 5


def test_per_pod_limit_counts_every_model() -> None:
    admission, metrics = _admission(per_model=2, per_pod=3)
    a, b = _served("a"), _served("b")
    admission.admit(a, None)
    admission.admit(a, None)
    admission.admit(b, None)
    with pytest.raises(Overloaded) as info:
        admission.admit(b, None)  # b is under its own limit, the pod is not
    assert "MESH_RUNTIME_MAX_QUEUE_PER_POD" in info.value.message
    assert _shed(metrics, "pod_queue") == 1 and b.in_flight == 1


def test_pushback_follows_recent_latency_within_bounds() -> None:
    admission, _ = _admission(per_model=1, per_pod=10)
    served = _served()
    admission.admit(served, None)
    admission.done(served, 0.2, 0, ran=True)  # recent requests took 200 ms
    admission.admit(served, None)
    with pytest.raises(Overloaded) as info:
        admission.admit(served, None)
    assert info.value.retry_after_ms == 200


async def test_an_expired_deadline_is_not_run() -> None:
    admission, metrics = _admission()
    served = _served()
    calls: list[int] = []

    async def work() -> int:
        calls.append(1)
        return 1

    for remaining in (0.0, -0.5):
        with pytest.raises(DeadlineExceeded):
            await admission.run(served, remaining, work)
    assert calls == [] and admission.admitted == 0 and served.requests == 0
    assert _shed(metrics, "deadline") == 2
    assert await admission.run(served, None, work) == 1  # no deadline: runs


async def test_a_deadline_the_queue_would_outlast_is_not_run() -> None:
    admission, _ = _admission()
    served = _served()
    admission.admit(served, None)
    admission.done(served, 0.5, 0, ran=True)  # requests of this model now take ~500 ms here
    with pytest.raises(DeadlineExceeded) as info:
        admission.admit(served, 0.1)
    assert "500 ms" in info.value.message
    admission.admit(served, 1.0)  # enough time left: admitted
    assert served.in_flight == 1


async def test_a_shed_reaches_the_client_as_resource_exhausted_with_pushback_metadata() -> None:
    """What a router or tritonclient sees: the code, the message naming the setting, and
    grpc-retry-pushback-ms in the trailing metadata (mesh/rpc/status.py)."""
    admission, _ = _admission(per_model=1, per_pod=10)
    served = _served()
    gate, started = asyncio.Event(), asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            started.set()
            await gate.wait()
            return b"ok"

        return await admission.run(served, context.time_remaining(), work)

    server, port = make_server("127.0.0.1:0", 1 << 20, Metrics())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(handler)})])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.S/M")
            first = asyncio.ensure_future(call(b"x", timeout=30))
            await asyncio.wait_for(started.wait(), 30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"x", timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MESH_RUNTIME_MAX_QUEUE_PER_MODEL" in (info.value.details() or "")
            pushback = dict(info.value.trailing_metadata() or ())[PUSHBACK_KEY]
            assert MIN_PUSHBACK_MS <= int(pushback) <= MAX_PUSHBACK_MS
            gate.set()
            assert await first == b"ok"
    finally:
        await server.stop(None)


async def test_a_cancelled_request_leaves_the_executor_queue_and_frees_its_slot() -> None:
    """The unbatched path: a request queued in the executor's pool behind a running one is
    cancelled (its caller gave up): it never runs, and its admission slot is free at once."""
    session = BlockingSession()
    executor = Executor(threads=1, intra_op_threads=1, cuda=False)
    admission, _ = _admission(per_model=2, per_pod=10)
    served = _served(session=session)
    x = np.ones((1, 4), np.float32)

    def request() -> asyncio.Future[list[np.ndarray]]:
        return asyncio.ensure_future(
            admission.run(served, None, lambda: executor.run(served.model, {"input": x}, ["output"])))

    try:
        running = request()
        assert await asyncio.to_thread(session.started.wait, 30)
        queued = request()
        await asyncio.sleep(0)
        assert served.in_flight == 2
        with pytest.raises(Overloaded):
            admission.admit(served, None)  # full: both slots held
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert served.in_flight == 1 and admission.admitted == 1  # its slot is free already
        third = request()  # and takes the freed slot
        await asyncio.sleep(0)
        session.gate.set()
        async with asyncio.timeout(30):
            (out,) = await running
            await third
        np.testing.assert_array_equal(out, x * 2)
        assert session.runs == 2  # the first and the third: the cancelled one never ran
        assert served.in_flight == 0 and admission.admitted == 0
    finally:
        session.gate.set()
        executor.close()
