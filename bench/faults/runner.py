"""Runs cases one after another and writes their rows (JSON lines + a markdown table)."""

from __future__ import annotations

import json
import pathlib
import time
import traceback
from typing import Any

from bench.faults import report
from bench.faults.cases import Case
from bench.faults.harness import Options, Run


def run_case(case: Case, opts: Options) -> dict[str, Any]:
    """The case's row; a case that could not run gets a row with `error` (and no figures)."""
    run = Run(case.id, case.title, case.scenario(), opts)
    started = time.monotonic()
    try:
        if case.prepare is not None:
            case.prepare(run)
        run.start()
        soak = opts.soak_minutes * 60 if case.id == "F23" else 0
        run.start_load(max_seconds=soak + 900)
        run.sleep(opts.before_s + 1)  # 'before': the first second is excluded as connecting
        case.body(run)
        run.sleep(opts.after_s)
        row = run.finish()
    except Exception as exc:
        row = {"case": case.id, "title": case.title, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-4000:], "notes": run.notes, "figures": run.figures}
    finally:
        run.close()
    row.update(injects=case.injects, must_hold=case.must_hold, state_dir=str(run.dir),
               wall_s=round(time.monotonic() - started, 1))
    return row


def write(rows: list[dict[str, Any]], out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jsonl, md = out / f"faults-{stamp}.jsonl", out / f"faults-{stamp}.md"
    jsonl.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    md.write_text(markdown(rows))
    return jsonl, md


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [report.HEADER]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | ERROR | {r['error'][:120]} |" + " |" * 10)
        else:
            lines.append(report.markdown_row(r))
    return "\n".join(lines) + "\n"
