"""Tenancy in the router: namespaced model ids (another tenant's model answers exactly as an
absent one) and the per-tenant quotas, over the real View and MeshState on an in-memory etcd,
with principals bound by hand (the authentication layer binds them in a real router)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Iterator

import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh import types
from mesh.clock import SystemClock
from mesh.errors import InvalidArgument, MeshError, NoCapacity, NotFound, Overloaded, PermissionDenied
from mesh.kv.keys import Keys
from mesh.kv.memory import MemoryStore
from mesh.kv.view import View
from mesh.metrics import Metrics
from mesh.settings import RouterSettings
from mesh.state import MeshState
from mesh.types import Decision, ModelSpec, TenantSpec
from router import auth, quota
from router.auth import Principal
from router.forward import Forwarder
from router.quota import Quotas, TenantStore
from router.registry import Registry
from router.table import RouteTable
from router.tenancy import Namespace, internal_id, public_id

A, B = Principal(tenant="acme", via="token"), Principal(tenant="bob", via="token")
DEFAULT, ADMIN = Principal(), Principal(admin=True, via="token")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, root: pathlib.Path, **settings: object) -> None:
        self.keys = Keys("/t")
        self.store = MemoryStore()
        self.view = View(self.store, self.keys.prefix())  # type: ignore[arg-type]
        self.state = MeshState(self.view, self.keys)
        self.settings = RouterSettings(file_roots=str(root), **settings)  # type: ignore[arg-type]
        self.metrics = Metrics(service="router")
        self.clock = Clock()
        self.quotas = Quotas(self.state, self.settings, self.metrics, clock=self.clock)
        self.registry = Registry(self.store, self.keys, self.state, self.settings, SystemClock(),  # type: ignore[arg-type]
                                 self.quotas)
        self.tenants = TenantStore(self.store, self.keys, self.state, self.quotas, 5.0)  # type: ignore[arg-type]
        self.uri = (root / "m.onnx").as_uri()
        (root / "m.onnx").write_bytes(b"onnx")

    def spec(self, model_id: str, **kw: object) -> ModelSpec:
        return ModelSpec(model_id=model_id, storage_uri=self.uri, **kw)  # type: ignore[arg-type]

    async def register(self, principal: Principal, model_id: str, **kw: object) -> ModelSpec:
        return (await self.registry.register(principal, self.spec(model_id, **kw), 5.0)).spec


@pytest.fixture
async def world(tmp_path: pathlib.Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    task = asyncio.create_task(w.view.run())
    await w.view.wait_synced(5.0)
    yield w
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    w.store.close()


@contextlib.contextmanager
def bound(principal: Principal) -> Iterator[None]:
    token = auth.bind(principal)
    try:
        yield
    finally:
        auth._CURRENT.reset(token)


def _error(fn: object, *args: object) -> MeshError:
    with pytest.raises(MeshError) as err:
        fn(*args)  # type: ignore[operator]
    return err.value


# -- ids --------------------------------------------------------------------------------------


def test_internal_ids_keep_the_default_tenants_ids() -> None:
    assert internal_id("", "m1") == "m1"
    assert internal_id("acme", "m1") == "acme:m1"
    assert public_id(ModelSpec("acme:m1", "file:///m", tenant="acme")) == "m1"
    assert public_id(ModelSpec("m1", "file:///m", tenant="acme")) == "m1"  # pre-namespacing record
    assert public_id(ModelSpec("m1", "file:///m")) == "m1"


async def test_same_id_in_two_tenants_are_two_models(world: World) -> None:
    """Registering an id another tenant uses neither collides nor reveals the other: both OK."""
    a = await world.register(A, "m1", labels={"who": "a"})
    b = await world.register(B, "m1", labels={"who": "b"})
    assert a.model_id == b.model_id == "m1" and (a.tenant, b.tenant) == ("acme", "bob")
    assert set(world.state.models) == {"acme:m1", "bob:m1"}
    assert world.registry.get(A, "m1").spec.labels == {"who": "a"}
    assert world.registry.get(B, "m1").spec.labels == {"who": "b"}
    assert world.registry.get(ADMIN, "bob:m1").spec.model_id == "bob:m1"


async def test_other_tenants_model_answers_exactly_as_absent(world: World) -> None:
    """N cross-tenant GetModel attempts out of N get the very NOT_FOUND an id nobody has gets
    (same kind, same message but for the id), whatever form the id takes."""
    await world.register(A, "secret")
    await world.register(DEFAULT, "plain")
    attempts = [(B, "secret", "nothing"), (DEFAULT, "secret", "nothing"), (B, "acme:secret", "acme:nothing"),
                (DEFAULT, "acme:secret", "acme:nothing"), (B, "plain", "nothing"), (A, "plain", "nothing")]
    for principal, name, absent in attempts:
        crossed, never = _error(world.registry.get, principal, name), _error(world.registry.get, principal, absent)
        assert isinstance(crossed, NotFound) and type(crossed) is type(never), (principal, name)
        assert crossed.message.replace(name, "<id>") == never.message.replace(absent, "<id>")


async def test_lists_show_only_the_callers_models(world: World) -> None:
    for i in range(3):
        await world.register(A, f"a{i}")
        await world.register(B, f"b{i}")
    await world.register(DEFAULT, "d0")
    ids = lambda p, tenant="": [s.spec.model_id for s in world.registry.list(p, 0, "", tenant, {})[0]]  # noqa: E731
    assert ids(A) == ["a0", "a1", "a2"]
    assert ids(B) == ["b0", "b1", "b2"]
    assert ids(DEFAULT) == ["d0"]
    assert ids(A, "bob") == [] and ids(DEFAULT, "acme") == []  # another tenant's filter: as if empty
    assert ids(ADMIN) == ["acme:a0", "acme:a1", "acme:a2", "bob:b0", "bob:b1", "bob:b2", "d0"]
    assert ids(ADMIN, "bob") == ["bob:b0", "bob:b1", "bob:b2"]
    page, token = world.registry.list(A, 2, "", "", {})
    assert [s.spec.model_id for s in page] == ["a0", "a1"] and token == "a1"
    assert [s.spec.model_id for s in world.registry.list(A, 2, token, "", {})[0]] == ["a2"]


async def test_unregister_another_tenants_model_is_like_absent_and_touches_nothing(world: World) -> None:
    await world.register(A, "m1")
    assert await world.registry.unregister(B, "m1", 5.0) is False
    assert await world.registry.unregister(DEFAULT, "m1", 5.0) is False
    assert await world.registry.unregister(B, "never", 5.0) is False
    assert "acme:m1" in world.state.models and "/t/models/acme:m1" in world.store.snapshot()
    assert await world.registry.unregister(A, "m1", 5.0) is True
    assert "acme:m1" not in world.state.models


async def test_registration_into_another_tenant_is_refused(world: World) -> None:
    with pytest.raises(PermissionDenied):
        await world.register(A, "m1", tenant="bob")
    with pytest.raises(PermissionDenied):
        await world.register(DEFAULT, "m1", tenant="bob")
    with pytest.raises(InvalidArgument, match="invalid model_id"):
        await world.register(A, "bob:m1")  # ':' is never part of a public id
    own = await world.register(A, "m2", tenant="acme")
    assert own.model_id == "m2" and own.tenant == "acme"


async def test_admin_registers_for_a_tenant(world: World) -> None:
    assert (await world.register(ADMIN, "m1", tenant="acme")).model_id == "acme:m1"
    assert (await world.register(ADMIN, "bob:m1")).tenant == "bob"
    assert world.registry.get(A, "m1").spec.model_id == "m1"
    assert world.registry.get(B, "m1").spec.tenant == "bob"
    with pytest.raises(InvalidArgument, match="give one"):
        await world.register(ADMIN, "bob:m2", tenant="acme")


async def test_pre_namespacing_records_stay_their_tenants(world: World) -> None:
    """A model registered with a tenant before ids were namespaced (key models/old)."""
    await world.store.put(world.keys.model("old"), types.encode(ModelSpec("old", world.uri, tenant="acme")))
    await world.state.wait_for(lambda: "old" in world.state.models, 5)
    assert world.registry.get(A, "old").spec.model_id == "old"
    assert isinstance(_error(world.registry.get, DEFAULT, "old"), NotFound)
    assert await world.registry.unregister(DEFAULT, "old", 5.0) is False
    assert "old" in world.state.models
    assert (await world.register(A, "old")).model_id == "old"  # the same spec again: OK, same key


async def test_decision_text_never_names_another_tenants_model(world: World) -> None:
    await world.register(A, "m1")
    await world.register(B, "big")
    reason = "evicted for model 'bob:big': idle 30 s; model 'acme:m1' was cheapest"
    await world.store.put(world.keys.decision("acme:m1"), types.encode(Decision("acme:m1", "evicted", "pod-1", reason)))
    await world.state.wait_for(lambda: "acme:m1" in world.state.decisions, 5)
    shown = world.registry.get(A, "m1").decision
    assert shown is not None and "bob" not in shown.reason and "big" not in shown.reason
    assert shown.reason == "evicted for another model: idle 30 s; model 'm1' was cheapest"
    assert world.registry.get(ADMIN, "acme:m1").decision.reason == reason  # type: ignore[union-attr]


# -- the data path ------------------------------------------------------------------------------


def _request(name: str) -> bytes:
    req = pb.ModelInferRequest(model_name=name, id="r1")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\x00" * 16)
    return req.SerializeToString()


async def test_forwarded_request_names_the_internal_id_and_the_answer_the_public_one(world: World) -> None:
    await world.register(A, "m1")
    await world.register(DEFAULT, "d1")
    ns = Namespace(world.state)
    public, spec, out = ns.route(A, (), _request("m1"))
    assert public == "m1" and spec is not None
    assert pb.ModelInferRequest.FromString(out).model_name == "acme:m1"
    answer = pb.ModelInferResponse(model_name="acme:m1", id="r1").SerializeToString()
    back = pb.ModelInferResponse.FromString(ns.response(public, spec.model_id, answer))
    assert back.model_name == "m1" and back.id == "r1"
    # by header: one field appended, naming the internal id
    _, spec, out = ns.route(A, (("mm-model-id", "m1"),), _request("whatever"))
    assert pb.ModelInferRequest.FromString(out).model_name == "acme:m1"
    # the default tenant's request and answer pass untouched (no copy, no append)
    raw = _request("d1")
    public, spec, out = ns.route(DEFAULT, (), raw)
    assert out is raw and spec is not None and ns.response(public, spec.model_id, answer) is answer
    assert ns.route(B, (), _request("m1"))[1] is None
    assert ns.route(DEFAULT, (), _request("acme:m1"))[1] is None


async def test_infer_of_another_tenants_model_is_the_absent_error(world: World) -> None:
    await world.register(A, "m1")
    table = RouteTable(world.state, world.metrics)
    table.synced = True
    forwarder = Forwarder(world.state, table, None, None, world.settings, world.metrics,  # type: ignore[arg-type]
                          quotas=world.quotas)
    for principal, name, absent in [(B, "m1", "m0"), (DEFAULT, "m1", "m0"), (DEFAULT, "acme:m1", "acme:m0")]:
        errors = []
        for n in (name, absent):
            with bound(principal), pytest.raises(NotFound) as err:
                await forwarder.infer(_request(n), (), 5.0)
            errors.append(err.value.message.replace(n, "<id>"))
        assert errors[0] == errors[1], (principal, name)


# -- quotas ---------------------------------------------------------------------------------------


async def test_rate_quota_is_a_token_bucket_with_a_retry_hint(world: World) -> None:
    await world.tenants.set(TenantSpec("acme", max_requests_per_s=2), 5.0)
    q, clock = world.quotas, world.clock
    for _ in range(2):
        q.done(q.admit(A), clock())
    with pytest.raises(Overloaded) as err:
        q.admit(A)
    assert "tenant quota: 2 requests/s per router" in err.value.message
    assert err.value.retry_after_ms == 500 and err.value.kind.value == "RESOURCE_EXHAUSTED"
    q.done(q.admit(B), clock())  # another tenant (no quota) is not affected
    clock.now += 0.5
    q.done(q.admit(A), clock())
    with pytest.raises(Overloaded):
        q.admit(A)
    assert q.admit(ADMIN) is None  # admins are exempt
    assert world.metrics.registry.get_sample_value(
        "mesh_shed_total", {"service": "router", "reason": "tenant_rate"}) == 2


async def test_in_flight_quota(world: World) -> None:
    await world.tenants.set(TenantSpec("acme", max_in_flight=2), 5.0)
    q = world.quotas
    held = [q.admit(A), q.admit(A)]
    with pytest.raises(Overloaded) as err:
        q.admit(A)
    assert "tenant quota: 2 requests in flight per router" in err.value.message
    q.done(held.pop(), world.clock())
    held.append(q.admit(A))
    assert world.metrics.registry.get_sample_value(
        "mesh_shed_total", {"service": "router", "reason": "tenant_in_flight"}) == 1


async def test_defaults_apply_to_tenants_without_quotas(tmp_path: pathlib.Path) -> None:
    w = World(tmp_path, tenant_max_in_flight=1, tenant_max_requests_per_s=1000)
    w.quotas.admit(DEFAULT)
    with pytest.raises(Overloaded, match="1 requests in flight"):
        w.quotas.admit(DEFAULT)
    w.state.tenants[""] = TenantSpec("", max_in_flight=5)  # its own quotas replace the defaults
    w.quotas.admit(DEFAULT)


async def test_registered_models_quota(world: World) -> None:
    await world.tenants.set(TenantSpec("acme", max_models=2), 5.0)
    await world.register(A, "m1")
    await world.register(A, "m2")
    with pytest.raises(NoCapacity) as err:
        await world.register(A, "m3")
    assert err.value.message.startswith("tenant quota: 2 registered models")
    await world.register(A, "m2")  # retrying an existing registration is never refused
    await world.register(B, "m3")  # another tenant's count is its own
    await world.registry.unregister(A, "m1", 5.0)
    await world.register(A, "m3")


async def test_concurrent_registrations_stop_at_the_quota(world: World) -> None:
    await world.tenants.set(TenantSpec("acme", max_models=3), 5.0)
    results = await asyncio.gather(*(world.register(A, f"m{i}") for i in range(8)), return_exceptions=True)
    assert sum(isinstance(r, ModelSpec) for r in results) == 3
    assert all(isinstance(r, (ModelSpec, NoCapacity)) for r in results)


async def test_tenant_store(world: World) -> None:
    await world.register(A, "m1")
    spec, defaults, count = world.tenants.get("acme")
    assert defaults and count == 1 and spec.max_models == 0
    await world.tenants.set(TenantSpec("acme", max_models=5, max_requests_per_s=2.5), 5.0)
    assert world.tenants.get("acme") == (TenantSpec("acme", max_models=5, max_requests_per_s=2.5), False, 1)
    assert [t[0].tenant for t in world.tenants.list()] == ["acme"]
    assert await world.tenants.delete("acme", 5.0) and world.tenants.get("acme")[1]
    # the default tenant's quotas live at tenants/ itself
    await world.tenants.set(TenantSpec("", max_in_flight=3), 5.0)
    assert world.state.tenants[""].max_in_flight == 3 and world.quotas.of("").max_in_flight == 3
    assert "/t/tenants/" in world.store.snapshot()


@pytest.mark.parametrize("bad", [
    TenantSpec("-x"), TenantSpec("a:b"), TenantSpec("a", max_models=-1),
    TenantSpec("a", max_requests_per_s=float("nan")), TenantSpec("a", max_requests_per_s=-1),
    TenantSpec("a", memory_reserved_bytes=10, memory_cap_bytes=5),
])
def test_bad_tenant_specs_are_invalid_argument(bad: TenantSpec) -> None:
    with pytest.raises(InvalidArgument):
        quota.validate(bad)
