"""Refreshes the `<process>.settings` name lists in helm/meshserve/values.schema.json: every
MESH_* setting of the process (and the common ones) that the chart does not set itself.

Run after adding a setting: python tools/genschema.py (tests/unit/helm checks the result).
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.settings import CommonSettings  # noqa: E402
from tests.unit.helm import chart  # noqa: E402
from tests.unit.helm.test_chart import ETCD_TLS, PROCESSES, env_names, env_of, pod_specs  # noqa: E402


def main() -> None:
    path = chart.CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    specs = pod_specs(chart.render())
    for component, cls in PROCESSES.items():
        owned = {n for n in env_of(specs[component]["containers"][0]) if n.startswith("MESH_")}
        names = sorted((env_names(cls) | env_names(CommonSettings)) - owned - ETCD_TLS)
        schema["properties"][component]["properties"]["settings"]["propertyNames"]["enum"] = names
    path.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    main()
