"""helm/meshserve: lints clean, sets only real MESH_* settings, matches the processes' ports,
and keeps the S19 hardening (RELIABILITY.md). Offline: Helm runs in-process via helm-sdkpy."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from mesh.settings import CommonSettings, PlacementSettings, RouterSettings, RuntimeSettings

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402

PROCESSES: dict[str, type[BaseSettings]] = {
    "router": RouterSettings,
    "placement": PlacementSettings,
    "runtime": RuntimeSettings,
}
GPU_VALUES = "gpu-external-etcd-values.yaml"
NO_ENVOY = {"router": {"envoy": {"enabled": False}}}  # the router pod without its Envoy sidecar


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = cls.model_config["env_prefix"]
    return {prefix + field.upper() for field in cls.model_fields}


def default_port(cls: type[BaseSettings]) -> int:
    return int(cls.model_fields["listen"].default.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def default() -> chart.Rendered:
    return chart.render()


@pytest.fixture(scope="module")
def gpu(default: chart.Rendered) -> chart.Rendered:
    return chart.render(default.ci_values[GPU_VALUES])


@pytest.fixture(scope="module")
def no_envoy() -> chart.Rendered:
    return chart.render(NO_ENVOY)


@pytest.fixture(params=["default", "gpu", "no_envoy"])
def rendered(request: pytest.FixtureRequest) -> chart.Rendered:
    return request.getfixturevalue(request.param)


def pod_specs(rendered: chart.Rendered) -> dict[str, dict[str, Any]]:
    """Workload name suffix (router, placement, runtime, etcd, redis) -> pod spec."""
    specs = {}
    for m in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        specs[m["metadata"]["labels"]["app.kubernetes.io/component"]] = m["spec"]["template"]["spec"]
    return specs


def container_of(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The pod's container called `name`: a process's own is named after its component (the
    router pod also holds the "envoy" sidecar, so the first container is not always it)."""
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def owned_settings(renders: list[chart.Rendered]) -> dict[str, set[str]]:
    """Process -> the MESH_* variables the templates set for it in any of these renders."""
    owned: dict[str, set[str]] = {component: set() for component in PROCESSES}
    for rendered in renders:
        specs = pod_specs(rendered)
        for component in PROCESSES:
            env = env_of(container_of(specs[component], component))
            owned[component] |= {n for n in env if n.startswith("MESH_")}
    return owned


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_lint_default_values_has_no_errors():
    result = chart.lint(chart.CHART)
    assert result["TotalChartsLinted"] == 1
    assert chart.errors(result) == []
    assert not [m for m in result["Messages"] if m["Severity"] >= 2], result


def test_lint_gpu_external_etcd_values_has_no_errors(tmp_path, default):
    values = chart.merge(default.values, default.ci_values[GPU_VALUES])
    result = chart.lint(chart.copy_chart(tmp_path, values))
    assert chart.errors(result) == []


def test_schema_rejects_a_setting_that_does_not_exist(tmp_path, default):
    values = chart.merge(default.values, {"router": {"settings": {"MESH_ROUTER_NO_SUCH_THING": "1"}}})
    assert chart.errors(chart.lint(chart.copy_chart(tmp_path, values)))


# Set by the chart for every process; the etcd TLS files only when etcd.external.tlsSecret is.
CONNECTION = {"MESH_ETCD_ENDPOINTS", "MESH_ROOT", "MESH_LOG_LEVEL", "MESH_LEASE_TTL_S", "MESH_REDIS_URL"}
ETCD_TLS = {"MESH_ETCD_CA_FILE", "MESH_ETCD_CERT_FILE", "MESH_ETCD_KEY_FILE"}
# Settings of an Envoy the router starts itself (MESH_ROUTER_ENVOY=auto or on). The chart sets
# external (its sidecar, configured by router.envoy.*) or off, so in settings they would do nothing.
ROUTERS_OWN_ENVOY = {"MESH_ROUTER_ENVOY_BIN", "MESH_ROUTER_ENVOY_CONCURRENCY", "MESH_ROUTER_ENVOY_LOG_LEVEL"}


def test_every_mesh_variable_is_a_real_setting_of_its_process(rendered):
    specs = pod_specs(rendered)
    assert set(PROCESSES) <= set(specs)
    for component, spec in specs.items():
        allowed = env_names(CommonSettings) | (env_names(PROCESSES[component]) if component in PROCESSES else set())
        for container in spec["containers"]:
            if container["name"] == "envoy":  # the router's Envoy sidecar (the official image): no MESH_*
                continue
            mesh_vars = {name for name in env_of(container) if name.startswith("MESH_")}
            assert mesh_vars <= allowed, f"{component}: not settings of this process: {mesh_vars - allowed}"
            if component in PROCESSES:
                assert CONNECTION <= mesh_vars, f"{component} lacks a connection setting"
                tls = bool(rendered.values["etcd"]["external"].get("tlsSecret")) and not rendered.values["etcd"]["bundled"]
                assert (ETCD_TLS <= mesh_vars) == tls, f"{component}: etcd TLS files set iff a TLS Secret is given"


def test_every_setting_is_reachable_from_values(default, no_envoy):
    """Each setting is either set by the templates or accepted in <process>.settings by the schema,
    except the ones of an Envoy the router would start itself. The chart owns what it sets with
    the router's sidecar on (MESH_ROUTER_ENVOY=external, _CONFIG_DIR, _INTERNAL_LISTEN) and off
    (MESH_ROUTER_ENVOY=off) alike."""
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    owned = owned_settings([default, no_envoy])
    assert {"MESH_ROUTER_ENVOY", "MESH_ROUTER_ENVOY_CONFIG_DIR", "MESH_ROUTER_ENVOY_INTERNAL_LISTEN"} <= owned["router"]
    for component, cls in PROCESSES.items():
        by_chart = owned[component]
        accepted = set(schema["properties"][component]["properties"]["settings"]["propertyNames"]["enum"])
        unused = ROUTERS_OWN_ENVOY if component == "router" else set()
        assert accepted | by_chart | ETCD_TLS | unused == env_names(cls) | env_names(CommonSettings), component
        assert not accepted & by_chart, f"{component}: the schema accepts variables the chart owns"
        assert not accepted & unused, f"{component}: the schema accepts settings the chart's pods never use"


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_ports_match_the_processes_defaults(rendered):
    """Each process's default port is its container's public `grpc` port and its Service's; in
    the router pod with the Envoy sidecar that port is Envoy's, and the router listens on
    router.envoy.internalPort behind it."""
    specs = pod_specs(rendered)
    metrics_port = rendered.values["metrics"]["port"]
    for component, cls in PROCESSES.items():
        port = default_port(cls)
        container = container_of(specs[component], component)
        ports = _ports(container)
        env = env_of(container)
        sidecar = component == "router" and env["MESH_ROUTER_ENVOY"]["value"] == "external"
        if sidecar:
            assert "grpc" not in ports and port not in ports.values()
            assert _ports(container_of(specs[component], "envoy"))["grpc"] == port
            internal = rendered.values["router"]["envoy"]["internalPort"]
            assert env["MESH_ROUTER_ENVOY_INTERNAL_LISTEN"]["value"] == f"127.0.0.1:{internal}"
            assert internal not in (port, metrics_port)
        else:
            assert ports["grpc"] == port
        assert ports["metrics"] == metrics_port
        assert env[cls.model_config["env_prefix"] + "LISTEN"]["value"] == f"0.0.0.0:{port}"
        assert env[cls.model_config["env_prefix"] + "METRICS_PORT"]["value"] == str(metrics_port)
        advertise = env.get(cls.model_config["env_prefix"] + "ADVERTISE")
        if advertise is not None:
            assert advertise["value"] == f"$(POD_IP):{port}"
        service = rendered.named("Service", f"-{component}")
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port


def test_pods_are_hardened(rendered):
    """RELIABILITY S19: non-root, read-only root FS, no capabilities, seccomp, no API token."""
    for component, spec in pod_specs(rendered).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, component
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", component
        assert spec["automountServiceAccountToken"] is False, component
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, component
            assert ctx["allowPrivilegeEscalation"] is False, component
            assert ctx["capabilities"]["drop"] == ["ALL"], component
    assert not rendered.of_kind("Role") and not rendered.of_kind("ClusterRole")


def test_disruption_budgets_and_etcd_persistence(default):
    budgets = {m["metadata"]["name"].rsplit("-", 1)[1] for m in default.of_kind("PodDisruptionBudget")}
    assert {"router", "placement", "runtime", "etcd"} <= budgets
    etcd = default.named("StatefulSet", "-etcd")
    assert etcd["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert default.named("HorizontalPodAutoscaler", "-router")
    assert default.named("Deployment", "-placement")["spec"]["replicas"] == 2


def test_only_routers_and_placement_reach_runtime_pods(rendered):
    policy = rendered.named("NetworkPolicy", "-runtime")
    (rule,) = policy["spec"]["ingress"][:1]
    sources = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]}
    assert sources == {"router", "placement"}
    assert [p["port"] for p in rule["ports"]] == [default_port(RuntimeSettings)]
    deny = rendered.named("NetworkPolicy", "-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]


def test_gpu_variant_requests_gpus_and_uses_external_etcd(gpu):
    assert not [m for m in gpu.of_kind("StatefulSet") if m["metadata"]["name"].endswith("-etcd")]
    runtime = gpu.named("StatefulSet", "-runtime")
    container = container_of(runtime["spec"]["template"]["spec"], "runtime")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = env_of(container)
    assert env["MESH_RUNTIME_USE_GPU"]["value"] == "always"
    assert env["MESH_RUNTIME_RESERVE"]["value"] == "2GiB"
    endpoints = gpu.values["etcd"]["external"]["endpoints"]
    assert env["MESH_ETCD_ENDPOINTS"]["value"] == ",".join(endpoints)
    assert runtime["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "model-cache"
    assert container["envFrom"] == [{"secretRef": {"name": "model-storage-credentials"}}]


def test_default_runtime_is_cpu_only(default):
    container = container_of(default.named("StatefulSet", "-runtime")["spec"]["template"]["spec"], "runtime")
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert env_of(container)["MESH_RUNTIME_USE_GPU"]["value"] == "never"
    router = container_of(default.named("Deployment", "-router")["spec"]["template"]["spec"], "router")
    # Lint renders with an empty namespace; an install fills it in.
    endpoint = env_of(router)["MESH_ETCD_ENDPOINTS"]["value"]
    assert "-etcd-0.test-release-meshserve-etcd-headless." in endpoint and endpoint.endswith(":2379")


def test_meshserve_processes_use_grpc_health_probes(rendered):
    """Probes ask grpc.health.v1 on the process's own gRPC port (not a bare TCP connect)."""
    specs = pod_specs(rendered)
    for component, cls in PROCESSES.items():
        container = container_of(specs[component], component)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == default_port(cls), (component, probe)
