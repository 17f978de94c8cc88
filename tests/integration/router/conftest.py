"""A router served in the test's event loop over the session's etcd, fake runtime pods and a
fake placement leader (tiny grpc.aio servers), and raw-bytes V2 calls built with tritonclient's
messages (mesh.pb.inference must not be imported in the test process)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh import types
from mesh.cli import procs
from mesh.kv.etcd import EtcdClient
from mesh.kv.keys import Keys
from mesh.metrics import Metrics
from mesh.pb.v1 import internal_pb2, internal_pb2_grpc, registry_pb2_grpc
from mesh.settings import CommonSettings, RouterSettings
from mesh.types import CopyRecord, CopyState, InstanceRecord, LeaderRecord
from router.main import serve

V2 = "/inference.GRPCInferenceService/"
TEMP_ROOT = os.path.realpath(tempfile.gettempdir())  # a file root: tests register artifacts there


@dataclasses.dataclass
class Router:
    address: str
    channel: grpc.aio.Channel
    metrics: Metrics
    etcd: EtcdClient
    keys: Keys

    @property
    def registry(self) -> registry_pb2_grpc.ModelRegistryStub:
        return registry_pb2_grpc.ModelRegistryStub(self.channel)

    def v2(self, method: str, response_cls: type) -> grpc.aio.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(
            V2 + method, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )

    async def infer(self, model_name: str, metadata: tuple = (), deadline_s: float = 10) -> pb.ModelInferResponse:
        request = pb.ModelInferRequest(model_name=model_name, id="r1")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\x00" * 16)
        call = self.v2("ModelInfer", pb.ModelInferResponse)
        return await call(request, metadata=metadata, timeout=deadline_s)

    async def add_copy(self, model_id: str, instance_id: str, address: str,
                       state: CopyState = CopyState.LOADED) -> None:
        await self.etcd.put(self.keys.instance(instance_id), types.encode(
            InstanceRecord(instance_id=instance_id, address=address, capacity_bytes=1 << 30)))
        await self.etcd.put(self.keys.copy(model_id, instance_id), types.encode(
            CopyRecord(model_id=model_id, instance_id=instance_id, address=address, state=state)))

    async def wait_model_ready(self, model_id: str, ready: bool = True) -> None:
        call = self.v2("ModelReady", pb.ModelReadyResponse)
        async with asyncio.timeout(10):
            while True:
                if (await call(pb.ModelReadyRequest(name=model_id), timeout=5)).ready == ready:
                    return
                await asyncio.sleep(0.01)

    def sample(self, name: str, labels: dict | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
async def router(etcd_endpoint: str, mesh_root: str) -> AsyncIterator[Router]:
    async with serve_router(etcd_endpoint, mesh_root, allow_anonymous=True) as r:
        yield r


@pytest.fixture
def router_with(etcd_endpoint: str, mesh_root: str) -> Callable[..., contextlib.AbstractAsyncContextManager[Router]]:
    """`async with router_with(attempt_timeout_s=0.3) as r:` a router with settings changed
    (callers without a token admitted unless `allow_anonymous=False` is among them)."""
    return lambda **settings: serve_router(etcd_endpoint, mesh_root, **{"allow_anonymous": True, **settings})


@contextlib.asynccontextmanager
async def serve_router(etcd_endpoint: str, mesh_root: str, **overrides: object) -> AsyncIterator[Router]:
    port = procs.free_port()
    common = CommonSettings(etcd_endpoints=etcd_endpoint, root=mesh_root)
    overrides.setdefault("file_roots", f"/models,{TEMP_ROOT}")
    # These tests are of the Python router's own forwarding: no Envoy in front of it (the
    # LocalMesh-based tests run with Envoy where the binary is present; tests/integration/test_envoy.py)
    overrides.setdefault("envoy", "off")
    settings = RouterSettings(listen=f"127.0.0.1:{port}", default_deadline_s=10,
                              **overrides)  # type: ignore[arg-type]
    metrics = Metrics(service="router")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(common, settings, stop, metrics))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    etcd = EtcdClient([etcd_endpoint])
    r = Router(f"127.0.0.1:{port}", channel, metrics, etcd, Keys(mesh_root))
    ready = r.v2("ServerReady", pb.ServerReadyResponse)
    try:
        async with asyncio.timeout(15):
            while True:
                assert not task.done(), task
                try:
                    if (await ready(pb.ServerReadyRequest(), timeout=1)).ready:
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.02)
        yield r
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await channel.close()
        await etcd.delete_prefix(Keys(mesh_root).prefix())
        await etcd.close()


# -- fakes --------------------------------------------------------------------------------------

Behaviour = Callable[[pb.ModelInferRequest, grpc.aio.ServicerContext], Awaitable[None]]


class FakePod:
    """Answers ModelInfer with a canned response naming itself, or with a chosen status."""

    def __init__(self, name: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        self.name = name
        self.code = code
        self.details = details
        self.calls: list[tuple[str, dict]] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = pb.ModelInferRequest.FromString(request)
        self.calls.append((req.model_name, dict(context.invocation_metadata())))
        if self.code is not None:
            await context.abort(self.code, self.details)
        return pb.ModelInferResponse(model_name=req.model_name, id=self.name).SerializeToString()

    async def start(self) -> FakePod:
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer)}
        )
        self.server.add_generic_rpc_handlers([handler])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


class FakePlacement(internal_pb2_grpc.PlacementServicer):
    """EnsureLoaded: waits until released, then writes a LOADED copy on `pod` and answers."""

    def __init__(self, router: Router, pod: FakePod, code: grpc.StatusCode | None = None) -> None:
        self.router = router
        self.pod = pod
        self.code = code
        self.calls: list[str] = []
        self.excluded: list[list[str]] = []  # exclude_instances of each call
        self.release = asyncio.Event()
        self.server: grpc.aio.Server | None = None

    async def EnsureLoaded(self, request: internal_pb2.EnsureLoadedRequest,
                           context: grpc.aio.ServicerContext) -> internal_pb2.EnsureLoadedResponse:
        self.calls.append(request.model_id)
        self.excluded.append(list(request.exclude_instances))
        if self.code is not None:
            await context.abort(self.code, f"cannot load '{request.model_id}': no pod has room")
        await self.release.wait()
        await self.router.add_copy(request.model_id, self.pod.name, self.pod.address)
        return internal_pb2.EnsureLoadedResponse()

    async def start(self) -> FakePlacement:
        self.server = grpc.aio.server()
        internal_pb2_grpc.add_PlacementServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.router.etcd.put(self.router.keys.leader(), types.encode(
            LeaderRecord(holder_id="placement-0", address=f"127.0.0.1:{port}")))
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Awaitable[FakePod]]]:
    started: list[FakePod] = []

    async def make(name: str, code: grpc.StatusCode | None = None, details: str = "") -> FakePod:
        pod = await FakePod(name, code, details).start()
        started.append(pod)
        return pod

    yield make
    for pod in started:
        await pod.stop()
