"""The router retains no memory per call its client cancels (router/forward.py, mesh/rpc/calls.py).

Regression test (issue 9, F23 soak: router RSS +28 % in 30 minutes, ~0.55 KiB per cancelled
call). A call the client cancelled cancelled the router's task awaiting the forwarded call, and
grpcio frees an aio batch's C memory (its grpc_op array, message buffers, status) only when the
task awaiting it sees it complete (grpc/grpc#43360): every cancelled call leaked its forwarded
call's batch, ~0.7 KiB. The router now cancels a forwarded call in grpc-core only.

The leak is in C memory, invisible to tracemalloc: measured as glibc's in-use heap bytes
(mallinfo2) before and after a batch of calls, each cancelled while the fake pod holds it (so
the router always has its forwarded call in flight). The test's own client cancels in core only
too, so its unary calls leak nothing; its cancelled streams still retain ~100 B each in grpcio
(measured with the server in another process), included in the stream figure. Before the fix:
~890 B per unary call, ~980 B per stream; after: ~0 and ~100. The bound is generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh.rpc.calls import cancel_in_core

from .conftest import Router
from .test_forwarding import _register, _wait_copies

pytestmark = pytest.mark.integration

V2 = "inference.GRPCInferenceService"
WARMUP, CALLS = 300, 1500
BOUND_B = 300  # bytes per cancelled call; the leak retained ~890 (unary) and ~980 (stream)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (all threads, grpc-core's included)."""
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2) to count C heap bytes")
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


class HoldingPod:
    """A pod that receives each ModelInfer / ModelStreamInfer request and never answers it: the
    router's forwarded call is in flight until cancelled."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[None] = asyncio.Queue()
        self.active = 0
        self.idle = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def _hold(self) -> None:
        self.active += 1
        self.idle.clear()
        try:
            self.arrived.put_nowait(None)
            await asyncio.Event().wait()
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._hold()
        return b""

    async def start(self) -> HoldingPod:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            V2, {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer)})])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def drained(self) -> None:
        """Until every held call was cancelled by the router (its cancellation went all the way)."""
        if self.active:
            await asyncio.wait_for(self.idle.wait(), 30)


def _request() -> bytes:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    return request.SerializeToString()


async def _cancelled_unary(router: Router, pod: HoldingPod, request: bytes) -> None:
    call = router.channel.unary_unary(f"/{V2}/ModelInfer")(request, timeout=30)
    await pod.arrived.get()  # the router's forwarded call is in flight now
    cancel_in_core(call)
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call


async def _cancelled_stream(router: Router, pod: HoldingPod, request: bytes) -> None:
    call = router.channel.stream_stream(f"/{V2}/ModelStreamInfer")(timeout=30)
    await call.write(request)
    await pod.arrived.get()
    cancel_in_core(call)
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call.read()


async def _retained_per_call(router: Router, pod: HoldingPod, one) -> float:
    request = _request()
    for _ in range(WARMUP):  # channels, metric children, caches, malloc's own arenas
        await one(router, pod, request)
    await pod.drained()
    gc.collect()
    before = heap_in_use()
    for _ in range(CALLS):
        await one(router, pod, request)
    await pod.drained()  # every forwarded call cancelled by the router, all the way to the pod
    gc.collect()
    return (heap_in_use() - before) / CALLS


@pytest.fixture
async def holding_pod(router: Router):
    pod = await HoldingPod().start()
    await _register(router, "m")
    await router.add_copy("m", "pod-hold", pod.address)
    await _wait_copies(router, "m", 1)
    yield pod
    await pod.server.stop(0)


async def test_cancelled_unary_calls_retain_no_memory(router: Router, holding_pod: HoldingPod) -> None:
    per_call = await _retained_per_call(router, holding_pod, _cancelled_unary)
    print(f"unary: {per_call:.0f} B retained per cancelled call")
    assert per_call < BOUND_B, f"{per_call:.0f} B of heap retained per cancelled ModelInfer"


async def test_cancelled_streams_retain_no_memory(router: Router, holding_pod: HoldingPod) -> None:
    per_call = await _retained_per_call(router, holding_pod, _cancelled_stream)
    print(f"stream: {per_call:.0f} B retained per cancelled stream")
    assert per_call < BOUND_B, f"{per_call:.0f} B of heap retained per cancelled ModelStreamInfer"
