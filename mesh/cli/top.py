"""`mesh top`: the busiest models, the mesh's hit ratio and the pods' memory, refreshed.

Sources, all the mesh's own: the registry API (models, copies, measured sizes), the router's
ModelStatistics (requests per model, summed over pods: the rate is the difference between
two refreshes), and optionally the Prometheus ports given with `--metrics` (routers: hit
ratio from mesh_cache_hits_total / mesh_cache_misses_total; pods: capacity and use from
modelmesh_instance_*). Bounded: `--once` prints one frame, `--iterations N` N frames; it
stops on Ctrl-C. A terminal gets a live rich display, anything else plain frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import urllib.request
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from mesh.cli import tables
from mesh.pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from mesh.units import format_bytes


@dataclasses.dataclass
class Sample:
    at: float
    models: list[types_pb2.ModelStatus]
    requests: dict[str, int]  # model id -> inference count (router's ModelStatistics)
    scraped: dict[str, dict[str, float]]  # endpoint -> 'name{labels}' -> value


def _size(n: float) -> str:
    return format_bytes(int(n)) if n else "-"


def scrape(endpoint: str, timeout: float) -> dict[str, float]:
    url = endpoint if "://" in endpoint else f"http://{endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - an operator's own endpoint
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value  # summed over labels
    return out


def take(channel: grpc.Channel, args: argparse.Namespace) -> Sample:
    from mesh.pb.inference import extensions_pb2 as ext
    from mesh.pb.inference import grpc_predict_v2_pb2_grpc as pb_grpc

    models: list[types_pb2.ModelStatus] = []
    token = ""
    while True:
        resp = registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
            registry_pb2.ListModelsRequest(page_token=token), timeout=args.timeout)
        models.extend(resp.models)
        token = resp.next_page_token
        if not token:
            break
    requests: dict[str, int] = {}
    try:
        stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            ext.ModelStatisticsRequest(name=""), timeout=args.timeout)
        requests = {s.name: int(s.inference_count) for s in stats.model_stats}
    except grpc.RpcError:
        pass  # a router without statistics: rates are "-"
    scraped: dict[str, dict[str, float]] = {}
    for endpoint in args.metrics:
        try:
            scraped[endpoint] = scrape(endpoint, min(args.timeout, 5.0))
        except OSError:
            scraped[endpoint] = {}
    return Sample(time.monotonic(), models, requests, scraped)


def frame(before: Sample | None, now: Sample, limit: int) -> list[tuple[str, list[str], list[tuple[str, ...]]]]:
    """The frame's tables: (title, header, rows)."""
    elapsed = (now.at - before.at) if before else 0.0
    rows = []
    for m in now.models:
        mid = m.spec.model_id
        total = now.requests.get(mid)
        rate = None
        if before is not None and total is not None and elapsed > 0:
            rate = max(total - before.requests.get(mid, 0), 0) / elapsed
        loaded = sum(1 for c in m.copies if c.state == types_pb2.LOADED)
        rows.append((rate or 0.0, total or 0, mid, (
            mid, m.spec.tenant or "-", types_pb2.ModelState.Name(m.state).removeprefix("MODEL_"),
            f"{loaded}/{len(m.copies)}", _size(m.size_bytes),
            f"{rate:.1f}" if rate is not None else "-", str(total) if total is not None else "-")))
    rows.sort(key=lambda r: (-r[0], -r[1], r[2]))
    hot: list[tuple[str, ...]] = [r[3] for r in rows[:limit]]
    pods: dict[str, list[float]] = {}
    for m in now.models:
        for c in m.copies:
            if c.state == types_pb2.LOADED:
                p = pods.setdefault(c.instance_id, [0, 0.0])
                p[0] += 1
                p[1] += c.size_bytes
    pod_rows: list[tuple[str, ...]] = [(pod, str(int(n)), _size(used)) for pod, (n, used) in sorted(pods.items())]
    hits = sum(s.get("mesh_cache_hits_total", 0.0) for s in now.scraped.values())
    misses = sum(s.get("mesh_cache_misses_total", 0.0) for s in now.scraped.values())
    summary: list[tuple[str, ...]] = [("models", str(len(now.models))),
               ("loaded", str(sum(1 for m in now.models if m.state == types_pb2.MODEL_LOADED))),
               ("hit ratio", f"{hits / (hits + misses):.3f}" if hits + misses else "-")]
    endpoint_rows: list[tuple[str, ...]] = [(e, _size(s.get("modelmesh_instance_capacity_bytes", 0)),
                      _size(s.get("modelmesh_instance_used_bytes", 0)),
                      str(int(s.get("modelmesh_instance_models_total", 0))))
                     for e, s in sorted(now.scraped.items()) if "modelmesh_instance_capacity_bytes" in s]
    out: list[tuple[str, list[str], list[tuple[str, ...]]]] = [
           ("mesh", ["FIGURE", "VALUE"], summary),
           ("models by request rate", ["MODEL", "TENANT", "STATE", "COPIES", "SIZE", "REQ/S", "REQUESTS"], hot),
           ("pods (loaded copies)", ["POD", "MODELS", "USED"], pod_rows)]
    if endpoint_rows:
        out.append(("pods (metrics)", ["ENDPOINT", "CAPACITY", "USED", "MODELS"], endpoint_rows))
    return out


def run(channel: grpc.Channel, args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep) -> int:
    frames = 1 if args.once else args.iterations  # 0: until Ctrl-C
    live = sys.stdout.isatty()
    before = take(channel, args)
    shown = 0
    try:
        if live:
            from rich.console import Group
            from rich.live import Live

            with Live(refresh_per_second=4, screen=False) as display:
                while not frames or shown < frames:
                    sleep(args.interval)
                    now = take(channel, args)
                    display.update(Group(*(tables.rich_table(h, r, t) for t, h, r in frame(before, now, args.limit))))
                    before, shown = now, shown + 1
        else:
            while not frames or shown < frames:
                sleep(args.interval)
                now = take(channel, args)
                print(f"--- {time.strftime('%H:%M:%S')}")
                for title, header, rows in frame(before, now, args.limit):
                    print(f"{title}:\n{tables.plain(header, rows)}")
                sys.stdout.flush()
                before, shown = now, shown + 1
    except KeyboardInterrupt:
        pass
    return 0
