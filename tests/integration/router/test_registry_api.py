"""mesh.v1.ModelRegistry end to end: router served in-process over a real etcd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from mesh import credentials, types
from mesh.pb.v1 import registry_pb2, types_pb2
from mesh.types import CopyState, ModelSpec

from .conftest import Router

pytestmark = pytest.mark.integration


def _spec(model_id: str, uri: str = "file:///models/m.onnx", **kw: object) -> types_pb2.ModelSpec:
    return types_pb2.ModelSpec(model_id=model_id, storage_uri=uri, **kw)  # type: ignore[arg-type]


async def _register(router: Router, spec: types_pb2.ModelSpec) -> types_pb2.ModelStatus:
    return await router.registry.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10)


async def test_register_get_and_unregister(router: Router) -> None:
    status = await _register(router, _spec("m1", sha256="AB" * 32, labels={"team": "x"}))
    assert status.spec.model_id == "m1" and status.spec.format == "onnx"
    assert status.spec.sha256 == "ab" * 32
    assert status.state == types_pb2.NOT_LOADED

    got = await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="m1"), timeout=10)
    assert got.spec == status.spec and got.state == types_pb2.NOT_LOADED

    await router.add_copy("m1", "pod-a", "127.0.0.1:1", CopyState.LOADED)
    await router.wait_model_ready("m1")
    got = await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="m1"), timeout=10)
    assert got.state == types_pb2.MODEL_LOADED
    assert [(c.instance_id, c.state) for c in got.copies] == [("pod-a", types_pb2.LOADED)]

    gone = await router.registry.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="m1"), timeout=10)
    assert gone.existed
    again = await router.registry.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id="m1"), timeout=10)
    assert not again.existed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="m1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_duplicate_is_already_exists(router: Router) -> None:
    await _register(router, _spec("dup"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _register(router, _spec("dup", uri="file:///models/other.onnx"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "model 'dup' is already registered" in (err.value.details() or "")


async def test_retried_registration_of_the_same_spec_is_ok(router: Router, tmp_path) -> None:
    """A client whose RegisterModel timed out or was answered UNAVAILABLE (the write may have
    happened) retries it: the identical spec answers OK, not ALREADY_EXISTS."""
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"\x08" * 321)
    spec = _spec("again", uri=artifact.as_uri(), sha256="AB" * 32, labels={"team": "x"})
    first = await _register(router, spec)
    second = await _register(router, spec)
    assert second.spec == first.spec
    got = await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="again"), timeout=10)
    assert got.spec == first.spec
    # The artifact's size is recorded (for placement), inside the mesh only.
    stored = await router.etcd.get(router.keys.model("again"))
    assert stored is not None and types.decode(ModelSpec, stored.value).artifact_bytes == 321


@pytest.mark.parametrize(
    "spec, word",
    [
        (_spec("bad/id"), "model_id"),
        (_spec(".."), "model_id"),
        (_spec("m", uri="gopher://h/m.onnx"), "scheme"),
        (_spec("m", uri="file://relative/m.onnx"), "absolute"),
        (_spec("m", sha256="1234"), "sha256"),
        (_spec("m", format="pytorch"), "format"),
    ],
)
async def test_invalid_specs(router: Router, spec: types_pb2.ModelSpec, word: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _register(router, spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert word in (err.value.details() or "")


async def test_get_unknown_is_not_found(router: Router) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await router.registry.GetModel(registry_pb2.GetModelRequest(model_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (err.value.details() or "")


async def test_list_pages_and_filters(router_with: Callable[..., Any]) -> None:
    """Paging and filters, as an admin (who sees every tenant's models, by the mesh's ids
    "<tenant>:<id>"; tenants' own views: tests/integration/test_tenancy.py)."""
    token = credentials.new_token()
    admin = credentials.metadata(token)
    async with router_with(admin_token_sha256=credentials.digest(token)) as router:
        for i in range(7):
            spec = _spec(f"m{i}", tenant="a" if i % 2 else "b", labels={"even": str(i % 2 == 0)})
            await router.registry.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), metadata=admin, timeout=10)
        seen: list[str] = []
        page_token = ""
        pages = 0
        while True:
            page = await router.registry.ListModels(
                registry_pb2.ListModelsRequest(page_size=3, page_token=page_token), metadata=admin, timeout=10)
            seen += [m.spec.model_id for m in page.models]
            pages += 1
            page_token = page.next_page_token
            if not page_token:
                break
        assert seen == sorted(f"{'a' if i % 2 else 'b'}:m{i}" for i in range(7)) and pages == 3

        tenant_a = await router.registry.ListModels(registry_pb2.ListModelsRequest(tenant="a"), metadata=admin, timeout=10)
        assert [m.spec.model_id for m in tenant_a.models] == ["a:m1", "a:m3", "a:m5"]
        assert tenant_a.next_page_token == ""

        labelled = await router.registry.ListModels(
            registry_pb2.ListModelsRequest(tenant="b", label_selector={"even": "True"}), metadata=admin, timeout=10)
        assert [m.spec.model_id for m in labelled.models] == ["b:m0", "b:m2", "b:m4", "b:m6"]
