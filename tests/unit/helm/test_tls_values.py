"""helm/meshserve `tls` values: certificates from Secrets, mounted read-only and wired to the
real TLS settings, probes moved to the plaintext health ports when a gRPC port speaks TLS, and
incomplete TLS values refused at render time."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.settings import CommonSettings

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import PROCESSES, container_of, env_names, env_of, pod_specs  # noqa: E402

TLS = {
    "tls": {
        "router": {"secret": "router-public-tls", "clientAuth": "require", "clientCaSecret": "client-ca"},
        "internal": {"enabled": True, "secret": "mesh-internal",
                     "secrets": {"runtime": "runtime-internal"}},
    },
}


@pytest.fixture(scope="module")
def tls_render() -> chart.Rendered:
    return chart.render(TLS)


def test_secrets_are_mounted_and_wired_to_real_settings(tls_render: chart.Rendered) -> None:
    specs = pod_specs(tls_render)
    secrets = {c: {v["name"]: v["secret"]["secretName"] for v in specs[c]["volumes"] if "secret" in v}
               for c in PROCESSES}
    assert secrets["router"] == {"router-tls": "router-public-tls", "router-client-ca": "client-ca",
                                 "internal-tls": "mesh-internal"}
    assert secrets["placement"] == {"internal-tls": "mesh-internal"}
    assert secrets["runtime"] == {"internal-tls": "runtime-internal"}  # the per-component override
    for component, cls in PROCESSES.items():
        container = container_of(specs[component], component)
        env = {k: v.get("value") for k, v in env_of(container).items()}
        assert {n for n in env if n.startswith("MESH_")} <= env_names(cls) | env_names(CommonSettings)
        assert env["MESH_INTERNAL_TLS_CA"] == "/etc/meshserve/internal-tls/ca.crt"
        assert env["MESH_INTERNAL_TLS_CERT"] == "/etc/meshserve/internal-tls/tls.crt"
        assert env["MESH_INTERNAL_TLS_SERVER_NAME"] == "meshserve-internal"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["internal-tls"]["readOnly"] is True
    router = {k: v.get("value") for k, v in env_of(container_of(specs["router"], "router")).items()}
    assert router["MESH_ROUTER_TLS_CERT"] == "/etc/meshserve/router-tls/tls.crt"
    assert router["MESH_ROUTER_TLS_CLIENT_AUTH"] == "require"
    assert router["MESH_ROUTER_TLS_CLIENT_CA"] == "/etc/meshserve/router-client-ca/ca.crt"


def test_probes_use_the_plaintext_health_port_when_the_grpc_port_speaks_tls(tls_render: chart.Rendered) -> None:
    specs = pod_specs(tls_render)
    ports = tls_render.values["tls"]["healthPorts"]
    for component, cls in PROCESSES.items():
        container = container_of(specs[component], component)
        env = env_of(container)
        assert env[f"{cls.model_config['env_prefix']}HEALTH_PORT"]["value"] == str(ports[component])
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["health"] == ports[component]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == ports[component], (component, probe)


def test_no_tls_values_render_plaintext() -> None:
    specs = pod_specs(chart.render())
    for component in PROCESSES:
        env = env_of(container_of(specs[component], component))
        assert not [n for n in env if "TLS" in n or n.endswith("HEALTH_PORT")], component


@pytest.mark.parametrize("values", [
    {"tls": {"internal": {"enabled": True}}},  # no Secret named
    {"tls": {"router": {"secret": "s", "clientAuth": "require"}}},  # no client CA Secret
    {"tls": {"router": {"secret": "s", "clientAuth": "request"}}},  # not a mode grpc offers
])
def test_incomplete_tls_values_fail(tmp_path, values: dict[str, Any]) -> None:
    defaults = chart.render().values
    assert chart.errors(chart.lint(chart.copy_chart(tmp_path, chart.merge(defaults, values))))
