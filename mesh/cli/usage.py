"""`mesh usage`: the showback report — requests and memory-seconds per tenant and model.

Read from the hourly hashes in Redis (mesh/telemetry.py `<ns>:use:<hour>`): routers add each
model's requests, the placement leader its LOADED copies' measured size x time
(placement/showback.py). Whole hours: `--since 24h` covers the 24 hours before the current
one plus the current one so far, and the report says which span it covers. Needs the mesh's
Redis (MESH_REDIS_URL); without Redis the mesh keeps no usage history.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import os
import sys
import time

from mesh.telemetry import MEMORY_FIELD, REQUESTS_FIELD, TelemetryKeys

HOUR_S = 3600


@dataclasses.dataclass
class Row:
    tenant: str
    model: str
    requests: int = 0
    memory_byte_seconds: int = 0

    @property
    def memory_gib_hours(self) -> float:
        return self.memory_byte_seconds / (1 << 30) / HOUR_S


@dataclasses.dataclass(frozen=True)
class Report:
    start_unix_s: int
    end_unix_s: int
    rows: list[Row]

    def as_dict(self) -> dict[str, object]:
        tenants: dict[str, dict[str, float]] = {}
        for r in self.rows:
            t = tenants.setdefault(r.tenant, {"requests": 0, "memory_byte_seconds": 0})
            t["requests"] += r.requests
            t["memory_byte_seconds"] += r.memory_byte_seconds
        return {"from": _iso(self.start_unix_s), "to": _iso(self.end_unix_s),
                "rows": [{**dataclasses.asdict(r), "memory_gib_hours": round(r.memory_gib_hours, 6)} for r in self.rows],
                "tenants": tenants}


def _iso(unix_s: int) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat(timespec="seconds")


def split_id(model_id: str) -> tuple[str, str]:
    """(tenant, public id) of an internal id; the default tenant is "default"."""
    tenant, sep, public = model_id.partition(":")
    return (tenant, public) if sep and tenant else ("default", model_id)


def read(redis: object, keys: TelemetryKeys, since_s: int, now_s: float | None = None,
         tenant: str = "") -> Report:
    """Sums the hourly hashes covering the last `since_s` seconds (whole hours)."""
    now = int(now_s if now_s is not None else time.time())
    first, last = (now - since_s) // HOUR_S, now // HOUR_S
    pipe = redis.pipeline(transaction=False)  # type: ignore[attr-defined]
    for hour in range(first, last + 1):
        pipe.hgetall(keys.usage(hour))
    rows: dict[str, Row] = {}
    for h in pipe.execute():
        for raw, value in (h or {}).items():
            field = raw.decode() if isinstance(raw, bytes) else str(raw)
            kind, model_id = field[:2], field[2:]
            if kind not in (REQUESTS_FIELD, MEMORY_FIELD):
                continue
            t, public = split_id(model_id)
            if tenant and t != tenant:
                continue
            row = rows.setdefault(model_id, Row(t, public))
            if kind == REQUESTS_FIELD:
                row.requests += int(value)
            else:
                row.memory_byte_seconds += int(value)
    ordered = sorted(rows.values(), key=lambda r: (r.tenant, -r.memory_byte_seconds, -r.requests, r.model))
    return Report(first * HOUR_S, now, ordered)


def render(report: Report, output: str) -> str:
    if output == "json":
        return json.dumps(report.as_dict(), indent=2, sort_keys=True)
    if output == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["tenant", "model", "requests", "memory_byte_seconds", "memory_gib_hours"])
        for r in report.rows:
            w.writerow([r.tenant, r.model, r.requests, r.memory_byte_seconds, f"{r.memory_gib_hours:.6f}"])
        return buf.getvalue().rstrip("\n")
    raise ValueError(output)


def run(args: argparse.Namespace) -> int:
    import redis as redis_mod

    from mesh.cli import tables

    url = args.redis or os.environ.get("MESH_REDIS_URL", "")
    if not url:
        print("error: mesh usage reads the mesh's Redis: pass --redis URL or set MESH_REDIS_URL "
              "(without Redis the mesh keeps no usage history)", file=sys.stderr)
        return 2
    client = redis_mod.Redis.from_url(url, socket_timeout=args.timeout, socket_connect_timeout=args.timeout)
    try:
        report = read(client, TelemetryKeys(args.root), args.since, tenant=args.tenant)
    except redis_mod.RedisError as exc:
        print(f"error: Redis at {url.split('@')[-1]}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.output != "table":
        print(render(report, args.output))
        return 0
    print(f"usage from {_iso(report.start_unix_s)} to {_iso(report.end_unix_s)} (whole hours)")
    tables.show(("TENANT", "MODEL", "REQUESTS", "MEMORY GiB·h"),
                [(r.tenant, r.model, str(r.requests), f"{r.memory_gib_hours:.4f}") for r in report.rows])
    return 0
