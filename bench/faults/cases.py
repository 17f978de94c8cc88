"""The case registry: each case says what it injects, what must hold (shared/RELIABILITY.md
b.2), the mesh it needs, and the function that injects the fault on a running `Run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bench.faults.harness import Run, Scenario


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    title: str
    injects: str
    must_hold: str
    scenario: Callable[[], Scenario]
    body: Callable[[Run], None]
    prepare: Callable[[Run], None] | None = None  # before the mesh starts (proxies, tmpfs)


CASES: dict[str, Case] = {}


def case(id: str, title: str, injects: str, must_hold: str, scenario: Callable[[], Scenario] | None = None,
         prepare: Callable[[Run], None] | None = None) -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    def wrap(body: Callable[[Run], None]) -> Callable[[Run], None]:
        CASES[id] = Case(id, title, injects, must_hold, scenario or Scenario, body, prepare)
        return body

    return wrap


def load_all() -> dict[str, Case]:
    from bench.faults import cases_data, cases_etcd, cases_procs  # noqa: F401 - they register

    return dict(sorted(CASES.items(), key=lambda kv: int(kv[0][1:])))
