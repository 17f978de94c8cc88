"""Issue 9 item 4 on the router, in-process over a real etcd with fake pods: the per-pod
in-flight cap (max_in_flight_per_pod) sheds with RESOURCE_EXHAUSTED and a retry hint before
forwarding, a copy at the cap is not picked, and a pod's own shed reaches the caller with its
hint (or is retried on another copy that has room)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh.rpc.status import PUSHBACK_KEY

from .conftest import FakePod, Router
from .test_forwarding import _register, _wait_copies

pytestmark = pytest.mark.integration


class HoldPod(FakePod):
    """Holds every ModelInfer until `release` is set (a busy pod whose connection is up)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append((pb.ModelInferRequest.FromString(request).model_name, {}))
        await self.release.wait()
        return pb.ModelInferResponse(model_name="m", id=self.name).SerializeToString()


class ShedPod(FakePod):
    """Sheds every ModelInfer the way a pod's admission control does: RESOURCE_EXHAUSTED with
    a grpc-retry-pushback-ms hint."""

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append((pb.ModelInferRequest.FromString(request).model_name, {}))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "pod queue full; retry after 77 ms",
                            trailing_metadata=((PUSHBACK_KEY, "77"),))
        raise AssertionError("unreachable")


async def _until(predicate) -> None:  # noqa: ANN001
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 (a condition on fakes, polled briefly)
            await asyncio.sleep(0.01)


async def _shed(router: Router) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.infer("m", deadline_s=5)
    return err.value


async def test_every_copy_at_the_cap_is_shed_at_the_router_with_a_hint(router_with) -> None:
    """Regression (F21, overload 3×): the router forwarded every request, so an overloaded pod
    queued them in its saturated event loop (admitted p99 100× baseline) and excess came back
    UNAVAILABLE. With every ready copy at max_in_flight_per_pod, a request is answered
    RESOURCE_EXHAUSTED with grpc-retry-pushback-ms by the router, without reaching a pod."""
    a, b = await HoldPod("pod-a").start(), await HoldPod("pod-b").start()
    try:
        async with router_with(max_in_flight_per_pod=1) as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-a", a.address)
            await router.add_copy("m", "pod-b", b.address)
            await _wait_copies(router, "m", 2)
            held = [asyncio.create_task(router.infer("m", deadline_s=10)) for _ in range(2)]
            # A copy at its cap is not picked: one request each, whatever the random picks.
            await _until(lambda: len(a.calls) + len(b.calls) == 2)
            assert (len(a.calls), len(b.calls)) == (1, 1)
            err = await _shed(router)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "MESH_ROUTER_MAX_IN_FLIGHT_PER_POD" in (err.details() or "")
            hint = dict(err.trailing_metadata() or ()).get(PUSHBACK_KEY)
            assert hint is not None and int(hint) > 0
            assert len(a.calls) + len(b.calls) == 2  # never forwarded
            assert router.sample("mesh_shed_total", {"service": "router", "reason": "pod_cap"}) == 1
            assert router.sample("mesh_router_ejections_total") == 0
            a.release.set()
            b.release.set()
            assert sorted(r.id for r in await asyncio.gather(*held)) == ["pod-a", "pod-b"]
            assert (await router.infer("m", deadline_s=5)).id in ("pod-a", "pod-b")  # room again
    finally:
        await a.stop()
        await b.stop()


async def test_a_pods_shed_reaches_the_caller_with_its_hint(router_with) -> None:
    """A pod's RESOURCE_EXHAUSTED is passed through with its pushback, never turned into
    UNAVAILABLE, and the pod is not ejected for it (it answered)."""
    pod = await ShedPod("pod-full").start()
    try:
        async with router_with(eject_after_failures=1) as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-full", pod.address)
            await _wait_copies(router, "m", 1)
            for _ in range(3):
                err = await _shed(router)
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert err.details() == "pod queue full; retry after 77 ms"
                assert dict(err.trailing_metadata() or ()).get(PUSHBACK_KEY) == "77"
            assert len(pod.calls) == 3  # one attempt each: no other copy to retry on
            assert router.sample("mesh_router_ejections_total") == 0
    finally:
        await pod.stop()


async def test_a_pods_shed_is_retried_on_a_copy_with_room(router_with, pods) -> None:
    """With another copy under its cap, a request the first copy shed is served there."""
    full = await ShedPod("pod-full").start()
    good = await pods("pod-good")
    try:
        async with router_with() as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-full", full.address)
            await router.add_copy("m", "pod-good", good.address)
            await _wait_copies(router, "m", 2)
            for _ in range(20):
                assert (await router.infer("m", deadline_s=5)).id == "pod-good"
            assert full.calls  # it was picked, shed, and the request went on to pod-good
            assert router.sample("mesh_forward_retries_total") == len(full.calls)
    finally:
        await full.stop()
