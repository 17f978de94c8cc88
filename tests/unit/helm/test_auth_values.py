"""helm/meshserve `auth` values: authentication is on by default, the bootstrap admin token's
digest comes from a Secret (never a value in the chart), anonymous mode and certificate
admins reach the router's real settings."""

from __future__ import annotations

import pytest

from mesh.settings import RouterSettings

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import container_of, env_names, pod_specs  # noqa: E402


def _router_env(values: dict | None = None) -> dict[str, dict]:
    specs = pod_specs(chart.render(values or {}))
    return {e["name"]: e for e in container_of(specs["router"], "router")["env"]}


def test_authentication_is_on_by_default() -> None:
    env = _router_env()
    assert env["MESH_ROUTER_ALLOW_ANONYMOUS"]["value"] == "false"
    assert "MESH_ROUTER_ADMIN_TOKEN_SHA256" not in env


def test_admin_token_digest_from_a_secret_and_the_other_auth_values() -> None:
    env = _router_env({"auth": {"adminTokenSecret": "mesh-admin", "allowAnonymous": True,
                                "certAdmins": ["ops", "meshserve://admin/root"]}})
    ref = env["MESH_ROUTER_ADMIN_TOKEN_SHA256"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mesh-admin", "key": "sha256"}
    assert env["MESH_ROUTER_ALLOW_ANONYMOUS"]["value"] == "true"
    assert env["MESH_ROUTER_CERT_ADMINS"]["value"] == "ops,meshserve://admin/root"
    assert {"MESH_ROUTER_ADMIN_TOKEN_SHA256", "MESH_ROUTER_ALLOW_ANONYMOUS",
            "MESH_ROUTER_CERT_ADMINS"} <= env_names(RouterSettings)
