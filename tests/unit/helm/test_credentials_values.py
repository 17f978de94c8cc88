"""helm/meshserve `runtime.credentials`: each entry mounts an existing Secret read-only where
the pod looks up a registration's credentials_ref (<dir>/<tenant or _default>/<name>), and
MESH_RUNTIME_CREDENTIALS_DIR points there; without entries nothing is mounted or set."""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("helm_sdkpy", reason="scripts/test.sh installs helm-sdkpy (the Helm library)")
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import env_of, pod_specs  # noqa: E402

CREDS = {"runtime": {"credentials": [{"tenant": "team-a", "name": "hub", "secret": "team-a-hub"},
                                     {"name": "public-mirror", "secret": "mirror-token"}]}}


def test_credentials_secrets_are_mounted_where_the_pod_reads_credentials_refs() -> None:
    runtime = pod_specs(chart.render(CREDS))["runtime"]
    container = runtime["containers"][0]
    env = {k: v.get("value") for k, v in env_of(container).items()}
    base = env["MESH_RUNTIME_CREDENTIALS_DIR"]
    secrets = {v["name"]: v["secret"] for v in runtime["volumes"] if v["name"].startswith("credentials-")}
    mounts = {m["name"]: m for m in container["volumeMounts"] if m["name"].startswith("credentials-")}
    assert {n: s["secretName"] for n, s in secrets.items()} == {"credentials-0": "team-a-hub",
                                                               "credentials-1": "mirror-token"}
    assert all(s["defaultMode"] == 0o400 for s in secrets.values())
    assert mounts["credentials-0"]["mountPath"] == str(pathlib.PurePosixPath(base, "team-a", "hub"))
    assert mounts["credentials-1"]["mountPath"] == str(pathlib.PurePosixPath(base, "_default", "public-mirror"))
    assert all(m["readOnly"] for m in mounts.values())


def test_no_credentials_no_mounts_and_no_setting() -> None:
    runtime = pod_specs(chart.render())["runtime"]
    container = runtime["containers"][0]
    assert "MESH_RUNTIME_CREDENTIALS_DIR" not in env_of(container)
    assert not [v for v in runtime["volumes"] if v["name"].startswith("credentials-")]
