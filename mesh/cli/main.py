"""`mesh` — run the mesh locally, run one process, or talk to a running router.

    mesh up [--pods N] [--placements N] [--routers N]
                                    etcd + Redis + 2 placement replicas + 2 runtime pods + router
                                    + demo models; a child that dies is restarted
    mesh router|placement|runtime   one process, configured by MESH_* variables (containers)
    mesh register ID URI [--sha256 H] [--tenant T] [--label k=v] [--min-copies N] [--max-copies N]
                         [--max-batch-size N] [--max-queue-delay-us US] [--idle-ttl S] [--version N]
    mesh register --repository DIR|s3://bucket/prefix [--prune] [--no-update]
                                    every model of a Triton-style repository, in one call
    mesh list | status ID [--output table|json] | infer ID [--input JSON] [--repeat N [--interval S]]
         | load ID | unregister ID
    mesh top [--once | --iterations N] [--interval S] [--metrics HOST:PORT]
                                    busiest models, hit ratio, pods' memory, refreshed
    mesh usage [--since 24h] [--tenant T] [--output table|json|csv] [--redis URL]
                                    showback: requests and memory-seconds per tenant and model
    mesh token create --tenant T [--scope infer|tenant|admin] [--name N] [--expires 30d] | token list
         | token revoke NAME|ID|TOKEN | token generate
    mesh alias set NAME MODEL[=WEIGHT] ... [--sticky-header H] [--tag HEADER=VALUE:MODEL]
         | alias get|status|delete NAME | alias list
         | alias rollout NAME --to MODEL [--steps 1,10,50,100] [--dwell 60s] [--max-error-rate F]
                         [--max-p99-ratio R] [--tag H=V] [--wait] | alias rollout NAME --abort
                                    vmodels: one name over several models, rollouts with automatic
                                    rollback (mesh/cli/alias.py)
    mesh tenant set T [--max-models N] [--max-requests-per-s R] [--max-in-flight N]
                      [--memory-reserved SIZE] [--memory-cap SIZE] | tenant get T | tenant list
         | tenant delete T

Client commands send a token: --token, else MESH_TOKEN, else the file MESH_TOKEN_FILE names,
else ./.mesh/token (the admin token `mesh up` writes in its state folder).
"""

from __future__ import annotations

import argparse
import json
import os
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

    up = sub.add_parser("up", help="run the whole mesh on this machine with demo models (or a repository)")
    up.add_argument("--etcd", metavar="HOST:PORT", help="use this etcd instead of starting one")
    up.add_argument("--state-dir", default=".mesh", help="etcd data, caches and logs (default .mesh)")
    up.add_argument("--port", type=int, default=8033, help="router port (default 8033)")
    up.add_argument("--rest-port", type=int, default=8008,
                    help="router REST (KServe V2 HTTP) port (default 8008, ModelMesh's REST port)")
    up.add_argument("--pods", type=int, default=2, help="runtime pods (default 2)")
    up.add_argument("--placements", type=_positive, default=2,
                    help="placement replicas: one leads, the others stand by (default 2)")
    up.add_argument("--routers", type=_positive, default=1,
                    help="routers; the first on --port, the others on free ports, all printed (default 1)")
    up.add_argument("--lease-ttl", type=_positive, default=10, metavar="S",
                    help="lease TTL of pods and the placement leader, seconds (default 10)")
    up.add_argument("--capacity", default="64MiB", help="model memory per pod (default 64MiB)")
    up.add_argument("--no-demo", action="store_true", help="register no demo models")
    up.add_argument("--file-root", action="append", default=[], metavar="DIR",
                    help="a folder whose models may be registered by path / file:// (repeatable; the "
                         "state folder's models/ always is, file:// elsewhere is refused)")
    up.add_argument("--repository", default="", metavar="DIR",
                    help="serve a Triton-style model repository (like tritonserver --model-repository): "
                         "every model in it is registered at start")
    up.add_argument("--repository-poll", type=_duration, default=0, metavar="DURATION",
                    help="with --repository: scan it again this often (e.g. 30s) and register added, "
                         "update changed and unregister removed models (default: only at start)")
    up.add_argument("--allow-anonymous", action="store_true",
                    help="let callers without a token in as the default tenant (local development only)")

    for name in ("router", "placement", "runtime"):
        sub.add_parser(name, help=f"run one {name} process (configured by MESH_* variables)")

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--router", default="127.0.0.1:8033", help="router address (default 127.0.0.1:8033)")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
        p.add_argument("--token", default="", help="API token (default: MESH_TOKEN, else the token file)")
        p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
        p.add_argument("--tls-ca", default="", metavar="PEM", help="connect with TLS, trusting this CA bundle")
        p.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate (router requiring mTLS)")
        p.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")

    reg = sub.add_parser("register", help="register a model, or every model of a repository")
    reg.add_argument("model_id", nargs="?", default="")
    reg.add_argument("storage_uri", nargs="?", default="",
                     help="file:///abs/model.onnx (or a model folder), http(s)://..., s3://bucket/key (or "
                          "s3://bucket/prefix/ for a folder); a local path is made a file:// URI")
    reg.add_argument("--repository", default="", metavar="DIR|s3://BUCKET/PREFIX",
                     help="register (or update) every model of a Triton-style repository "
                          "(<name>/config.pbtxt, <name>/<version>/model.onnx) in one call")
    reg.add_argument("--no-update", action="store_true",
                     help="--repository: leave models registered with another spec as they are (ALREADY_EXISTS)")
    reg.add_argument("--prune", action="store_true",
                     help="--repository: unregister models registered from it that it no longer holds")
    reg.add_argument("--sha256", default="")
    reg.add_argument("--tenant", default="")
    reg.add_argument("--credentials-ref", default="", metavar="NAME",
                     help="credentials the pods fetch an http(s) URI with: the name of a Secret (or a file) "
                          "under their MESH_RUNTIME_CREDENTIALS_DIR/<tenant>/; never put credentials in the URI")
    reg.add_argument("--label", action="append", default=[], type=_label, metavar="KEY=VALUE")
    reg.add_argument("--min-copies", type=_count, default=0,
                     help="copies kept loaded at all times (0: loaded on first use only)")
    reg.add_argument("--max-copies", type=_count, default=0,
                     help="most copies placement may add for load (0: the mesh's default)")
    reg.add_argument("--idle-ttl", type=_count, default=0, metavar="SECONDS",
                     help="scale to zero: unload the last copy after this long without a request "
                          "(min copies 0 only; 0: the mesh's MESH_PLACEMENT_IDLE_UNLOAD_S)")
    reg.add_argument("--version", default="", metavar="N",
                     help="register version N (a positive integer) of the model; \"\" is version 1 "
                          "(requests with an empty model_version get the highest)")
    reg.add_argument("--max-batch-size", type=_count, default=0,
                     help="dynamic batching: at most this many rows per run (0 or 1: off)")
    reg.add_argument("--max-queue-delay-us", type=_count, default=0,
                     help="dynamic batching: how long a request may wait for a fuller batch while "
                          "a run of the model is in progress (microseconds)")
    target(reg)

    load = sub.add_parser("load", help="load a model now (Triton's RepositoryModelLoad), with a progress bar of "
                                       "its artifact's pull")
    load.add_argument("model_id")
    target(load)

    unreg = sub.add_parser("unregister", help="remove a model and its copies")
    unreg.add_argument("model_id")
    unreg.add_argument("--version", default="", metavar="N", help="only this version (default: all of them)")
    target(unreg)

    lst = sub.add_parser("list", help="list registered models")
    lst.add_argument("--tenant", default="")
    lst.add_argument("--output", choices=("table", "json"), default="table",
                     help="table (aligned text; a rich table on a terminal) or json")
    target(lst)

    status = sub.add_parser("status", help="where a model is loaded, its state, size and last error")
    status.add_argument("model_id")
    status.add_argument("--output", choices=("table", "json"), default="table",
                        help="table (aligned text; a rich table on a terminal) or json")
    target(status)

    top = sub.add_parser("top", help="models by request rate, hit ratio and pods' memory, refreshed")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame (after one interval) and exit")
    top.add_argument("--iterations", type=_count, default=0, help="exit after this many frames (0: until Ctrl-C)")
    top.add_argument("--limit", type=_positive, default=20, help="models shown (default 20)")
    top.add_argument("--metrics", action="append", default=[], metavar="HOST:PORT",
                     help="a router's or pod's Prometheus port (repeatable): hit ratio, pods' capacity")
    target(top)

    usage = sub.add_parser("usage", help="showback: requests and memory-seconds per tenant and model (from Redis)")
    usage.add_argument("--since", type=_duration, default=24 * 3600, help="window, e.g. 24h, 7d (default 24h)")
    usage.add_argument("--tenant", default="", help="only this tenant's models ('default' for the default tenant)")
    usage.add_argument("--output", choices=("table", "json", "csv"), default="table")
    usage.add_argument("--redis", default="", metavar="URL", help="the mesh's Redis (default: MESH_REDIS_URL)")
    usage.add_argument("--root", default=os.environ.get("MESH_ROOT", "/meshserve"),
                       help="the mesh's etcd root (default: MESH_ROOT, else /meshserve)")
    usage.add_argument("--timeout", type=float, default=10.0, help="Redis timeout in seconds")

    infer = sub.add_parser("infer", help="run inference (random inputs unless --input is given)")
    infer.add_argument("model_id")
    infer.add_argument("--input", action="append", default=[], type=_named_json, metavar="NAME=JSON",
                       help='e.g. input=[[1,2,3,4]]; repeat per input')
    infer.add_argument("--batch", type=_count, default=1, help="batch size for random inputs")
    infer.add_argument("--header", action="append", default=[], type=_label, metavar="KEY=VALUE",
                       help="request metadata, e.g. a vmodel's sticky or tag header (repeatable)")
    infer.add_argument("--repeat", type=_count, default=1, metavar="N",
                       help="send the request N times and print who answered and how often (traffic for a "
                            "vmodel's split or rollout)")
    infer.add_argument("--interval", type=float, default=0.0, metavar="S",
                       help="with --repeat: seconds between requests (spread the traffic over a rollout's dwell)")
    target(infer)

    token = sub.add_parser("token", help="API tokens (admin): create, list, revoke; generate one offline")
    tsub = token.add_subparsers(dest="token_command", required=True)
    create = tsub.add_parser("create", help="create a token and print it (the only time it is shown)")
    create.add_argument("--tenant", default="", help="the tenant whose models it reaches (default: the default tenant)")
    create.add_argument("--scope", choices=("infer", "tenant", "admin"), default="tenant",
                        help="infer: inference and reads only; tenant: also (un)registers its models; admin: mesh-wide")
    create.add_argument("--name", default="", help="a label to list and revoke it by (default: generated)")
    create.add_argument("--expires", type=_duration, default=0, metavar="DURATION",
                        help="lifetime, e.g. 3600s, 90m, 12h, 30d, 2w (default: never expires)")
    target(create)
    tlist = tsub.add_parser("list", help="list tokens (never their secrets)")
    tlist.add_argument("--tenant", default="")
    target(tlist)
    revoke = tsub.add_parser("revoke", help="revoke a token by name, id prefix or the token itself")
    revoke.add_argument("which", metavar="NAME|ID|TOKEN")
    target(revoke)
    tsub.add_parser("generate", help="print a new token and its sha256 without contacting a router "
                                     "(for MESH_ROUTER_ADMIN_TOKEN_SHA256 / the Helm chart's Secret)")

    tenant = sub.add_parser("tenant", help="tenant quotas (admin): set, get, list, delete")
    tnsub = tenant.add_subparsers(dest="tenant_command", required=True)
    tset = tnsub.add_parser("set", help="set a tenant's quotas (only those given change; 0: no limit)")
    tset.add_argument("tenant", help='the tenant ("" for the default tenant)')
    tset.add_argument("--max-models", type=_count, help="registered models at most")
    tset.add_argument("--max-requests-per-s", type=_rate, metavar="R", help="inference requests per second, per router")
    tset.add_argument("--max-in-flight", type=_count, help="inference requests in progress, per router")
    tset.add_argument("--memory-reserved", dest="memory_reserved_bytes", type=_bytes, metavar="SIZE",
                      help="memory of its copies another tenant's load never evicts, e.g. 2GiB")
    tset.add_argument("--memory-cap", dest="memory_cap_bytes", type=_bytes, metavar="SIZE",
                      help="memory its copies may hold at most, e.g. 8GiB")
    target(tset)
    for name, text in (("get", "the quotas in force for a tenant"), ("delete", "remove a tenant's quotas "
                                                                      "(the defaults apply again)")):
        one = tnsub.add_parser(name, help=text)
        one.add_argument("tenant", help='the tenant ("" for the default tenant)')
        target(one)
    target(tnsub.add_parser("list", help="every tenant with quotas or models"))
    from mesh.cli import alias

    alias.add_parser(sub, target)
    return parser


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _bytes(text: str) -> int:
    from mesh.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> int:
    """Seconds in '3600', '3600s', '90m', '12h', '30d' or '2w'."""
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].isalpha() else (text, "s")
    if unit not in _UNITS or not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"a duration is a whole number with s, m, h, d or w, e.g. 30d; not {text!r}")
    return int(number) * _UNITS[unit]


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
    elif args.command == "usage":
        from mesh.cli import usage

        sys.exit(usage.run(args))
    else:
        from mesh.cli import client

        sys.exit(client.run(args))
    run()


if __name__ == "__main__":
    main()
