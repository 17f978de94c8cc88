"""Model versions in the router (router/versions.py through router/tenancy.py and the
registry), over the real View and MeshState on an in-memory etcd: registration stores version
N ≥ 2 as its own model, model_version selects one ("" the highest), an unknown version is
NOT_FOUND, responses name the caller's model and the version that answered, and unregistering
without a version removes every version."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from mesh.errors import InvalidArgument, NotFound
from router import versions
from router.tenancy import Namespace
from tests.unit.router.test_tenancy import ADMIN, DEFAULT, A, B, World, world  # noqa: F401 - fixture

W = World


def _request(name: str, version: str = "") -> bytes:
    return pb.ModelInferRequest(model_name=name, model_version=version).SerializeToString()


def test_version_strings() -> None:
    assert versions.check("") == versions.check("1") == ""
    assert versions.check("2") == "2" and versions.check("007") == "7"
    for bad in ("0", "-1", "v2", "1.5", "²", "99999999999"):
        with pytest.raises(InvalidArgument):
            versions.check(bad)
    assert versions.concrete_id("m", "") == versions.concrete_id("m", "1") == "m"
    assert versions.concrete_id("acme:m", "3") == "acme:m@3"
    assert versions.split("acme:m@3") == ("acme:m", "3") and versions.split("m") == ("m", "1")


async def test_versions_are_models_and_empty_picks_the_highest(world: W) -> None:  # noqa: F811
    await world.register(DEFAULT, "m")
    await world.register(DEFAULT, "m", version="2")
    assert set(world.state.models) == {"m", "m@2"}
    ns = Namespace(world.state)
    assert ns.versions.versions("m") == ["1", "2"]
    for asked, served in (("", "m@2"), ("1", "m"), ("2", "m@2")):
        public, spec, out = ns.route(DEFAULT, (), _request("m", asked))
        assert public == "m" and spec is not None and spec.model_id == served
        forwarded = pb.ModelInferRequest.FromString(out)
        assert forwarded.model_name == served and forwarded.model_version == ""  # the pod serves one version
    with pytest.raises(NotFound, match="version '3' is not found"):
        ns.route(DEFAULT, (), _request("m", "3"))
    assert ns.route(DEFAULT, (), _request("nothing", "2"))[1] is None  # an unknown model: absent


async def test_response_names_the_model_and_the_version_that_answered(world: W) -> None:  # noqa: F811
    pod = pb.ModelInferResponse(model_name="m@2", model_version="1", id="x").SerializeToString()
    out = pb.ModelInferResponse.FromString(Namespace.response("m", "m@2", pod))
    assert (out.model_name, out.model_version, out.id) == ("m", "2", "x")
    plain = pb.ModelInferResponse(model_name="m", model_version="1").SerializeToString()
    assert Namespace.response("m", "m", plain) == plain  # unversioned: untouched bytes


async def test_only_version_2_registered(world: W) -> None:  # noqa: F811
    await world.register(DEFAULT, "m", version="2")
    ns = Namespace(world.state)
    assert ns.route(DEFAULT, (), _request("m"))[1].model_id == "m@2"  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        ns.route(DEFAULT, (), _request("m", "1"))
    status = world.registry.get(DEFAULT, "m")
    assert (status.spec.model_id, status.spec.version) == ("m", "2")


async def test_tenants_versions_stay_their_own(world: W) -> None:  # noqa: F811
    await world.register(A, "m")
    await world.register(A, "m", version="2")
    assert {"acme:m", "acme:m@2"} <= set(world.state.models)
    ns = Namespace(world.state)
    assert ns.route(A, (), _request("m"))[1].model_id == "acme:m@2"  # type: ignore[union-attr]
    assert ns.route(ADMIN, (), _request("acme:m", "1"))[1].model_id == "acme:m"  # type: ignore[union-attr]
    # Another tenant: absent, whatever the version (no "version not found" that reveals it).
    assert ns.route(B, (), _request("m", "3"))[1] is None
    assert ns.route(A, (), _request("m@2"))[1] is None  # the stored form is no public name


async def test_unregister_every_version_or_one(world: W) -> None:  # noqa: F811
    for v in ("", "2", "3"):
        await world.register(DEFAULT, "m", version=v)
    assert await world.registry.unregister(DEFAULT, "m", 5.0, version="3")
    assert set(world.state.models) == {"m", "m@2"}
    assert not await world.registry.unregister(DEFAULT, "m", 5.0, version="7")  # unknown: succeeds
    assert await world.registry.unregister(DEFAULT, "m", 5.0)
    assert world.state.models == {}
    assert Namespace(world.state).versions.versions("m") == []


async def test_retried_registration_of_a_version_is_ok_and_bad_versions_refused(world: W) -> None:  # noqa: F811
    await world.register(DEFAULT, "m", version="2")
    await world.register(DEFAULT, "m", version="02")  # the same version, the same spec: OK
    with pytest.raises(InvalidArgument):
        await world.register(DEFAULT, "m", version="latest")
