"""`mesh register --repository DIR|s3://bucket/prefix` and the repository poll of `mesh up`.

`sync` scans a Triton-style repository (mesh/repository.py), registers (or updates) every
model version its version policies select in one RegisterModels call (more only past 1000), and
with `prune` unregisters the model versions an earlier sync registered from the same repository
(label `repository`) that it no longer selects (a model whose config fails keeps its versions).
Summaries name version 1 of a model by its name, version N as `name/N` (its repository folder). A progress bar (rich) is drawn on a terminal only; piped output gets plain
lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import grpc

from mesh import repository
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

log = logging.getLogger(__name__)
PER_CALL = 1000  # RegisterModels' limit


@dataclasses.dataclass
class Summary:
    created: list[str] = dataclasses.field(default_factory=list)
    updated: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # model -> reason
    warnings: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    calls: int = 0  # RegisterModels calls made

    def line(self) -> str:
        return (f"{len(self.created)} registered, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
                f"{len(self.removed)} removed, {len(self.failed)} failed")


def to_pb(spec: Any, tenant: str = "") -> types_pb2.ModelSpec:
    return types_pb2.ModelSpec(model_id=spec.model_id, storage_uri=spec.storage_uri, tenant=tenant,
                               labels=dict(spec.labels), max_batch_size=spec.max_batch_size,
                               max_queue_delay_us=spec.max_queue_delay_us, max_copies=spec.max_copies,
                               credentials_ref=spec.credentials_ref, version=spec.version)


def shown(model_id: str, version: str) -> str:
    """How a summary names a model version: `m` for version 1, `m/3` for version 3."""
    return model_id if version in ("", "1") else f"{model_id}/{version}"


def sync(stub: registry_pb2_grpc.ModelRegistryStub, location: str, *, metadata: tuple = (), timeout: float = 60.0,
         replace: bool = True, prune: bool = False, tenant: str = "", credentials_ref: str = "",
         progress: Callable[[str, int, int], None] | None = None, s3_client: Any = None) -> Summary:
    """Registers every model of the repository at `location`; see the module docstring.
    `progress(phase, done, total)` is told how far it got. Raises RepositoryError when the
    repository cannot be read, grpc.RpcError when the router refuses the call itself."""
    found = repository.scan(location, s3_client)
    out = Summary()
    specs = []
    broken = set()  # models whose config cannot be registered: none of their versions is pruned
    for f in found:
        if f.warnings:
            out.warnings[f.name] = list(f.warnings)
        if f.spec is None:
            out.failed[f.name] = f.error
            broken.add(f.name)
        else:
            specs.append(to_pb(dataclasses.replace(f.spec, credentials_ref=credentials_ref), tenant))
    if progress:
        progress("register", 0, len(specs))
    for start in range(0, len(specs), PER_CALL):
        batch = specs[start:start + PER_CALL]
        resp = stub.RegisterModels(registry_pb2.RegisterModelsRequest(
            models=[registry_pb2.RegisterModelRequest(spec=s) for s in batch], replace=replace),
            timeout=timeout, metadata=metadata)
        out.calls += 1
        for spec, r in zip(batch, resp.results, strict=True):  # one result per model, in order
            name = shown(spec.model_id, spec.version)
            if r.code:
                out.failed[name] = f"{grpc.StatusCode(_code(r.code)).name}: {r.message}"
            else:
                {"created": out.created, "updated": out.updated}.get(r.action, out.unchanged).append(name)
        if progress:
            progress("register", start + len(batch), len(specs))
    if prune:
        present = {(s.model_id, s.version or "1") for s in specs}
        label = repository.base_label(location, found)
        for model_id, version in _registered_from(stub, label, tenant, metadata, timeout):
            if (model_id, version) not in present and model_id not in broken:
                stub.UnregisterModel(registry_pb2.UnregisterModelRequest(model_id=model_id, version=version),
                                     timeout=timeout, metadata=metadata)
                out.removed.append(shown(model_id, version))
    return out


def _code(value: int) -> tuple[int, str]:
    return next(c.value for c in grpc.StatusCode if c.value[0] == value)


def _registered_from(stub: registry_pb2_grpc.ModelRegistryStub, label: str, tenant: str, metadata: tuple,
                     timeout: float) -> list[tuple[str, str]]:
    """(model id, version) of every model version registered from the repository."""
    ids: list[tuple[str, str]] = []
    token = ""
    while True:
        resp = stub.ListModels(registry_pb2.ListModelsRequest(
            page_token=token, tenant=tenant, label_selector={repository.LABEL: label}, page_size=1000),
            timeout=timeout, metadata=metadata)
        ids += [(m.spec.model_id, m.spec.version or "1") for m in resp.models]
        token = resp.next_page_token
        if not token:
            return ids


def register_repository(channel: grpc.Channel, args: argparse.Namespace) -> int:
    """The CLI command: progress bar on a terminal, one line per warning and failure."""
    tty = sys.stdout.isatty()
    bar: Any = None
    task: Any = None
    if tty:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.start()
        task = bar.add_task(f"scanning {args.repository}", total=None)

    def progress(phase: str, done: int, total: int) -> None:
        if bar is not None:
            bar.update(task, description=f"registering {total} models", completed=done, total=total)

    stub = registry_pb2_grpc.ModelRegistryStub(channel)
    try:
        summary = sync(stub, args.repository, timeout=args.timeout, replace=not args.no_update,
                       prune=args.prune, tenant=args.tenant, credentials_ref=args.credentials_ref,
                       progress=progress)
    except repository.RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.stop()
    for name, notes in sorted(summary.warnings.items()):
        for note in notes:
            print(f"warning: {name}: {note}", file=sys.stderr)
    for name, reason in sorted(summary.failed.items()):
        print(f"failed: {name}: {reason}", file=sys.stderr)
    print(f"repository {args.repository}: {summary.line()}")
    return 1 if summary.failed else 0


class Poller:
    """`mesh up --repository DIR --repository-poll 30s`: syncs the repository now and every
    `interval_s` (added, changed and removed models), in a daemon thread, until `close()`."""

    def __init__(self, address: str, location: str, interval_s: float, metadata: tuple) -> None:
        self.address, self.location, self.interval_s, self.metadata = address, location, interval_s, metadata
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repository-poll", daemon=True)
        self.last: Summary | None = None

    def sync_once(self) -> Summary:
        with grpc.insecure_channel(self.address) as channel:
            self.last = sync(registry_pb2_grpc.ModelRegistryStub(channel), self.location, metadata=self.metadata,
                             prune=True)
        return self.last

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                summary = self.sync_once()
            except (repository.RepositoryError, grpc.RpcError, OSError) as exc:
                print(f"repository poll: {exc}", flush=True)
                continue
            if summary.created or summary.updated or summary.removed or summary.failed:
                print(f"repository poll: {summary.line()}", flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
