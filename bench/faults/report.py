"""Turns a case's request records and time marks into its row (JSON + a markdown line).

Phases (CLOCK_MONOTONIC seconds): before = [measure_start, fault_start), during =
[fault_start, during_end), after = [during_end, load_end), by request start time. A request the
client cancelled on purpose counts in no denominator. `recovery_s`: from the reference mark
(the fault's end, or its start for an instantaneous fault such as kill -9) to the start of the
first run of 50 consecutive successes.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

from bench.faults.loadgen import CLIENT_CANCEL, OK, WRONG

PHASES = ("before", "during", "after")
STREAK = 50
ALLOWED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}  # RELIABILITY.md b.1


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def offered_rate(rates: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Mean offered rate over [t0, t1) of a step schedule [(from_time, rate), ...]."""
    if t1 <= t0 or not rates:
        return 0.0
    total = 0.0
    for i, (start, rate) in enumerate(rates):
        stop = rates[i + 1][0] if i + 1 < len(rates) else float("inf")
        lo, hi = max(start, t0), min(stop, t1)
        if hi > lo:
            total += rate * (hi - lo)
    return total / (t1 - t0)


def phase_stats(rows: list[tuple], t0: float, t1: float, rates: Sequence[tuple[float, float]],
                deadline_s: float) -> dict[str, Any]:
    counted = [r for r in rows if r[5] != CLIENT_CANCEL]
    ok = [r for r in counted if r[5] == OK]
    lat_ok = [(r[1] - r[0]) * 1000 for r in ok]
    lat_all = [(r[1] - r[0]) * 1000 for r in counted]
    seconds = max(t1 - t0, 1e-9)
    errors = collections.Counter(r[5] for r in counted if r[5] != OK)
    p50, p99 = percentile(lat_ok, 0.5), percentile(lat_ok, 0.99)
    return {
        "seconds": round(seconds, 2),
        "offered_rps": round(offered_rate(rates, t0, t1), 1),
        "achieved_rps": round(len(rows) / seconds, 1),  # sent, client-cancelled ones included
        "goodput_rps": round(len(ok) / seconds, 1),
        "requests": len(counted),
        "ok": len(ok),
        "client_cancelled": len(rows) - len(counted),
        "success_pct": round(100.0 * len(ok) / len(counted), 3) if counted else None,
        "errors": dict(sorted(errors.items())),
        "p50_ms": round(p50, 2) if p50 is not None else None,
        "p99_ms": round(p99, 2) if p99 is not None else None,
        "max_ms": round(max(lat_all), 1) if lat_all else None,
        # answered (or given up) later than the client's deadline plus scheduling slack: a hang
        "past_deadline": sum(1 for x in lat_all if x > (deadline_s + 0.5) * 1000),
    }


def recovery_s(rows: list[tuple], ref: float) -> float | None:
    after = [r for r in rows if r[0] >= ref and r[5] != CLIENT_CANCEL]
    run = 0
    for i, r in enumerate(after):
        run = run + 1 if r[5] == OK else 0
        if run == STREAK:
            return round(max(after[i - STREAK + 1][0] - ref, 0.0), 2)
    return None


def as_rows(records: Mapping[str, list]) -> list[tuple]:
    """(start, end, endpoint, model, kind, code) sorted by start."""
    return sorted(zip(records["start"], records["end"], records["endpoint"], records["model"],
                      records["kind"], records["code"], strict=True))


def summarize(records: Mapping[str, list], marks: Mapping[str, Any], model_ids: Sequence[str],
              addresses: Sequence[str], deadline_s: float) -> dict[str, Any]:
    rows = as_rows(records)
    rates = marks["rates"]
    bounds = {
        "before": (marks["measure_start"], marks["fault_start"]),
        "during": (marks["fault_start"], marks["during_end"]),
        "after": (marks["during_end"], marks["load_end"]),
    }
    phases = {}
    for name, (t0, t1) in bounds.items():
        phases[name] = phase_stats([r for r in rows if t0 <= r[0] < t1], t0, t1, rates, deadline_s)
    before = phases["before"]
    gate = 0.9 * before["offered_rps"]
    valid = before["requests"] > 0 and before["achieved_rps"] >= gate
    per_model: dict[str, dict[str, Any]] = {}
    t0, t1 = bounds["during"][0], bounds["after"][1]
    for i, model_id in enumerate(model_ids):
        mine = [r for r in rows if r[3] == i and t0 <= r[0] < t1 and r[5] != CLIENT_CANCEL]
        per_model[model_id] = {"requests": len(mine), "ok": sum(1 for r in mine if r[5] == OK),
                               "errors": dict(collections.Counter(r[5] for r in mine if r[5] != OK))}
    all_codes = collections.Counter(r[5] for r in rows if r[5] not in (OK, CLIENT_CANCEL))
    return {
        "valid": valid,
        "void_reason": "" if valid else (
            f"pre-fault throughput {before['achieved_rps']} rps < 90 % of offered {before['offered_rps']}"),
        "phases": phases,
        "errors_total": dict(sorted(all_codes.items())),
        "disallowed_errors": {k: v for k, v in all_codes.items() if k not in ALLOWED},
        "wrong_answers": all_codes.get(WRONG, 0),
        "recovery_from": marks.get("recovery_from", "fault_end"),
        "recovery_s": recovery_s(rows, marks[marks.get("recovery_from", "fault_end")]),
        "per_model_during_after": per_model,
        "endpoints": list(addresses),
        "requests_total": len(rows),
        # started in the first (connecting) second or after load_end: in no phase
        "requests_outside_phases": sum(1 for r in rows if not marks["measure_start"] <= r[0] < marks["load_end"]),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else (f"{x:.1f}" if x < 99.95 else f"{x:.2f}".rstrip("0").rstrip("."))


def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "–" if x is None else fmt.format(x)


HEADER = ("| case | valid | offered rps | success % b/d/a | achieved rps b/d/a | p50 ms b/d/a | "
          "p99 ms b/d/a | errors (d+a) | recovery s | acked lost / info | loads | leaks | figures |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(row: Mapping[str, Any]) -> str:
    ph = row["phases"]
    b, d, a = ph["before"], ph["during"], ph["after"]
    errs = collections.Counter(d["errors"]) + collections.Counter(a["errors"])
    reg = row.get("registrations") or {}
    lost = f"{reg.get('lost_acked', '–')} / {reg.get('indeterminate', '–')}" if reg else "–"
    loads = row.get("loads") or {}
    leaks = row.get("leaks_summary", "–")
    figures = "; ".join(f"{k} {v}" for k, v in (row.get("figures") or {}).items()
                        if not isinstance(v, (dict, list, tuple)))  # the JSON row has the rest
    return (f"| {row['case']} | {'yes' if row['valid'] else 'VOID'} | {b['offered_rps']:.0f} | "
            f"{_pct(b['success_pct'])} / {_pct(d['success_pct'])} / {_pct(a['success_pct'])} | "
            f"{_num(b['achieved_rps'])} / {_num(d['achieved_rps'])} / {_num(a['achieved_rps'])} | "
            f"{_num(b['p50_ms'], '{:.1f}')} / {_num(d['p50_ms'], '{:.1f}')} / {_num(a['p50_ms'], '{:.1f}')} | "
            f"{_num(b['p99_ms'], '{:.0f}')} / {_num(d['p99_ms'], '{:.0f}')} / {_num(a['p99_ms'], '{:.0f}')} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(errs.items())) or '0'} | "
            f"{_num(row['recovery_s'], '{:.1f}')} | {lost} | {loads.get('summary', '–')} | {leaks} | {figures} |")
