"""`mesh alias set|get|list|delete|status`: vmodels (aliases) over the router's VModels API
(proto/mesh/pb/v1/vmodels.proto; router/vmodels.py says how requests resolve them).

    mesh alias set NAME MODEL[=WEIGHT] ... [--sticky-header H] [--tag HEADER=VALUE:MODEL]
    mesh alias get NAME | list | delete NAME | status NAME [--output table|json]
"""

from __future__ import annotations

import argparse
import json
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
    }


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
