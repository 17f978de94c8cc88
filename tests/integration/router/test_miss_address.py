"""The router forwards a miss to the copy placement answers with, before its own route table
shows it (the pod's LOADED record still on its way through etcd), but never to a pod its view
does not list at that address."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh import types
from mesh.pb.v1 import internal_pb2, registry_pb2, types_pb2
from mesh.types import InstanceRecord

from .conftest import FakePlacement, Router

pytestmark = pytest.mark.integration


class AnsweringPlacement(FakePlacement):
    """EnsureLoaded answers with a LOADED copy on `pod` and writes NO copy record: only the
    answer can tell the router where the copy is. `listed` writes the pod's instance record
    (at `listed_address`, default the pod's own) first."""

    listed = True
    listed_address = ""

    async def EnsureLoaded(self, request: internal_pb2.EnsureLoadedRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> internal_pb2.EnsureLoadedResponse:
        self.calls.append(request.model_id)
        if self.listed:
            record = InstanceRecord(self.pod.name, self.listed_address or self.pod.address, 1 << 30)
            await self.router.etcd.put(self.router.keys.instance(self.pod.name), types.encode(record))
            await asyncio.sleep(0.2)  # the router's view has the instance record by now
        copy = types_pb2.CopyStatus(instance_id=self.pod.name, address=self.pod.address, state=types_pb2.LOADED)
        return internal_pb2.EnsureLoadedResponse(copies=[copy])


async def _register(router: Router, model_id: str) -> None:
    spec = types_pb2.ModelSpec(model_id=model_id, storage_uri=f"file:///models/{model_id}.onnx")
    await router.registry.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10)


async def test_miss_is_forwarded_to_the_answered_copy(router: Router, pods) -> None:
    pod = await pods("pod-direct")
    placement = await AnsweringPlacement(router, pod).start()
    try:
        await _register(router, "fresh")
        response = await router.infer("fresh")
        assert response.id == "pod-direct" and [m for m, _ in pod.calls] == ["fresh"]
        assert placement.calls == ["fresh"]
    finally:
        await placement.stop()


@pytest.mark.parametrize("listed_address", ["", "127.0.0.1:1"], ids=["unlisted", "listed-elsewhere"])
async def test_answered_copy_on_a_pod_the_view_does_not_list_is_not_used(router: Router, pods,
                                                                         listed_address: str) -> None:
    pod = await pods("pod-gone")
    placement = AnsweringPlacement(router, pod)
    placement.listed = bool(listed_address)
    placement.listed_address = listed_address
    await placement.start()
    try:
        await _register(router, "stale")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.infer("stale", deadline_s=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert pod.calls == []
    finally:
        await placement.stop()
