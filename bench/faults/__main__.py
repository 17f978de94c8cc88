"""python -m bench.faults: see bench/faults/__init__.py and docs/RELIABILITY.md."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    from bench.faults.cases import load_all
    from bench.faults.harness import Options
    from bench.faults.runner import markdown, run_case, write

    cases = load_all()
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--case", action="append", default=[], metavar="FN", help="a case to run (repeatable)")
    parser.add_argument("--all", action="store_true", help="every case")
    parser.add_argument("--quick", action="store_true",
                        help="short phases, lease TTL 5 s, 1-minute soak (alone: every case, quickly)")
    parser.add_argument("--rate", type=float, help="offered requests per second (default 150)")
    parser.add_argument("--deadline", type=float, dest="deadline_s", help="client deadline, s (default 2)")
    parser.add_argument("--lease-ttl", type=int, dest="lease_ttl_s", help="mesh lease TTL, s (default 10; quick 5)")
    parser.add_argument("--soak-minutes", type=float, help="F23's length (default 30; quick 1)")
    parser.add_argument("--work", type=pathlib.Path, help="state dirs (default /tmp/meshserve-faults)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/meshserve-faults/results"),
                        help="where the JSON lines and markdown go")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for c in cases.values():
            print(f"{c.id:<4} {c.title}: {c.injects}")
        return 0
    chosen = [c.upper() for c in args.case] or (list(cases) if args.all or args.quick else [])
    unknown = [c for c in chosen if c not in cases]
    if not chosen or unknown:
        parser.error(f"unknown case(s) {unknown}" if unknown else "give --case FN, --all or --quick")
    opts = Options.make(args.quick, rate=args.rate, deadline_s=args.deadline_s, lease_ttl_s=args.lease_ttl_s,
                        soak_minutes=args.soak_minutes, work=args.work)
    rows = []
    for case_id in chosen:
        print(f"== {case_id} {cases[case_id].title} ...", flush=True)
        row = run_case(cases[case_id], opts)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("case", "valid", "error", "recovery_s", "errors_total",
                                                    "figures", "notes")}, default=str), flush=True)
    jsonl, md = write(rows, args.out)
    print("\n" + markdown(rows))
    print(f"rows: {jsonl}\ntable: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
