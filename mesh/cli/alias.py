"""`mesh alias set|get|list|delete|status|rollout`: vmodels (aliases) over the router's VModels
API (proto/mesh/pb/v1/vmodels.proto; router/vmodels.py says how requests resolve them,
mesh/rollout.py how a rollout is judged).

    mesh alias set NAME MODEL[=WEIGHT] ... [--sticky-header H] [--tag HEADER=VALUE:MODEL]
    mesh alias get NAME | list | delete NAME | status NAME [--output table|json]
    mesh alias rollout NAME --to MODEL [--steps 1,10,50,100] [--dwell 60s] [--max-error-rate 0.01]
                       [--max-p99-ratio 1.5] [--min-requests 20] [--tag HEADER=VALUE] [--wait]
    mesh alias rollout NAME --abort
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import grpc

from mesh.cli.tables import show
from mesh.pb.v1 import vmodels_pb2, vmodels_pb2_grpc


def _target(text: str) -> tuple[str, int]:
    model, sep, weight = text.rpartition("=")
    if not sep:
        return text, 1
    if not model or not weight.isdigit():
        raise argparse.ArgumentTypeError(f"targets are MODEL or MODEL=WEIGHT (a whole number), not {text!r}")
    return model, int(weight)


def _tag(text: str) -> tuple[str, str, str]:
    header, sep, rest = text.partition("=")
    value, sep2, model = rest.rpartition(":")
    if not (sep and sep2 and header and value and model):
        raise argparse.ArgumentTypeError(f"tags are HEADER=VALUE:MODEL, not {text!r}")
    return header.lower(), value, model


def _steps(text: str) -> list[int]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"steps are percentages separated by commas, e.g. 1,10,50,100; not {text!r}")
    return [int(p) for p in parts]


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].isalpha() else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"a duration is a number with s, m or h, e.g. 90s or 5m; not {text!r}") from None
    return value


def _header_value(text: str) -> tuple[str, str]:
    header, sep, value = text.partition("=")
    if not (sep and header and value):
        raise argparse.ArgumentTypeError(f"a tag route is HEADER=VALUE (e.g. x-canary=1), not {text!r}")
    return header.lower(), value


def add_parser(sub: Any, target: Callable[[argparse.ArgumentParser], None]) -> None:
    alias = sub.add_parser("alias", help="vmodels: a name routed to one or more models by weight, key or tag")
    asub = alias.add_subparsers(dest="alias_command", required=True)
    aset = asub.add_parser("set", help="create or change a vmodel; a new target is loaded before traffic moves")
    aset.add_argument("name")
    aset.add_argument("targets", nargs="+", type=_target, metavar="MODEL[=WEIGHT]",
                      help="models and their relative weights (default 1)")
    aset.add_argument("--sticky-header", default="", metavar="H",
                      help="request header whose value's hash picks the target (one user, one variant)")
    aset.add_argument("--tag", action="append", default=[], type=_tag, metavar="HEADER=VALUE:MODEL",
                      help="a request with HEADER: VALUE goes to MODEL (repeatable)")
    target(aset)
    for name, text in (("get", "a vmodel's targets"), ("status", "a vmodel's targets, copies and switch"),
                       ("delete", "remove a vmodel (its models stay)")):
        one = asub.add_parser(name, help=text)
        one.add_argument("name")
        if name != "delete":
            one.add_argument("--output", choices=("table", "json"), default="table")
        target(one)
    ro = asub.add_parser("rollout", help="move a vmodel to another model in steps, judged by its error rate and "
                                         "p99; rolled back automatically (or --abort one)")
    ro.add_argument("name")
    ro.add_argument("--to", default="", metavar="MODEL", help="the candidate model")
    ro.add_argument("--steps", type=_steps, default=[1, 10, 50, 100], metavar="P,P,...",
                    help="percent of traffic to the candidate at each step, ending at 100 (default 1,10,50,100; "
                         "0,100 with --tag: blue-green)")
    ro.add_argument("--dwell", type=_seconds, default=60.0, metavar="DURATION", help="time at each step (default 60s)")
    ro.add_argument("--max-error-rate", type=float, default=0.01, metavar="F",
                    help="roll back when the candidate's error rate over a step exceeds the stable model's by "
                         "more than F (default 0.01)")
    ro.add_argument("--max-p99-ratio", type=float, default=0.0, metavar="R",
                    help="roll back when candidate p99 / stable p99 over a step exceeds R (default: not checked)")
    ro.add_argument("--min-requests", type=int, default=0, metavar="N",
                    help="candidate requests a step needs before it is judged (default 20)")
    ro.add_argument("--tag", type=_header_value, default=None, metavar="HEADER=VALUE",
                    help="during the rollout, requests with HEADER: VALUE go to the candidate")
    ro.add_argument("--wait", action="store_true", help="follow the rollout until it ends; exit 1 unless promoted")
    ro.add_argument("--abort", action="store_true", help="stop the running rollout: all traffic back to stable")
    target(ro)
    lst = asub.add_parser("list", help="every vmodel")
    lst.add_argument("--output", choices=("table", "json"), default="table")
    target(lst)


def _stub(channel: grpc.Channel) -> vmodels_pb2_grpc.VModelsStub:
    return vmodels_pb2_grpc.VModelsStub(channel)


def _weights(targets: Any) -> str:
    return ", ".join(f"{t.model_id}={t.weight}" for t in targets) or "-"


def _dict(v: vmodels_pb2.VModelStatus) -> dict[str, Any]:
    return {
        "name": v.spec.name,
        "active": {t.model_id: {"weight": t.weight, "ready_copies": t.ready_copies} for t in v.active},
        "pending": {t.model_id: {"weight": t.weight, "ready_copies": t.ready_copies} for t in v.pending},
        "sticky_header": v.spec.sticky_header,
        "tags": [{"header": t.header, "value": t.value, "model": t.model_id} for t in v.spec.tags],
        "switch_note": v.switch_note,
        "updated_unix_ms": v.updated_unix_ms,
        "rollout": _rollout_dict(v.rollout) if v.HasField("rollout") else None,
    }


def _rollout_dict(r: vmodels_pb2.RolloutStatus) -> dict[str, Any]:
    return {
        "stable": r.stable, "candidate": r.spec.candidate, "state": r.state, "steps": list(r.spec.steps),
        "step": r.step, "percent": r.percent, "dwell_s": r.spec.dwell_s, "max_error_rate": r.spec.max_error_rate,
        "max_p99_ratio": r.spec.max_p99_ratio, "min_requests": r.spec.min_requests,
        "tag": f"{r.spec.tag_header}={r.spec.tag_value}" if r.spec.tag_header else "",
        "started_unix_ms": r.started_unix_ms, "step_started_unix_ms": r.step_started_unix_ms,
        "finished_unix_ms": r.finished_unix_ms, "reason": r.reason, "figures": dict(r.figures),
        "history": [{"percent": h.percent, "outcome": h.outcome, "started_unix_ms": h.started_unix_ms,
                     "ended_unix_ms": h.ended_unix_ms, "figures": dict(h.figures)} for h in r.history],
    }


def _figures_line(figures: Any) -> str:
    f = dict(figures)
    if not f:
        return "no figures yet"
    text = (f"candidate {int(f.get('candidate_requests', 0))} requests, {int(f.get('candidate_errors', 0))} errors "
            f"({f.get('candidate_error_rate', 0.0):.2%}), p99 {f.get('candidate_p99_ms', 0.0):.1f} ms; stable "
            f"{int(f.get('stable_requests', 0))} requests, p99 {f.get('stable_p99_ms', 0.0):.1f} ms")
    if f.get("p99_ratio"):
        text += f"; p99 ratio {f['p99_ratio']:.2f}"
    return text


def _when(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_ms / 1000)) + f".{unix_ms % 1000:03d}Z"


def _print_rollout(r: vmodels_pb2.RolloutStatus) -> None:
    steps = ",".join(str(p) for p in r.spec.steps)
    where = f"step {r.step + 1} of {len(r.spec.steps)} ({r.percent}%)" if r.state == "running" else r.state
    print(f"  rollout {r.stable} -> {r.spec.candidate}: {where}; steps {steps}, dwell {r.spec.dwell_s:g}s, "
          f"max error rate {r.spec.max_error_rate:g}" + (f", max p99 ratio {r.spec.max_p99_ratio:g}"
                                                         if r.spec.max_p99_ratio else ""))
    started = _when(r.started_unix_ms)
    print(f"    started {started}" + (f", ended {_when(r.finished_unix_ms)}" if r.finished_unix_ms else
                                      f", this step since {_when(r.step_started_unix_ms)}"))
    if r.reason:
        print(f"    {r.reason}")
    print(f"    {_figures_line(r.figures)}")
    for h in r.history:
        print(f"    step {h.percent}%: {h.outcome.replace('_', ' ')} after "
              f"{(h.ended_unix_ms - h.started_unix_ms) / 1000:.1f}s ({_figures_line(h.figures)})")


def _print(v: vmodels_pb2.VModelStatus, output: str, detail: bool) -> None:
    if output == "json":
        print(json.dumps(_dict(v), indent=2))
        return
    print(f"vmodel {v.spec.name}: {_weights(v.active)}" + (f"  (switching to {_weights(v.pending)})" if v.pending else ""))
    if v.spec.sticky_header:
        print(f"  sticky header: {v.spec.sticky_header}")
    for t in v.spec.tags:
        print(f"  tag {t.header}={t.value} -> {t.model_id}")
    if detail:
        rows = [(t.model_id, "active", str(t.weight), str(t.ready_copies)) for t in v.active]
        rows += [(t.model_id, "pending", str(t.weight), str(t.ready_copies)) for t in v.pending]
        show(("MODEL", "ROLE", "WEIGHT", "READY COPIES"), rows)
    if v.switch_note:
        print(f"  note: {v.switch_note}")
    if v.HasField("rollout") and (detail or v.rollout.state == "running"):
        _print_rollout(v.rollout)


def _rollout(stub: vmodels_pb2_grpc.VModelsStub, args: argparse.Namespace) -> int:
    if args.abort:
        _print(stub.AbortRollout(vmodels_pb2.AbortRolloutRequest(vmodel=args.name), timeout=args.timeout),
               "table", True)
        return 0
    if not args.to:
        raise SystemExit("mesh alias rollout: give the candidate (--to MODEL), or --abort")
    header, value = args.tag or ("", "")
    spec = vmodels_pb2.RolloutSpec(
        vmodel=args.name, candidate=args.to, steps=args.steps, dwell_s=args.dwell,
        max_error_rate=args.max_error_rate, max_p99_ratio=args.max_p99_ratio, min_requests=args.min_requests,
        tag_header=header, tag_value=value)
    status = stub.StartRollout(vmodels_pb2.StartRolloutRequest(spec=spec), timeout=args.timeout)
    _print(status, "table", True)
    if not args.wait:
        return 0
    seen = (status.rollout.state, status.rollout.step)
    while status.rollout.state == "running":
        time.sleep(1.0)
        status = stub.GetVModel(vmodels_pb2.GetVModelRequest(name=args.name), timeout=args.timeout)
        if (status.rollout.state, status.rollout.step) != seen:
            seen = (status.rollout.state, status.rollout.step)
            _print_rollout(status.rollout)
    return 0 if status.rollout.state == "promoted" else 1


def run(channel: grpc.Channel, args: argparse.Namespace) -> int:
    stub, cmd = _stub(channel), args.alias_command
    if cmd == "set":
        spec = vmodels_pb2.VModelSpec(
            name=args.name, sticky_header=args.sticky_header,
            targets=[vmodels_pb2.VModelTarget(model_id=m, weight=w) for m, w in args.targets],
            tags=[vmodels_pb2.TagRoute(header=h, value=v, model_id=m) for h, v, m in args.tag])
        _print(stub.SetVModel(vmodels_pb2.SetVModelRequest(spec=spec), timeout=args.timeout), "table", True)
    elif cmd in ("get", "status"):
        _print(stub.GetVModel(vmodels_pb2.GetVModelRequest(name=args.name), timeout=args.timeout),
               args.output, cmd == "status")
    elif cmd == "rollout":
        return _rollout(stub, args)
    elif cmd == "list":
        vms = stub.ListVModels(vmodels_pb2.ListVModelsRequest(), timeout=args.timeout).vmodels
        if args.output == "json":
            print(json.dumps([_dict(v) for v in vms], indent=2))
        else:
            show(("VMODEL", "TARGETS", "PENDING", "STICKY", "TAGS"),
                 [(v.spec.name, _weights(v.active), _weights(v.pending) if v.pending else "-",
                   v.spec.sticky_header or "-", str(len(v.spec.tags))) for v in vms])
    else:
        existed = stub.DeleteVModel(vmodels_pb2.DeleteVModelRequest(name=args.name), timeout=args.timeout).existed
        print(f"vmodel {args.name} deleted" if existed else f"vmodel {args.name} did not exist")
    return 0
