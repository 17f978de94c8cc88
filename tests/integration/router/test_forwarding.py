"""V2 through the router: forwarding to fake pods, retries, pass-through, the miss path."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh import types
from mesh.pb.v1 import registry_pb2, types_pb2

from .conftest import FakePlacement, FakePod, Router

pytestmark = pytest.mark.integration


async def _register(router: Router, model_id: str) -> None:
    spec = types_pb2.ModelSpec(model_id=model_id, storage_uri=f"file:///models/{model_id}.onnx")
    await router.registry.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10)


async def _wait_copies(router: Router, model_id: str, count: int) -> None:
    async with asyncio.timeout(10):
        while True:
            status = await router.registry.GetModel(registry_pb2.GetModelRequest(model_id=model_id), timeout=5)
            if sum(c.state == types_pb2.LOADED for c in status.copies) >= count:
                return
            await asyncio.sleep(0.01)


async def test_control_methods(router: Router) -> None:
    live = await router.v2("ServerLive", pb.ServerLiveResponse)(pb.ServerLiveRequest(), timeout=5)
    assert live.live
    meta = await router.v2("ServerMetadata", pb.ServerMetadataResponse)(pb.ServerMetadataRequest(), timeout=5)
    assert meta.name == "meshserve" and meta.version
    await _register(router, "m1")
    # Not loaded anywhere, but loaded once before: answered from the registry and the stats
    # of that load, without loading it again (no placement runs in this test).
    tensor = {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    await router.etcd.put(router.keys.stats("m1"), types.encode(
        types.ModelStats(model_id="m1", size_bytes=1, inputs=(tensor,), outputs=({**tensor, "name": "output"},))))
    async with asyncio.timeout(10):  # until the router's view has the stats
        while (await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="m1"))).size_bytes != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    mm = await router.v2("ModelMetadata", pb.ModelMetadataResponse)(pb.ModelMetadataRequest(name="m1"), timeout=5)
    assert (mm.name, list(mm.versions), mm.platform) == ("m1", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in mm.inputs] == [("input", "FP32", [-1, 4])]
    assert [t.name for t in mm.outputs] == ["output"]
    for method, request in (("ModelMetadata", pb.ModelMetadataRequest(name="ghost")),
                            ("ModelReady", pb.ModelReadyRequest(name="ghost"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.v2(method, pb.ModelReadyResponse)(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_model_is_not_found(router: Router) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.infer("ghost-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost-model" in (err.value.details() or "")


async def test_malformed_request_is_invalid_argument(router: Router) -> None:
    call = router.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\x0a\x05ab", timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_forward_to_loaded_copy_and_header(router: Router, pods) -> None:
    pod = await pods("pod-a")
    await _register(router, "m1")
    await router.add_copy("m1", "pod-a", pod.address)
    await router.wait_model_ready("m1")

    resp = await router.infer("m1", metadata=(("x-request-id", "abc"),))
    assert (resp.model_name, resp.id) == ("m1", "pod-a")
    assert pod.calls[-1][1]["x-request-id"] == "abc"

    # the mm-model-id header routes, and the pod sees that id as model_name
    resp = await router.infer("", metadata=(("mm-model-id", "m1"),))
    assert resp.model_name == "m1"
    assert pod.calls[-1][0] == "m1"
    assert router.sample("mesh_cache_hits_total", {"service": "router"}) >= 2


async def test_unavailable_copy_is_retried_elsewhere(router: Router, pods) -> None:
    bad = await pods("pod-bad", grpc.StatusCode.UNAVAILABLE, "draining")
    good = await pods("pod-good")
    await _register(router, "m2")
    await router.add_copy("m2", "pod-bad", bad.address)
    await router.add_copy("m2", "pod-good", good.address)
    await _wait_copies(router, "m2", 2)
    async with asyncio.timeout(10):  # the random tie-break picks the bad copy first sometimes
        while not bad.calls:
            resp = await router.infer("m2")
            assert resp.id == "pod-good"
    assert router.sample("mesh_forward_retries_total") == len(bad.calls)


async def test_pod_status_passes_through(router: Router, pods) -> None:
    pod = await pods("pod-x", grpc.StatusCode.INVALID_ARGUMENT, "input 'x': expected FP32, got INT8")
    await _register(router, "m3")
    await router.add_copy("m3", "pod-x", pod.address)
    await router.wait_model_ready("m3")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.infer("m3")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "input 'x': expected FP32, got INT8"
    assert len(pod.calls) == 1


async def test_miss_loads_once_for_concurrent_requests(router: Router, pods) -> None:
    pod = await pods("pod-m")
    placement = await FakePlacement(router, pod).start()
    try:
        await _register(router, "cold")
        tasks = [asyncio.create_task(router.infer("cold")) for _ in range(20)]
        async with asyncio.timeout(10):  # every request has missed before the load answers
            while True:
                if router.sample("mesh_cache_misses_total", {"service": "router"}) == 20:
                    break
                await asyncio.sleep(0.01)
        placement.release.set()
        responses = await asyncio.gather(*tasks)
        assert {r.id for r in responses} == {"pod-m"}
        assert placement.calls == ["cold"]
        assert len(pod.calls) == 20
    finally:
        await placement.stop()


async def test_placement_refusal_passes_through(router: Router, pods) -> None:
    pod = await pods("pod-r")
    placement = await FakePlacement(router, pod, grpc.StatusCode.RESOURCE_EXHAUSTED).start()
    try:
        await _register(router, "huge")
        await router.wait_model_ready("huge", ready=False)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.infer("huge")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no pod has room" in (err.value.details() or "")
    finally:
        await placement.stop()


async def test_miss_without_leader_hits_deadline(router: Router) -> None:
    await _register(router, "orphan")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.infer("orphan", deadline_s=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_stream_infer_answers_in_order(router: Router, pods) -> None:
    pod = await pods("pod-s")
    await _register(router, "s1")
    await router.add_copy("s1", "pod-s", pod.address)
    await router.wait_model_ready("s1")
    call = router.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    names = ["s1", "ghost", "s1"]
    stream = call(iter(pb.ModelInferRequest(model_name=n, id=str(i)) for i, n in enumerate(names)), timeout=10)
    answers = [r async for r in stream]
    assert answers[0].infer_response.model_name == "s1" and not answers[0].error_message
    assert "ghost" in answers[1].error_message and "NOT_FOUND" in answers[1].error_message
    assert answers[2].infer_response.id == "pod-s"
    assert len(answers) == 3


class _GatedPod(FakePod):
    """Holds every ModelInfer until `n` are in flight, then answers the later ones first."""

    def __init__(self, name: str, n: int) -> None:
        super().__init__(name)
        self.n = n
        self.arrived = 0
        self.gate = asyncio.Event()

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = pb.ModelInferRequest.FromString(request)
        self.arrived += 1
        if self.arrived >= self.n:
            self.gate.set()
        await asyncio.wait_for(self.gate.wait(), 10)
        await asyncio.sleep(0.02 * (self.n - int(req.id)))  # earlier messages finish last
        return pb.ModelInferResponse(model_name=req.model_name, id=req.id).SerializeToString()


async def test_stream_infer_is_pipelined_and_keeps_order(router: Router) -> None:
    """ModelStreamInfer forwards several messages at once (the pod only answers once all 4 are
    in flight) and still answers them in the order they were sent."""
    pod = await _GatedPod("pod-g", 4).start()
    try:
        await _register(router, "g1")
        await router.add_copy("g1", "pod-g", pod.address)
        await router.wait_model_ready("g1")
        call = router.channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        stream = call(iter(pb.ModelInferRequest(model_name="g1", id=str(i)) for i in range(4)), timeout=20)
        answers = [r async for r in stream]
        assert [a.error_message for a in answers] == [""] * 4
        assert [a.infer_response.id for a in answers] == ["0", "1", "2", "3"]
    finally:
        await pod.stop()
