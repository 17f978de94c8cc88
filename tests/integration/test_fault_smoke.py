"""CI smoke of the fault suite (bench/faults): one quick case end to end through the real
harness (its own etcd, placement, pods, two routers, the load generator process), asserting the
harness's own invariants — answers checked against golden, counts that add up, a row with every
field — never timing targets. The suite itself is `python -m bench.faults` (docs/RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from bench.faults import loadgen, report
from bench.faults.cases import load_all
from bench.faults.harness import Options, in_child
from bench.faults.runner import markdown, run_case
from mesh.cli import procs

pytestmark = pytest.mark.integration

ROW_FIELDS = {"case", "title", "date", "quick", "lease_ttl_s", "deadline_s", "valid", "void_reason", "phases",
              "errors_total", "disallowed_errors", "wrong_answers", "recovery_from", "recovery_s",
              "per_model_during_after", "endpoints", "requests_total", "requests_outside_phases", "loads",
              "leaks", "leaks_summary", "figures", "notes", "marks_s", "injects", "must_hold", "state_dir",
              "wall_s"}
PHASE_FIELDS = {"seconds", "offered_rps", "achieved_rps", "goodput_rps", "requests", "ok", "client_cancelled",
                "success_pct", "errors", "p50_ms", "p99_ms", "max_ms", "past_deadline"}


def test_answer_check_tells_right_from_wrong() -> None:
    """The golden comparison the load generator applies to every answer (run in a child: it
    decodes with meshserve's `inference` module, which must not meet tritonclient's)."""
    assert in_child(loadgen.selfcheck) == {"equal": True, "rounding": True, "wrong": False, "shape": False}


def test_router_crash_case_runs_end_to_end(tmp_path: pathlib.Path) -> None:
    opts = Options.make(True, before_s=2.0, after_s=2.0, rate=40.0, lease_ttl_s=3, work=tmp_path)
    row = run_case(load_all()["F2"], opts)
    assert "error" not in row, row.get("traceback")
    assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
    phases = row["phases"]
    assert set(phases) == {"before", "during", "after"}
    for name, ph in phases.items():
        assert PHASE_FIELDS <= set(ph), (name, PHASE_FIELDS - set(ph))
        assert ph["ok"] + sum(ph["errors"].values()) == ph["requests"], (name, ph)
        assert ph["requests"] > 0, (name, ph)
    counted = sum(ph["requests"] + ph["client_cancelled"] for ph in phases.values())
    assert counted + row["requests_outside_phases"] == row["requests_total"]
    assert sum(row["errors_total"].values()) <= row["requests_total"]
    # Every answer was compared with onnxruntime's: none differed.
    assert row["wrong_answers"] == 0 and "WRONG" not in row["errors_total"]
    assert row["endpoints"] and len(row["endpoints"]) == 2  # F2: two routers, round robin
    per_model = row["per_model_during_after"]
    assert set(per_model) == {"hot-2copy", "hot-a", "hot-b"}
    assert sum(m["requests"] for m in per_model.values()) == phases["during"]["requests"] + phases["after"]["requests"]
    figures = row["figures"]
    assert {"in_flight_at_kill", "failed", "failed_started_1s_after"} <= set(figures), figures
    assert figures["failed"] <= sum(row["errors_total"].values())
    marks = row["marks_s"]
    assert marks["load_start"] <= marks["measure_start"] <= marks["fault_start"] <= marks["fault_end"] \
        <= marks["during_end"] <= marks["load_end"]
    assert row["loads"]["available"] is True
    assert row["leaks"] and row["leaks_summary"] != "–"
    assert "router-1" in row["leaks"] and row["leaks"]["router-1"] == "restarted"  # killed and started again
    md = markdown([row])
    assert md.count("\n") == 3 and md.splitlines()[2].count("|") == report.HEADER.splitlines()[0].count("|")
    # every process the case started is gone
    assert not list(_children_of(pathlib.Path(row["state_dir"])))


def _children_of(run_dir: pathlib.Path) -> list[int]:
    """Processes whose stdout is a log file under the run's folder (every child the case started)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "fd" / "1").startswith(str(run_dir)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_fault_proxy_blackholes_and_heals(tmp_path: pathlib.Path) -> None:
    """F14's tool: bytes stop both ways on SIGUSR1 (the connection stays open) and flow on SIGUSR2."""
    target, listen = procs.free_port(), procs.free_port()

    async def echo_server() -> asyncio.AbstractServer:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()

        return await asyncio.start_server(echo, "127.0.0.1", target)

    proxy = subprocess.Popen([sys.executable, "-m", "bench.faults.proxy", "--listen", str(listen),
                              "--target", str(target)], stdout=subprocess.PIPE, text=True)

    async def scenario() -> tuple[bytes, bool, bytes]:
        server = await echo_server()
        procs.wait_port("127.0.0.1", listen, 20, proxy)
        r, w = await asyncio.open_connection("127.0.0.1", listen)
        w.write(b"one")
        first = await asyncio.wait_for(r.readexactly(3), 5)
        proxy.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.5)
        w.write(b"two")
        try:
            await asyncio.wait_for(r.readexactly(3), 1.0)
            held = False
        except TimeoutError:
            held = True
        proxy.send_signal(signal.SIGUSR2)
        late = await asyncio.wait_for(r.readexactly(3), 5)
        w.close()
        server.close()
        return first, held, late

    try:
        first, held, late = asyncio.run(scenario())
    finally:
        procs.stop(proxy)
    assert (first, held, late) == (b"one", True, b"two")
