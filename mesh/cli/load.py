"""`mesh load ID`: load a model now (Triton's RepositoryModelLoad through the router), with a
progress bar of its artifact's pull read from GetModel (pods report bytes pulled in their
LOADING copy records, puller/modelstate.py)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import grpc

from mesh.cli.client import _registry, _size, _state
from mesh.pb.inference import extensions_pb2 as ext
from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from mesh.pb.v1 import registry_pb2, types_pb2


def _pull_line(m: types_pb2.ModelStatus) -> tuple[int, int, str]:
    """(bytes pulled, bytes expected, what is happening) over the model's copies."""
    loading = [c for c in m.copies if c.state == types_pb2.LOADING]
    pulled = sum(c.pulled_bytes for c in loading)
    total = sum(c.total_bytes for c in loading)
    if not m.copies:
        return 0, 0, "placing"
    if loading and total and pulled < total:
        return pulled, total, "pulling"
    return pulled, total, "loading" if loading else _state(m).lower()


def run(channel: grpc.Channel, args: argparse.Namespace) -> int:
    """`mesh load ID`: Triton's RepositoryModelLoad through the router (it answers once a copy
    is ready), while GetModel is polled for the pull's progress: a bar on a terminal, a line
    per quarter otherwise."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
                ext.RepositoryModelLoadRequest(model_name=args.model_id), timeout=args.timeout)
        except grpc.RpcError as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    registry = _registry(channel)
    bar: Any = None
    if sys.stdout.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeElapsedColumn())
        bar.start()
        task = bar.add_task(args.model_id, total=None)
    quarter = 0
    try:
        while worker.is_alive():
            worker.join(0.25)
            try:
                m = registry.GetModel(registry_pb2.GetModelRequest(model_id=args.model_id), timeout=5)
            except grpc.RpcError:
                continue  # the load's own answer says what went wrong
            pulled, total, doing = _pull_line(m)
            if bar is not None:
                bar.update(task, description=f"{args.model_id}: {doing}", completed=pulled, total=total or None)
            elif total and doing == "pulling" and pulled * 4 // total > quarter:
                quarter = pulled * 4 // total
                print(f"{args.model_id}: pulled {_size(pulled)} of {_size(total)}", flush=True)
    finally:
        if bar is not None:
            bar.stop()
    if "error" in outcome:
        exc = outcome["error"]
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    m = registry.GetModel(registry_pb2.GetModelRequest(model_id=args.model_id), timeout=args.timeout)
    print(f"{args.model_id}: loaded in {outcome['done'] - started:.1f}s ({_state(m)}), size {_size(m.size_bytes)}")
    return 0
