"""`mesh up`: the whole mesh on this machine, demo models registered, until Ctrl-C."""

from __future__ import annotations

import argparse
import pathlib
import shutil
import signal
import threading

import grpc

from mesh import demo
from mesh.cli.local import LocalMesh
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2


def run(args: argparse.Namespace) -> int:
    state = pathlib.Path(args.state_dir).resolve()
    mesh = LocalMesh(state_dir=state, router_port=args.port, pods=args.pods, capacity=args.capacity,
                     etcd=args.etcd or "", lease_ttl_s=10,
                     redis=shutil.which("redis-server") is not None)  # usage telemetry when available
    print(f"starting meshserve: {args.pods} runtime pods of {args.capacity}, state in {state} ...", flush=True)
    mesh.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        registered = [] if args.no_demo else _register_demo(mesh, state / "models")
        print(f"\nmeshserve is up: router (KServe V2 gRPC + registration API) at {mesh.router_address}")
        print(f"etcd at {mesh.etcd}, logs in {state / 'logs'}")
        print(f"usage telemetry in Redis at {mesh.redis_url}" if mesh.redis_url
              else "usage telemetry off (no redis-server on PATH)")
        if registered:
            print("demo models: " + ", ".join(registered))
            print(f"\ntry:\n  mesh infer {registered[0]} --router {mesh.router_address}")
            print(f"  mesh status {registered[0]} --router {mesh.router_address}")
            print(f"  mesh list --router {mesh.router_address}")
        print("\nCtrl-C stops everything.", flush=True)
        while not stop.wait(1.0):
            mesh._check_alive()
    finally:
        print("\nstopping ...", flush=True)
        mesh.stop()
    return 0


def _register_demo(mesh: LocalMesh, folder: pathlib.Path) -> list[str]:
    files = demo.write_demo_models(folder)
    with grpc.insecure_channel(mesh.router_address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        for model_id, path in files.items():
            spec = types_pb2.ModelSpec(model_id=model_id, storage_uri=path.resolve().as_uri(),
                                       labels={"demo": "true"})
            try:
                stub.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
    return list(files)
