"""Tenancy end to end: a router served in-process over the session's real etcd, authenticating
real bearer tokens (records in etcd), forwarding to real gRPC pods (tests/integration/router's
FakePod: a grpc.aio server recording what reaches it).

Another tenant's model must answer exactly as an absent one on every public RPC, N attempts out
of N; each quota answers RESOURCE_EXHAUSTED naming itself (the rate quota with a retry hint).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from prometheus_client import generate_latest
from tritonclient.grpc import service_pb2 as pb

from mesh import credentials, types
from mesh.pb.v1 import registry_pb2, types_pb2
from mesh.types import TokenRecord

from .router.conftest import FakePod, Router, serve_router

pytestmark = pytest.mark.integration

N = 20  # cross-tenant attempts per RPC
ADMIN = credentials.new_token()


@contextlib.asynccontextmanager
async def mesh(etcd_endpoint: str, mesh_root: str, tmp_path: pathlib.Path, **settings: object) -> AsyncIterator[Tenants]:
    async with serve_router(etcd_endpoint, mesh_root, admin_token_sha256=credentials.digest(ADMIN), allow_anonymous=True,
                            **settings) as router:
        t = Tenants(router)
        for tenant in ("acme", "bob"):
            await t.token(tenant)
        yield t


class Tenants:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.tokens: dict[str, str] = {}
        self.uri = "https://models.invalid/m.onnx"  # never fetched: the pods here are fakes

    async def token(self, tenant: str) -> None:
        token = credentials.new_token()
        keys = self.router.keys
        await self.router.etcd.put(keys.token(credentials.digest(token)), types.encode(TokenRecord(tenant=tenant)))
        self.tokens[tenant] = token
        async with asyncio.timeout(10):  # until this router's view has the token
            while True:
                try:
                    await self.router.registry.ListModels(registry_pb2.ListModelsRequest(), metadata=self.md(tenant))
                    return
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
                    await asyncio.sleep(0.02)

    def md(self, who: str) -> tuple[tuple[str, str], ...]:
        """Metadata of `who`: a tenant's token, "admin", or "" (no token: the default tenant)."""
        if who == "admin":
            return credentials.metadata(ADMIN)
        return credentials.metadata(self.tokens[who]) if who else ()

    async def register(self, who: str, model_id: str, **kw: object) -> types_pb2.ModelStatus:
        spec = types_pb2.ModelSpec(model_id=model_id, storage_uri=self.uri, **kw)  # type: ignore[arg-type]
        return await self.router.registry.RegisterModel(
            registry_pb2.RegisterModelRequest(spec=spec), metadata=self.md(who), timeout=10)

    async def infer(self, who: str, name: str, header: str = "") -> pb.ModelInferResponse:
        md = self.md(who) + ((("mm-model-id", header),) if header else ())
        return await self.router.infer(name, metadata=md)

    async def ready(self, who: str, name: str) -> bool:
        call = self.router.v2("ModelReady", pb.ModelReadyResponse)
        return (await call(pb.ModelReadyRequest(name=name), metadata=self.md(who), timeout=10)).ready

    async def wait_ready(self, who: str, name: str) -> None:
        async with asyncio.timeout(10):
            while not await self.ready(who, name):  # noqa: ASYNC110 - polls the router over gRPC
                await asyncio.sleep(0.02)


async def _same_as_absent(make: Callable[[str], Awaitable[object]], name: str, absent: str) -> None:
    """`make(name)` fails exactly as `make(absent)` does (an id nobody has): NOT_FOUND, the same
    message but for the id."""
    got, never = await _code(make(name)), await _code(make(absent))
    assert got[0] == never[0] == grpc.StatusCode.NOT_FOUND, (name, got)
    assert got[1].replace(name, "<id>") == never[1].replace(absent, "<id>"), (got, never)


async def _code(aw: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await aw  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


async def _stream(t: Tenants, who: str, name: str) -> str:
    call = t.router.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(), response_deserializer=pb.ModelStreamInferResponse.FromString)
    request = pb.ModelInferRequest(model_name=name, id="s1")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\x00" * 16)
    stream = call(iter([request]), metadata=t.md(who), timeout=10)
    responses = [r async for r in stream]
    assert len(responses) == 1
    return responses[0].error_message or responses[0].infer_response.model_name


async def test_other_tenants_models_answer_as_absent_on_every_rpc(
    etcd_endpoint: str, mesh_root: str, tmp_path: pathlib.Path
) -> None:
    pod = await FakePod("pod-a").start()
    try:
        async with mesh(etcd_endpoint, mesh_root, tmp_path) as t:
            status = await t.register("acme", "m1", labels={"owner": "acme"})
            assert status.spec.model_id == "m1" and status.spec.tenant == "acme"
            await t.router.add_copy("acme:m1", "pod-a", pod.address)  # the mesh's id of acme's m1
            await t.wait_ready("acme", "m1")

            # the owner: its id in, its id out; the pod saw the internal id
            answer = await t.infer("acme", "m1")
            assert answer.model_name == "m1" and answer.id == "pod-a"
            assert pod.calls[-1][0] == "acme:m1"
            assert (await t.infer("acme", "ignored", header="m1")).model_name == "m1"
            assert await _stream(t, "acme", "m1") == "m1"

            reg = t.router.registry
            get = reg.GetModel
            ready = t.router.v2("ModelReady", pb.ModelReadyResponse)
            meta = t.router.v2("ModelMetadata", pb.ModelMetadataResponse)
            crossed = 0
            for i in range(N):
                who = ("bob", "")[i % 2]  # another tenant's token, and an anonymous caller
                for name in ("m1", "acme:m1"):
                    absent = f"nothing-{i}" if name == "m1" else f"acme:nothing-{i}"
                    md = t.md(who)
                    for make in (
                        lambda n, md=md: get(registry_pb2.GetModelRequest(model_id=n), metadata=md, timeout=10),
                        lambda n, md=md: ready(pb.ModelReadyRequest(name=n), metadata=md, timeout=10),
                        lambda n, md=md: meta(pb.ModelMetadataRequest(name=n), metadata=md, timeout=10),
                        lambda n, who=who: t.infer(who, n),
                        lambda n, who=who: t.infer(who, "x", header=n),
                    ):
                        await _same_as_absent(make, name, absent)
                    got, never = await _stream(t, who, name), await _stream(t, who, absent)
                    assert got.startswith("NOT_FOUND") and got.replace(name, "<id>") == never.replace(absent, "<id>")
                    gone = await reg.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="m1"),
                                                     metadata=md, timeout=10)
                    assert not gone.existed
                    listed = await reg.ListModels(registry_pb2.ListModelsRequest(tenant="acme"), metadata=md, timeout=10)
                    assert not listed.models
                    crossed += 1
            assert crossed == 2 * N
            assert len(pod.calls) == 3  # not one cross-tenant request reached the pod
            assert all("authorization" not in md for _, md in pod.calls)  # nor any caller's token

            # bob registers the same id: its own model, nothing revealed, acme's untouched
            mine = await t.register("bob", "m1", labels={"owner": "bob"})
            assert mine.spec.model_id == "m1" and mine.spec.tenant == "bob" and mine.state == types_pb2.NOT_LOADED
            got = await reg.GetModel(registry_pb2.GetModelRequest(model_id="m1"), metadata=t.md("acme"), timeout=10)
            assert got.spec.labels["owner"] == "acme" and got.state == types_pb2.MODEL_LOADED
            assert (await t.infer("acme", "m1")).model_name == "m1"

            # the admin sees both, by the mesh's ids
            every = await reg.ListModels(registry_pb2.ListModelsRequest(), metadata=t.md("admin"), timeout=10)
            assert [(m.spec.model_id, m.spec.tenant) for m in every.models] == [("acme:m1", "acme"), ("bob:m1", "bob")]
            assert (await t.infer("admin", "acme:m1")).model_name == "acme:m1"

            # metrics name no model and no tenant
            text = generate_latest(t.router.metrics.registry).decode()
            assert "acme" not in text and "m1" not in text and "bob" not in text
    finally:
        await pod.stop()


async def test_quota_codes(etcd_endpoint: str, mesh_root: str, tmp_path: pathlib.Path) -> None:
    release = asyncio.Event()
    pod = await SlowPod("pod-a", release).start()
    try:
        async with mesh(etcd_endpoint, mesh_root, tmp_path) as t:
            reg = t.router.registry
            await t.register("acme", "m1")
            await t.router.add_copy("acme:m1", "pod-a", pod.address)
            release.set()
            await t.wait_ready("acme", "m1")

            # the admin API is admin-only
            for who in ("acme", ""):
                code, _ = await _code(reg.ListTenants(registry_pb2.ListTenantsRequest(), metadata=t.md(who), timeout=10))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                code, _ = await _code(reg.SetTenant(registry_pb2.SetTenantRequest(
                    spec=registry_pb2.TenantSpec(tenant=who or "x", max_models=100)), metadata=t.md(who), timeout=10))
                assert code == grpc.StatusCode.PERMISSION_DENIED
                code, _ = await _code(reg.GetTenant(registry_pb2.GetTenantRequest(tenant="acme"), metadata=t.md(who), timeout=10))
                assert code == grpc.StatusCode.PERMISSION_DENIED

            admin = t.md("admin")

            async def quotas(**spec: object) -> registry_pb2.TenantStatus:
                return await reg.SetTenant(registry_pb2.SetTenantRequest(
                    spec=registry_pb2.TenantSpec(tenant="acme", **spec)), metadata=admin, timeout=10)  # type: ignore[arg-type]

            # registered models
            status = await quotas(max_models=1)
            assert not status.defaults and status.registered_models == 1 and status.spec.max_models == 1
            code, details = await _code(t.register("acme", "m2"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("tenant quota: 1 registered models")
            await t.register("acme", "m1")  # a retry of the existing registration is still OK
            await t.register("bob", "m2")  # bob's own quota (none)

            # request rate: a bucket of one request, refilled every 100 s (no test waits that long)
            await quotas(max_models=1, max_requests_per_s=0.01)
            await t.infer("acme", "m1")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await t.infer("acme", "m1")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tenant quota: 0.01 requests/s per router" in (err.value.details() or "")
            hint = dict(err.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            assert hint is not None and 90_000 < int(hint) <= 100_000  # when the next token is due
            streamed = await _stream(t, "acme", "m1")
            assert streamed.startswith("RESOURCE_EXHAUSTED: tenant quota: 0.01 requests/s")

            # requests in flight: the pod holds requests until released
            await quotas(max_in_flight=1)
            release.clear()
            held = asyncio.ensure_future(t.infer("acme", "m1"))
            async with asyncio.timeout(10):
                while not pod.waiting:  # noqa: ASYNC110 - a condition on the pod, polled briefly
                    await asyncio.sleep(0.01)
            code, details = await _code(t.infer("acme", "m1"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details.startswith("tenant quota: 1 requests in flight per router")
            release.set()
            assert (await held).model_name == "m1"
            assert (await t.infer("acme", "m1")).model_name == "m1"  # room again

            # the default tenant gets the router's defaults, shown as such
            got = await reg.GetTenant(registry_pb2.GetTenantRequest(tenant=""), metadata=admin, timeout=10)
            assert got.defaults and got.spec.max_in_flight == 0
            listed = await reg.ListTenants(registry_pb2.ListTenantsRequest(), metadata=admin, timeout=10)
            assert [s.spec.tenant for s in listed.tenants] == ["acme", "bob"]
            gone = await reg.DeleteTenant(registry_pb2.DeleteTenantRequest(tenant="acme"), metadata=admin, timeout=10)
            assert gone.existed
            await t.register("acme", "m2")  # the defaults (no limit) apply again
            assert t.router.sample("mesh_shed_total", {"service": "router", "reason": "tenant_rate"}) == 2
            assert t.router.sample("mesh_shed_total", {"service": "router", "reason": "tenant_in_flight"}) == 1
    finally:
        await pod.stop()


async def test_default_quotas_from_settings(etcd_endpoint: str, mesh_root: str, tmp_path: pathlib.Path) -> None:
    async with mesh(etcd_endpoint, mesh_root, tmp_path, tenant_max_models=2) as t:
        await t.register("bob", "a")
        await t.register("bob", "b")
        code, details = await _code(t.register("bob", "c"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant quota: 2 registered models" in details
        await t.register("acme", "c")


class SlowPod(FakePod):
    """Holds each request until `release` is set."""

    def __init__(self, name: str, release: asyncio.Event) -> None:
        super().__init__(name)
        self.release = release
        self.waiting: list[str] = []

    async def _infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = pb.ModelInferRequest.FromString(request)
        self.waiting.append(req.model_name)
        try:
            await self.release.wait()
        finally:
            self.waiting.remove(req.model_name)
        return await super()._infer(request, context)


# -- the whole mesh: real router, placement and runtime pods as processes, a real ONNX model ----


def test_tenants_on_a_real_mesh(etcd_endpoint: str, tmp_path: pathlib.Path, model_files: dict[str, pathlib.Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    """Tenant acme's model, served by a real pod, is invisible to bob and to anonymous callers
    on every RPC (N of N as absent); acme's rate quota, set with `mesh tenant set`, sheds with
    RESOURCE_EXHAUSTED and a retry hint."""
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    from mesh.cli import main as cli
    from mesh.pb.v1 import registry_pb2_grpc

    from .conftest import start_mesh

    folder = str(model_files["linear-0"].parent)
    m = start_mesh(tmp_path, etcd_endpoint, pods=1, capacity="256MiB", allow_anonymous=True,
                   env={"MESH_ROUTER_FILE_ROOTS": folder, "MESH_RUNTIME_FILE_ROOTS": folder})
    client = triton.InferenceServerClient(m.router_address)
    try:
        tokens = {t: credentials.new_token() for t in ("acme", "bob")}

        async def put_tokens() -> None:
            from mesh.kv.etcd import EtcdClient
            from mesh.kv.keys import Keys

            etcd = EtcdClient([etcd_endpoint])
            try:
                for tenant, token in tokens.items():
                    await etcd.put(Keys(m.root).token(credentials.digest(token)), types.encode(TokenRecord(tenant=tenant)))
            finally:
                await etcd.close()

        asyncio.run(put_tokens())
        headers = {t: {"authorization": f"Bearer {token}"} for t, token in tokens.items()}
        with m.router_channel() as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            spec = types_pb2.ModelSpec(model_id="lin", storage_uri=model_files["linear-0"].resolve().as_uri())
            for _ in range(100):  # until the router's view has acme's token
                try:
                    stub.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10,
                                       metadata=credentials.metadata(tokens["acme"]))
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
                    time.sleep(0.05)

        x = np.ones((2, 4), dtype=np.float32)

        def infer(name: str, who: str) -> triton.InferResult:
            inp = triton.InferInput("input", [2, 4], "FP32")
            inp.set_data_from_numpy(x)
            return client.infer(name, [inp], headers=headers.get(who), client_timeout=60)

        result = infer("lin", "acme")
        assert result.get_response().model_name == "lin" and result.as_numpy("output").shape[0] == 2
        for _ in range(200):  # the copy answered; this router's table shows it a moment later
            if client.is_model_ready("lin", headers=headers["acme"]):
                break
            time.sleep(0.05)
        assert client.is_model_ready("lin", headers=headers["acme"])
        assert client.get_model_metadata("lin", headers=headers["acme"]).inputs[0].name == "input"

        def failure(call: Callable[[], object]) -> tuple[str, str]:
            with pytest.raises(InferenceServerException) as err:
                call()
            return str(err.value.status()), err.value.message() or ""

        crossed = 0
        for i in range(N):
            who = ("bob", "")[i % 2]
            h = headers.get(who)
            for name in ("lin", "acme:lin"):
                absent = name.replace("lin", f"none{i}")
                for call in (lambda n, h=h: client.get_model_metadata(n, headers=h),
                             lambda n, who=who: infer(n, who)):
                    got = failure(lambda c=call, n=name: c(n))
                    never = failure(lambda c=call, n=absent: c(n))
                    assert got[0] == never[0] == "StatusCode.NOT_FOUND", got
                    assert got[1].replace(name, "<id>") == never[1].replace(absent, "<id>")
                crossed += 1
        assert crossed == 2 * N

        # acme's rate quota through the CLI (admin token), then a burst over it
        router, admin = ["--router", m.router_address], ["--token", m.token]
        with pytest.raises(SystemExit) as done:
            cli.main(["tenant", "set", "acme", "--max-requests-per-s", "0.01", *router, *admin])
        assert done.value.code == 0
        with pytest.raises(SystemExit) as done:
            cli.main(["tenant", "get", "acme", *router, *admin])
        assert done.value.code == 0
        row = capsys.readouterr().out.splitlines()[-1].split()
        assert row[:4] == ["acme", "1", "-", "0.01"] and row[-1] == "set"
        with pytest.raises(SystemExit) as done:  # only the quotas given change
            cli.main(["tenant", "set", "acme", "--max-models", "5", "--memory-cap", "1GiB", *router, *admin])
        assert done.value.code == 0
        row = capsys.readouterr().out.splitlines()[-1].split()
        assert row == ["acme", "1", "5", "0.01", "-", "-", "1.0GiB", "set"]
        with pytest.raises(SystemExit) as done:
            cli.main(["tenant", "list", *router, "--token", tokens["acme"]])
        assert done.value.code == 1 and "PERMISSION_DENIED" in capsys.readouterr().err

        shed = 0
        for _ in range(3):
            try:
                infer("lin", "acme")
            except InferenceServerException as exc:
                assert str(exc.status()) == "StatusCode.RESOURCE_EXHAUSTED"
                assert "tenant quota: 0.01 requests/s per router" in (exc.message() or "")
                shed += 1
        assert shed == 2  # a bucket of one request, refilled every 100 s
    finally:
        client.close()
        m.stop()
