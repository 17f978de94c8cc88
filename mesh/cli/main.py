"""`mesh` — run the mesh locally, run one process, or talk to a running router.

    mesh up [--pods N] [--placements N] [--routers N]
                                    etcd + Redis + 2 placement replicas + 2 runtime pods + router
                                    + demo models; a child that dies is restarted
    mesh router|placement|runtime   one process, configured by MESH_* variables (containers)
    mesh register ID URI [--sha256 H] [--tenant T] [--label k=v] [--min-copies N] [--max-copies N]
                         [--max-batch-size N] [--max-queue-delay-us US]
    mesh list | status ID | infer ID [--input JSON] | unregister ID
"""

from __future__ import annotations

import argparse
import json
import sys


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"labels are KEY=VALUE, not {text!r}")
    return key, value


def _named_json(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"inputs are NAME=JSON, not {text!r}")
    try:
        return name, json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"input {name!r}: not JSON ({exc})") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole mesh on this machine with demo models")
    up.add_argument("--etcd", metavar="HOST:PORT", help="use this etcd instead of starting one")
    up.add_argument("--state-dir", default=".mesh", help="etcd data, caches and logs (default .mesh)")
    up.add_argument("--port", type=int, default=8033, help="router port (default 8033)")
    up.add_argument("--pods", type=int, default=2, help="runtime pods (default 2)")
    up.add_argument("--placements", type=_positive, default=2,
                    help="placement replicas: one leads, the others stand by (default 2)")
    up.add_argument("--routers", type=_positive, default=1,
                    help="routers; the first on --port, the others on free ports, all printed (default 1)")
    up.add_argument("--lease-ttl", type=_positive, default=10, metavar="S",
                    help="lease TTL of pods and the placement leader, seconds (default 10)")
    up.add_argument("--capacity", default="64MiB", help="model memory per pod (default 64MiB)")
    up.add_argument("--no-demo", action="store_true", help="register no demo models")

    for name in ("router", "placement", "runtime"):
        sub.add_parser(name, help=f"run one {name} process (configured by MESH_* variables)")

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--router", default="127.0.0.1:8033", help="router address (default 127.0.0.1:8033)")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")

    reg = sub.add_parser("register", help="register a model")
    reg.add_argument("model_id")
    reg.add_argument("storage_uri", help="file:///abs/model.onnx or http(s)://...; a local path is made a file:// URI")
    reg.add_argument("--sha256", default="")
    reg.add_argument("--tenant", default="")
    reg.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    reg.add_argument("--min-copies", type=_count, default=0,
                     help="copies kept loaded at all times (0: loaded on first use only)")
    reg.add_argument("--max-copies", type=_count, default=0,
                     help="most copies placement may add for load (0: the mesh's default)")
    reg.add_argument("--max-batch-size", type=_count, default=0,
                     help="dynamic batching: at most this many rows per run (0 or 1: off)")
    reg.add_argument("--max-queue-delay-us", type=_count, default=0,
                     help="dynamic batching: how long a request may wait for a fuller batch while "
                          "a run of the model is in progress (microseconds)")
    target(reg)

    unreg = sub.add_parser("unregister", help="remove a model and its copies")
    unreg.add_argument("model_id")
    target(unreg)

    lst = sub.add_parser("list", help="list registered models")
    lst.add_argument("--tenant", default="")
    target(lst)

    status = sub.add_parser("status", help="where a model is loaded, its state, size and last error")
    status.add_argument("model_id")
    target(status)

    infer = sub.add_parser("infer", help="run inference (random inputs unless --input is given)")
    infer.add_argument("model_id")
    infer.add_argument("--input", action="append", default=[], type=_named_json, metavar="NAME=JSON",
                       help='e.g. input=[[1,2,3,4]]; repeat per input')
    infer.add_argument("--batch", type=_count, default=1, help="batch size for random inputs")
    target(infer)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "router":
        from router.main import main as run
    elif args.command == "placement":
        from placement.main import main as run
    elif args.command == "runtime":
        from puller.main import main as run
    elif args.command == "up":
        from mesh.cli import up

        sys.exit(up.run(args))
    else:
        from mesh.cli import client

        sys.exit(client.run(args))
    run()


if __name__ == "__main__":
    main()
