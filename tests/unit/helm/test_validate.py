"""Every manifest the chart renders (default values, the GPU values, with the dashboard and
either autoscaler on, and without the router's Envoy sidecar, which the others have) is valid
against the Kubernetes API schema (kubernetes-validate, which ships the schemas: offline).
Resources of CRDs it has no schema for (KEDA's ScaledObject, prometheus-operator's
ServiceMonitor) are checked field by field against their documented spec.

The dashboard: every PromQL query in it names only metrics the mesh exports (the names come
from mesh/metrics.py's registry, not a hand list)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mesh.metrics import metric_names

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
from tests.unit.helm import chart  # noqa: E402

K8S_VERSION = "1.30.0"
CRDS = {"ScaledObject", "ServiceMonitor"}
GPU_VALUES = "gpu-external-etcd-values.yaml"
ON = {"metrics": {"grafanaDashboard": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
NO_ENVOY = {"router": {"envoy": {"enabled": False}}}


def _autoscaling(kind: str) -> dict[str, Any]:
    return {**ON, "runtime": {"autoscaling": {"enabled": True, "kind": kind}}}


@pytest.fixture(scope="module")
def default() -> chart.Rendered:
    return chart.render()


@pytest.fixture(scope="module")
def variants(default: chart.Rendered) -> dict[str, chart.Rendered]:
    return {
        "default": default,
        "gpu": chart.render(default.ci_values[GPU_VALUES]),
        "keda": chart.render(_autoscaling("keda")),
        "hpa": chart.render(chart.merge(default.ci_values[GPU_VALUES], _autoscaling("hpa"))),
        "no-envoy": chart.render(NO_ENVOY),  # the router pod without its Envoy sidecar
    }


def _has_sidecar(rendered: chart.Rendered) -> bool:
    (router,) = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"].endswith("-router")]
    return "envoy" in {c["name"] for c in router["spec"]["template"]["spec"]["containers"]}


def test_every_manifest_is_valid_against_the_kubernetes_schema(variants):
    assert {_has_sidecar(r) for r in variants.values()} == {True, False}  # the router pod both ways
    checked = 0
    for name, rendered in variants.items():
        for manifest in rendered.manifests:
            if manifest["kind"] in CRDS:
                continue
            try:
                kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {manifest['kind']} {manifest['metadata']['name']}: {exc.message} at "
                            f"{'.'.join(map(str, exc.path))}")
            checked += 1
    assert checked > 35  # all five renders, not an empty list


def test_the_validator_rejects_a_broken_manifest(default):
    """The check can fail: a misspelt field in a real rendered StatefulSet is refused."""
    (sts,) = default.of_kind("StatefulSet")[:1]
    broken = json.loads(json.dumps(sts))
    broken["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_keda_scaled_object_follows_kedas_spec(variants):
    """keda.sh/v1alpha1 ScaledObject fields (keda.sh/docs/2.x/reference/scaledobject-spec and
    scalers/prometheus): scaleTargetRef, min/maxReplicaCount, pollingInterval, cooldownPeriod,
    advanced.horizontalPodAutoscalerConfig.behavior, triggers[].type/metricType/metadata."""
    keda = variants["keda"]
    (so,) = keda.of_kind("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"}
    (sts,) = [s for s in keda.of_kind("StatefulSet") if s["metadata"]["name"].endswith("runtime")]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]}
    assert "replicas" not in sts["spec"]  # the autoscaler owns it
    assert isinstance(spec["minReplicaCount"], int) and spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert isinstance(spec["pollingInterval"], int) and isinstance(spec["cooldownPeriod"], int)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    (trigger,) = spec["triggers"]
    assert set(trigger) == {"type", "metricType", "metadata"} and trigger["type"] == "prometheus"
    assert trigger["metricType"] in ("AverageValue", "Value", "Utilization")
    meta = trigger["metadata"]
    assert set(meta) <= {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                         "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl"}
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is a string map
    assert meta["serverAddress"].startswith("http") and float(meta["threshold"]) == 1
    assert names_in(meta["query"]) <= metric_names()
    assert "mesh_placement_wanted_bytes" in meta["query"]
    assert not variants["default"].of_kind("ScaledObject") and not variants["default"].of_kind("HorizontalPodAutoscaler") \
        or all(not h["metadata"]["name"].endswith("runtime") for h in variants["default"].of_kind("HorizontalPodAutoscaler"))


def test_hpa_variant_scales_the_runtime_statefulset_on_an_external_metric(variants):
    hpas = [h for h in variants["hpa"].of_kind("HorizontalPodAutoscaler") if h["metadata"]["name"].endswith("runtime")]
    (hpa,) = hpas
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "meshserve_runtime_pods_wanted"


# -- the dashboard ---------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers,
    range selectors, grouping clauses, Grafana variables and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        after = text[m.end():].lstrip()
        if after.startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or an operator
        names.add(m.group(0))
    return names


def test_names_in_finds_the_metrics_of_a_query():
    q = 'sum by (le) (rate(mesh_request_seconds_bucket{service="router",method=~"a|b"}[5m])) / ignoring(x) foo_total * $__range_s'
    assert names_in(q) == {"mesh_request_seconds_bucket", "foo_total"}


def test_every_dashboard_query_names_a_metric_the_mesh_exports(variants):
    (cm,) = [c for c in variants["keda"].of_kind("ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    dashboard = json.loads(cm["data"]["meshserve.json"])
    exported = metric_names()
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(queries) >= 13
    used: set[str] = set()
    for q in queries:
        names = names_in(q)
        assert names, f"no metric in {q!r}"
        assert names <= exported, f"{q!r} names metrics the mesh does not export: {sorted(names - exported)}"
        used |= names
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "error", "latency", "hit ratio", "evictions", "pod memory", "tenant"):
        assert topic in titles, topic
    assert not [c for c in variants["default"].of_kind("ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]
