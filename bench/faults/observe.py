"""What the harness measures besides the request stream: acknowledged registrations (a
Jepsen-style history checked against etcd), loads per model from etcd's own history, and leak
figures (RSS, fds, asyncio tasks) of every mesh process from /proc and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mesh import types
from mesh.kv.etcd import Compacted, EtcdClient
from mesh.kv.keys import Keys
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

T = TypeVar("T")

# Codes after which a registration certainly did not happen; anything else but OK is :info.
_DEFINITE_FAIL = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED",
                  "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "UNIMPLEMENTED"}


def etcd_call(endpoint: str, fn: Callable[[EtcdClient], Awaitable[T]], timeout: float = 3.0) -> T:
    async def go() -> T:
        client = EtcdClient([endpoint], timeout=timeout)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


# -- registrations --------------------------------------------------------------------------


@dataclasses.dataclass
class Op:
    model_id: str
    router: str
    invoked: float
    done: float = 0.0
    outcome: str = ""  # ok | fail | info (indeterminate: may or may not have been applied)
    code: str = ""
    read_after_ack: str = ""  # GetModel right after an OK: OK, NOT_FOUND, ...


class Registrations:
    """Registers a new model every `interval_s` while running (through the routers in turn),
    records invoke -> ok / fail / info, then checks the history against etcd."""

    def __init__(self, routers: list[str], uri: str, prefix: str, interval_s: float = 0.25,
                 deadline_s: float = 2.0) -> None:
        self.routers, self.uri, self.prefix = routers, uri, prefix
        self.interval_s, self.deadline_s = interval_s, deadline_s
        self.ops: list[Op] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        channels = {r: grpc.insecure_channel(r) for r in self.routers}
        try:
            while not self._stop.is_set():
                router = self.routers[len(self.ops) % len(self.routers)]
                self._one(registry_pb2_grpc.ModelRegistryStub(channels[router]), router)
                self._stop.wait(self.interval_s)
        finally:
            for c in channels.values():
                c.close()

    def _one(self, stub: registry_pb2_grpc.ModelRegistryStub, router: str) -> None:
        op = Op(f"{self.prefix}-{len(self.ops)}", router, time.monotonic())
        self.ops.append(op)
        spec = types_pb2.ModelSpec(model_id=op.model_id, storage_uri=self.uri)
        try:
            stub.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec), timeout=self.deadline_s)
            op.outcome, op.code = "ok", "OK"
        except grpc.RpcError as exc:
            op.code = exc.code().name  # type: ignore[attr-defined]
            op.outcome = "fail" if op.code in _DEFINITE_FAIL else "info"
        op.done = time.monotonic()
        if op.outcome == "ok":
            try:
                stub.GetModel(registry_pb2.GetModelRequest(model_id=op.model_id), timeout=self.deadline_s)
                op.read_after_ack = "OK"
            except grpc.RpcError as exc:
                op.read_after_ack = exc.code().name  # type: ignore[attr-defined]

    def check(self, etcd: str, root: str) -> dict[str, Any]:
        """The history against a fresh (linearizable) list of etcd's models."""
        keys = Keys(root)

        async def list_models(client: EtcdClient) -> set[str]:
            kvs, _ = await client.get_prefix(keys.prefix("models"))
            return {kv.key.rsplit("/", 1)[-1] for kv in kvs}

        present = etcd_call(etcd, list_models)
        ok = [o for o in self.ops if o.outcome == "ok"]
        info = [o for o in self.ops if o.outcome == "info"]
        fail = [o for o in self.ops if o.outcome == "fail"]
        codes: dict[str, int] = {}
        for o in self.ops:
            codes[o.code] = codes.get(o.code, 0) + 1
        lat = sorted((o.done - o.invoked) * 1000 for o in self.ops)
        return {
            "attempted": len(self.ops),
            "acked": len(ok),
            "lost_acked": sum(1 for o in ok if o.model_id not in present),
            "lost_acked_ids": [o.model_id for o in ok if o.model_id not in present][:20],
            "indeterminate": len(info),
            "indeterminate_applied": sum(1 for o in info if o.model_id in present),
            "failed": len(fail),
            "failed_but_applied": sum(1 for o in fail if o.model_id in present),
            "not_found_after_ack": sum(1 for o in ok if o.read_after_ack == "NOT_FOUND"),
            "codes": codes,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
        }


# -- loads per model, from etcd's history -----------------------------------------------------


def copy_history(etcd: str, root: str, start_revision: int, quiet_s: float = 1.5) -> dict[str, Any]:
    """Every copy-record change since `start_revision`: per model, loads (transitions of a copy
    into LOADED), load attempts (into LOADING) and failures (into FAILED)."""
    keys = Keys(root)

    async def read(client: EtcdClient) -> list[tuple[str, bytes | None]]:
        events: list[tuple[str, bytes | None]] = []
        stream = client.watch_prefix(keys.prefix("copies"), start_revision).__aiter__()
        while True:
            try:
                batch = await asyncio.wait_for(stream.__anext__(), quiet_s)
            except (TimeoutError, StopAsyncIteration):
                break
            events.extend((e.key, e.value) for e in batch.events)
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
        return events

    try:
        events = etcd_call(etcd, read)
    except Compacted as exc:
        return {"available": False, "why": str(exc)}
    last: dict[str, str] = {}
    per_model: dict[str, dict[str, int]] = {}
    for key, value in events:
        _, parts = keys.parse(key)
        if len(parts) != 2:
            continue
        model = per_model.setdefault(parts[0], {"loads": 0, "attempts": 0, "failed": 0})
        if value is None:
            last.pop(key, None)
            continue
        try:
            state = types.decode(types.CopyRecord, value).state.value
        except ValueError:
            continue
        if state != last.get(key):
            field = {"LOADED": "loads", "LOADING": "attempts", "FAILED": "failed"}.get(state, "unloading")
            model[field] = model.get(field, 0) + 1
        last[key] = state
    loads = [m["loads"] for m in per_model.values()]
    return {
        "available": True,
        "per_model": per_model,
        "total_loads": sum(loads),
        "max_loads_per_model": max(loads) if loads else 0,
        "summary": f"{sum(loads)} loads, max {max(loads) if loads else 0}/model",
    }


# -- leaks ----------------------------------------------------------------------------------


def proc_figures(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None
    return {"pid": pid, "rss_kb": rss, "fds": fds}


def sample(mesh: Any) -> dict[str, dict[str, int]]:
    """RSS, fds and (where /metrics has mesh_asyncio_tasks) asyncio tasks of every child."""
    out: dict[str, dict[str, int]] = {}
    for name, pid in mesh.children().items():
        fig = proc_figures(pid)
        if fig is None:
            continue
        if f"{name}-metrics" in mesh.ports:
            with contextlib.suppress(Exception):
                fig["tasks"] = int(mesh.scrape(name).get("mesh_asyncio_tasks", -1))
        out[name] = fig
    return out


def leak_deltas(pre: dict[str, dict[str, int]], post: dict[str, dict[str, int]]) -> dict[str, Any]:
    deltas: dict[str, Any] = {}
    for name, a in pre.items():
        b = post.get(name)
        if b is None:
            deltas[name] = "gone"
        elif b["pid"] != a["pid"]:
            deltas[name] = "restarted"
        else:
            deltas[name] = {k: b[k] - a[k] for k in ("rss_kb", "fds", "tasks") if k in a and k in b
                            and a[k] >= 0 and b[k] >= 0}
    return deltas


def leak_summary(deltas: dict[str, Any]) -> str:
    same = {n: d for n, d in deltas.items() if isinstance(d, dict)}
    if not same:
        return "–"
    rss_name = max(same, key=lambda n: same[n].get("rss_kb", 0))
    fds = max(d.get("fds", 0) for d in same.values())
    tasks = [d["tasks"] for d in same.values() if "tasks" in d]
    text = f"RSS +{same[rss_name].get('rss_kb', 0) / 1024:.1f} MiB ({rss_name}), fds {fds:+d}"
    return text + (f", tasks {max(tasks):+d}" if tasks else "")


def slope_per_min(series: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(series) < 3:
        return None
    n = len(series)
    mx = sum(t for t, _ in series) / n
    my = sum(v for _, v in series) / n
    var = sum((t - mx) ** 2 for t, _ in series)
    if var == 0:
        return None
    return 60 * sum((t - mx) * (v - my) for t, v in series) / var
