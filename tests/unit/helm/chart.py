"""Lint and render helm/meshserve offline through helm-sdkpy (the real Helm library, no cluster).

helm-sdkpy exposes lint but no `helm template`, so render() renders with Helm itself by a
detour: it copies the chart, moves each manifest template out of templates/ and adds one
template that `tpl`s them back and `fail`s with the result as JSON. In lint mode Helm logs a
`fail` message instead of stopping, so the rendered manifests arrive on stderr (fd 2, written
by Go), which render() captures. Values files are merged the same way Helm merges them.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import helm_sdkpy

CHART = pathlib.Path(__file__).resolve().parents[3] / "helm" / "meshserve"
ERROR = 4  # Helm's support.ErrorSev; 2 is a warning, 1 info

_RENDER_TEMPLATE = """\
{{- range $path, $_ := .Files.Glob "rendersrc/*.yaml" }}
{{- $docs := list }}
{{- range splitList "\\n---" (tpl ($.Files.Get $path) $) }}
{{- if trim (regexReplaceAll "(?m)^\\\\s*#.*$" . "") }}{{ $docs = append $docs (fromYaml .) }}{{ end }}
{{- end }}
{{- fail (printf "MESHSERVE-RENDER %s" (toJson (dict "file" $path "docs" $docs))) }}
{{- end }}
{{- range $path, $_ := .Files.Glob "ci/*.yaml" }}
{{- fail (printf "MESHSERVE-CI %s" (toJson (dict "file" $path "values" (fromYaml ($.Files.Get $path))))) }}
{{- end }}
{{- fail (printf "MESHSERVE-VALUES %s" (toJson $.Values)) }}
"""
_MESSAGE = re.compile(r'message="((?:[^"\\]|\\.)*)"')


def lint(chart_dir: pathlib.Path) -> dict[str, Any]:
    return asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(str(chart_dir)))


def errors(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in result["Messages"] if m["Severity"] >= ERROR] + list(result.get("Errors") or [])


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def copy_chart(dest: pathlib.Path, values: dict[str, Any] | None = None) -> pathlib.Path:
    """A copy of the chart whose values.yaml is `values` (JSON is YAML) when given."""
    target = dest / "meshserve"
    shutil.copytree(CHART, target)
    if values is not None:
        (target / "values.yaml").write_text(json.dumps(values, indent=1))
    return target


class Rendered:
    def __init__(self, messages: list[str]) -> None:
        self.manifests: list[dict[str, Any]] = []
        self.ci_values: dict[str, dict[str, Any]] = {}
        self.values: dict[str, Any] = {}
        self.failures: list[str] = []  # the templates' own `fail` messages (lint logs them)
        for message in messages:
            if not message.startswith("MESHSERVE-"):
                self.failures.append(message)
                continue
            tag, _, payload = message.partition(" ")
            data = json.loads(payload)
            if tag == "MESHSERVE-RENDER":
                for doc in data["docs"]:
                    assert "Error" not in doc, f"{data['file']} renders invalid YAML: {doc['Error']}"
                    if doc:
                        self.manifests.append(doc)
            elif tag == "MESHSERVE-CI":
                self.ci_values[pathlib.PurePath(data["file"]).name] = data["values"]
            elif tag == "MESHSERVE-VALUES":
                self.values = data

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m.get("kind") == kind]

    def named(self, kind: str, suffix: str) -> dict[str, Any]:
        (found,) = [m for m in self.of_kind(kind) if m["metadata"]["name"].endswith(suffix)]
        return found


def render(values_override: dict[str, Any] | None = None) -> Rendered:
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        chart = copy_chart(base / "default")
        if values_override is not None:
            defaults = _render_copy(chart).values
            chart = copy_chart(base / "variant", merge(defaults, values_override))
        return _render_copy(chart)


def _render_copy(chart: pathlib.Path) -> Rendered:
    src = chart / "rendersrc"
    src.mkdir()
    for template in (chart / "templates").glob("*.yaml"):
        template.rename(src / template.name)
    (chart / "templates" / "zz-render.yaml").write_text(_RENDER_TEMPLATE)
    log = chart.parent / "helm.log"
    with log.open("w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            result = lint(chart)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    text = log.read_text(errors="replace")
    assert not errors(result), f"render lint errors: {result}\n{text[-2000:]}"
    messages = [json.loads(f'"{m}"') for m in _MESSAGE.findall(text)]
    rendered = Rendered(messages)
    assert rendered.values, f"Helm logged no rendered output; its log:\n{text[-2000:]}"
    return rendered
