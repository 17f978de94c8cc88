"""Refreshes the `<process>.settings` name lists in helm/meshserve/values.schema.json: every
MESH_* setting of the process (and the common ones) that the chart does not set itself, with the
router's Envoy sidecar on or off, less those of an Envoy the router would start itself (the
chart never has it start one: tests/unit/helm/test_chart.py ROUTERS_OWN_ENVOY).

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
from tests.unit.helm.test_chart import (  # noqa: E402
    ETCD_TLS,
    NO_ENVOY,
    PROCESSES,
    ROUTERS_OWN_ENVOY,
    env_names,
    owned_settings,
)


def main() -> None:
    path = chart.CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    owned = owned_settings([chart.render(), chart.render(NO_ENVOY)])
    for component, cls in PROCESSES.items():
        names = sorted((env_names(cls) | env_names(CommonSettings)) - owned[component] - ETCD_TLS - ROUTERS_OWN_ENVOY)
        schema["properties"][component]["properties"]["settings"]["propertyNames"]["enum"] = names
    path.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    main()
