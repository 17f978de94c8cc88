"""Long Hypothesis fuzz runs (outside CI; tests/fuzz/ runs a few hundred examples in CI).

    python -m bench.fuzz.hypo --examples 10000             # in-process: router parsing, pod codec
    python -m bench.fuzz.hypo --examples 10000 --grpc      # a real mesh over gRPC, per API

In-process, the pod's own generated classes (mesh.pb.inference) parse the bytes, so the
differential check (router and pod name the same model) is against what the pod really runs.
Over gRPC, every API gets `--examples` examples: the router's ModelInfer, ModelReady and
ModelMetadata, the pod's ModelInfer and ModelMetadata, and each registration method. Prints a
JSON report (examples, codes, findings, max RSS of each process) and exits 1 on a finding.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fuzz import strategies, targets  # noqa: E402


def _run(name: str, strategy: st.SearchStrategy, body: Callable[[Any], None], examples: int,
         report: dict[str, Any]) -> None:
    """Runs `body` on `examples` examples of `strategy`; a finding is shrunk and recorded."""
    seen = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal seen
        seen += 1
        body(value)

    start = time.monotonic()
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - every finding is reported, the run goes on to the next API
        report["findings"].append({"api": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    report["apis"][name] = {"examples": seen, "seconds": round(time.monotonic() - start, 1)}
    print(f"{name}: {seen} examples in {report['apis'][name]['seconds']} s", file=sys.stderr, flush=True)


def in_process(examples: int, report: dict[str, Any], apis: set[str]) -> None:
    from mesh.pb.inference import grpc_predict_v2_pb2 as pb

    tally = targets.Tally()
    data = strategies.infer_bytes(pb)
    _run("router:infer-parse", data, lambda d: targets.router_infer(d, pb, tally), examples, report)
    _run("router:control-parse", data, lambda d: targets.router_control(d, tally), examples, report)
    _run("pod:deserialize+codec", data, lambda d: targets.pod_infer(d, pb, tally), examples, report)
    report["outcomes"] = dict(tally.outcomes)


def over_grpc(examples: int, report: dict[str, Any], apis: set[str]) -> None:
    from tritonclient.grpc import service_pb2 as pb

    from mesh.pb.v1 import registry_pb2, types_pb2
    from tests.fuzz import harness

    with tempfile.TemporaryDirectory(prefix="meshserve-fuzz-") as base:
        fm = harness.start(pathlib.Path(base))
        try:
            infer = strategies.infer_bytes(pb)
            names = strategies.IDS | st.sampled_from(sorted(strategies.specs()))
            control = st.builds(lambda n, cut: (lambda b: b[:-1] + b"\xff" if cut and b else b)(
                pb.ModelMetadataRequest(name=n).SerializeToString()), names, st.booleans())
            plan: list[tuple[str, str, st.SearchStrategy]] = [
                ("router", "ModelInfer", infer), ("pod", "ModelInfer", infer),
                ("router", "ModelReady", control), ("router", "ModelMetadata", control),
                ("pod", "ModelMetadata", control),
                *(("router", m, s) for m, s in strategies.registry_requests(registry_pb2, types_pb2, fm.good_uris).items()),
            ]
            plan = [p for p in plan if not apis or f"{p[0]}:{p[1]}" in apis]
            for i, (target, method, strategy) in enumerate(plan):
                def body(d: bytes, target: str = target, method: str = method) -> None:
                    fm.call(target, method, d)
                _run(f"{target}:{method}", strategy, body, examples, report)
                fm.check_processes()
                print(f"  [{i + 1}/{len(plan)}] rss {fm.rss_max}", file=sys.stderr, flush=True)
            fm.check_processes()
        finally:
            report["codes"] = dict(sorted(fm.codes.items()))
            report["rss_start_bytes"], report["rss_max_bytes"] = fm.rss_start, fm.rss_max
            fm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="examples per API")
    parser.add_argument("--grpc", action="store_true", help="against a real mesh over gRPC (else in-process)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the report here")
    parser.add_argument("--apis", default="", help="--grpc only: comma-separated target:Method to run "
                        "(e.g. router:GetModel,pod:ModelInfer); default all")
    args = parser.parse_args()
    report: dict[str, Any] = {"mode": "grpc" if args.grpc else "in-process", "examples_per_api": args.examples,
                              "apis": {}, "findings": []}
    start = time.monotonic()
    apis = {a.strip() for a in args.apis.split(",") if a.strip()}
    (over_grpc if args.grpc else in_process)(args.examples, report, apis)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["runner_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
