"""Issue 9 on the router, in-process over a real etcd with fake pods and a fake placement:
attempts cut short on a stuck copy and retried, outlier ejection, the last copy's whole
budget, the reload that avoids the failed copy, and a miss without a leader failing fast."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from .conftest import FakePlacement, FakePod, Router
from .test_forwarding import _register, _wait_copies

pytestmark = pytest.mark.integration


class SlowPod(FakePod):
    """Answers every ModelInfer after `delay_s` (an hour: a stuck pod whose connection is up)."""

    def __init__(self, name: str, delay_s: float) -> None:
        super().__init__(name)
        self.delay_s = delay_s

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append((pb.ModelInferRequest.FromString(request).model_name, {}))
        await asyncio.sleep(self.delay_s)
        return await super()._infer(request, context)


async def test_stuck_copy_is_cut_short_retried_elsewhere_and_ejected(router_with, pods) -> None:
    """Regression: a request routed to a stuck pod waited out the caller's whole deadline; now
    the attempt is cut at attempt_timeout_s and retried on the other copy, and after
    eject_after_failures of them the stuck pod gets no more requests."""
    stuck = await SlowPod("pod-stuck", 3600).start()
    good = await pods("pod-good")
    try:
        async with router_with(attempt_timeout_s=0.3, eject_after_failures=2, ejection_s=60) as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-stuck", stuck.address)
            await router.add_copy("m", "pod-good", good.address)
            await _wait_copies(router, "m", 2)
            for _ in range(200):  # until random picks have sent it 2 (bounded)
                resp = await router.infer("m", deadline_s=5)
                assert resp.id == "pod-good"  # never the caller's failure
                if len(stuck.calls) == 2:
                    break
            assert len(stuck.calls) == 2
            assert router.sample("mesh_router_ejections_total") == 1
            for _ in range(30):
                assert (await router.infer("m", deadline_s=5)).id == "pod-good"
            assert len(stuck.calls) == 2  # ejected: not picked again
            assert router.sample("mesh_forward_retries_total") == 2
    finally:
        await stuck.stop()


async def test_the_last_copy_gets_the_callers_whole_budget(router_with) -> None:
    """The attempt timeout applies only while another copy is left: a slow answer from the only
    copy (say, the first request after a load) is waited for, not cut short."""
    slow = await SlowPod("pod-slow", 0.6).start()
    try:
        async with router_with(attempt_timeout_s=0.1) as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-slow", slow.address)
            await router.wait_model_ready("m")
            assert (await router.infer("m", deadline_s=10)).id == "pod-slow"
            assert router.sample("mesh_router_ejections_total") == 0
    finally:
        await slow.stop()


async def test_failed_only_copy_is_reloaded_on_another_pod(router: Router, pods) -> None:
    """Regression (issue 9, "the retry that cannot reload"): the only copy's pod is dead but its
    record lingers (lease not lapsed); the retry asked for a load without saying which copy
    failed, placement answered with that same copy at once, and the request failed
    UNAVAILABLE. Now the miss names the dead pod and waits for a copy elsewhere."""
    dead = await pods("pod-dead")
    address = dead.address
    await dead.stop()  # connection refused from now on; its records stay in etcd
    fresh = await pods("pod-fresh")
    placement = await FakePlacement(router, fresh).start()
    placement.release.set()
    try:
        await _register(router, "m")
        await router.add_copy("m", "pod-dead", address)
        await router.wait_model_ready("m")
        resp = await router.infer("m", deadline_s=10)
        assert resp.id == "pod-fresh"
        assert placement.excluded == [["pod-dead"]]
    finally:
        await placement.stop()


async def test_miss_without_a_leader_fails_fast_unavailable(router_with) -> None:
    """Regression: with no placement leader a miss waited out the caller's whole deadline; now
    it waits leader_wait_s for one, then answers UNAVAILABLE (retry)."""
    async with router_with(leader_wait_s=0.3) as router:
        await _register(router, "orphan")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.infer("orphan", deadline_s=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "MESH_ROUTER_LEADER_WAIT_S" in (err.value.details() or "")


class CopyGonePod(FakePod):
    """Answers ModelInfer UNAVAILABLE the way a real pod's status mapping does when the copy
    has just left it ("not loaded on this pod"): with the mesh-error trailing marker."""

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls.append((pb.ModelInferRequest.FromString(request).model_name, {}))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "model m is not loaded on this pod",
                            trailing_metadata=(("mesh-error", "unavailable"),))
        raise AssertionError("unreachable")


async def test_a_pod_answering_unavailable_itself_is_not_ejected(router_with, pods) -> None:
    """Regression (fault suite F19): a pod's own UNAVAILABLE ("not loaded on this pod", after an
    eviction) counted as unreachable, so the live pod was ejected and a model it was then asked
    to load never got a request. Such answers are retried elsewhere, but eject nothing."""
    gone = await CopyGonePod("pod-gone").start()
    good = await pods("pod-good")
    try:
        async with router_with(eject_after_failures=2, ejection_s=60) as router:
            await _register(router, "m")
            await router.add_copy("m", "pod-gone", gone.address)
            await router.add_copy("m", "pod-good", good.address)
            await _wait_copies(router, "m", 2)
            for _ in range(200):  # until random picks have sent it 3 (bounded)
                assert (await router.infer("m", deadline_s=5)).id == "pod-good"
                if len(gone.calls) >= 3:
                    break
            assert len(gone.calls) >= 3
            assert router.sample("mesh_router_ejections_total") == 0
    finally:
        await gone.stop()
