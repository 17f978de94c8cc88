"""`mesh up`: the whole mesh on this machine, demo models registered, until Ctrl-C.

Children are supervised (mesh.cli.supervise): one that dies is started again with backoff and
the rest keep serving. Two placement replicas by default, so a leader's death leaves a standby.

Authentication is on: the mesh's admin token is <state dir>/token (mode 0600, kept across
restarts), which the CLI reads when run from the folder holding the state dir (./.mesh by
default); `--allow-anonymous` also lets callers without a token in as the default tenant.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil
import signal
import sys
import threading

import grpc

from mesh import demo
from mesh.cli import repo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2


def run(args: argparse.Namespace) -> int:
    state = pathlib.Path(args.state_dir).resolve()
    _log_supervisor()
    mesh = LocalMesh(state_dir=state, router_port=args.port, rest_port=args.rest_port, pods=args.pods, capacity=args.capacity,
                     etcd=args.etcd or "", lease_ttl_s=args.lease_ttl,
                     root=os.environ.get("MESH_ROOT", "/meshserve"),  # the etcd key root, as for every process
                     redis=shutil.which("redis-server") is not None,  # usage telemetry when available
                     placements=args.placements, routers=args.routers, supervise=True,
                     allow_anonymous=args.allow_anonymous,
                     # file:// only from its own models folder and the folders the user named
                     file_roots=(str(state / "models"), *(str(pathlib.Path(d).resolve()) for d in args.file_root),
                                 *_repository_root(args)))
    print(f"starting meshserve: {args.pods} runtime pods of {args.capacity}, {args.placements} placement "
          f"replicas, {args.routers} router(s), state in {state} ...", flush=True)
    stop = threading.Event()
    poller: repo.Poller | None = None
    try:
        mesh.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if getattr(args, "repository", ""):
            poller = _serve_repository(mesh, args)
        registered = [] if args.no_demo or poller is not None else _register_demo(mesh, state / "models")
        addresses = mesh.router_addresses
        print(f"\nmeshserve is up: router (KServe V2 gRPC + registration API) at {mesh.router_address}")
        print(f"REST (KServe V2 HTTP / Triton HTTP API + registration API over JSON) at http://{mesh.rest_address}"
              " (e.g. curl http://" + mesh.rest_address + "/v2/health/ready)")
        if len(addresses) > 1:
            print("routers (any of them serves every model): " + ", ".join(addresses))
            print("their REST fronts: " + ", ".join(f"http://{a}" for a in mesh.rest_addresses))
        print(f"etcd at {mesh.etcd}, logs in {state / 'logs'}")
        print("models registered by path / file:// are read from: " + ", ".join(mesh.roots())
              + " (add folders with --file-root DIR)")
        _print_auth(mesh, state, args.allow_anonymous)
        print(f"usage telemetry in Redis at {mesh.redis_url}" if mesh.redis_url
              else "usage telemetry off (no redis-server on PATH)")
        print("processes (restarted when they die): "
              + ", ".join(f"{name} pid {proc.pid}" for name, proc in sorted(mesh.procs.items())))
        if registered:
            print("demo models: " + ", ".join(registered))
            print(f"\ntry:\n  mesh infer {registered[0]} --router {mesh.router_address}")
            print(f"  mesh status {registered[0]} --router {mesh.router_address}")
            print(f"  mesh list --router {mesh.router_address}")
        print("\nCtrl-C stops everything.", flush=True)
        stop.wait()
    finally:
        print("\nstopping ...", flush=True)
        if poller is not None:
            poller.close()
        mesh.stop()
    return 0


def _print_auth(mesh: LocalMesh, state: pathlib.Path, anonymous: bool) -> None:
    default = (pathlib.Path.cwd() / ".mesh").resolve() == state
    print(f"admin token in {mesh.token_file} (mode 0600): the mesh CLI "
          + ("reads it from there when run in this folder" if default
             else f"reads it with MESH_TOKEN_FILE={mesh.token_file}")
          + "; other clients send the metadata 'authorization: Bearer <token>' "
          + f"(tritonclient: headers={{'authorization': 'Bearer ' + open('{mesh.token_file}').read().strip()}})")
    print("tenant tokens: mesh token create --tenant T   (mesh token list / mesh token revoke NAME)")
    if anonymous:
        print("WARNING: --allow-anonymous: callers without a token are let in as the default tenant; "
              "keep this mesh on this machine")


def _repository_root(args: argparse.Namespace) -> tuple[str, ...]:
    """A local repository's folder is a file root (its models are registered by file:// URI)."""
    location = getattr(args, "repository", "")
    if not location or location.startswith("s3://"):
        return ()
    return (str(pathlib.Path(location).resolve()),)


def _serve_repository(mesh: LocalMesh, args: argparse.Namespace) -> repo.Poller:
    """Registers every model of --repository now; with --repository-poll, again every so often."""
    poller = repo.Poller(mesh.router_address, args.repository, float(args.repository_poll or 0),
                         mesh.auth_metadata)
    summary = poller.sync_once()
    for name, reason in sorted(summary.failed.items()):
        print(f"repository: {name} not registered: {reason}")
    for name, notes in sorted(summary.warnings.items()):
        for note in notes:
            print(f"repository: {name}: {note}")
    served = sorted(summary.created + summary.updated + summary.unchanged)
    print(f"repository {args.repository}: {summary.line()}; models: {', '.join(served) or '(none)'}", flush=True)
    if args.repository_poll:
        poller.start()
        print(f"repository poll every {args.repository_poll}s (added, changed and removed models)")
    return poller


def _log_supervisor() -> None:
    """Restart messages go to stdout beside the banner."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s supervisor: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("mesh.cli.supervise")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _register_demo(mesh: LocalMesh, folder: pathlib.Path) -> list[str]:
    files = demo.write_demo_models(folder)
    with grpc.insecure_channel(mesh.router_address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        for model_id, path in files.items():
            spec = types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri(),
                                       labels={"demo": "true"})
            try:
                stub.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10,
                                   metadata=mesh.auth_metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
    return list(files)
