"""A vmodel's rollout (issue 13 item 3): the record both sides share, and the figures it is judged by.

Who does what:
- a router starts one (VModels.StartRollout, router/vmodel_store.py): it checks the spec, makes
  the candidate ready, and writes VModelRecord.rollout (`Rollout.to_record()`) with the first
  step's weights, in one compare-and-swap; it also aborts one (AbortRollout);
- every router, for a vmodel whose rollout is RUNNING, records each request it resolved to the
  stable or the candidate target into Redis (router/telemetry.py, keys
  `TelemetryKeys.rollout(vmodel, second)`), per second: requests, errors and a latency histogram
  (`latency_bucket`);
- the placement leader (placement/rollouts.py) reads those seconds for the current step,
  judges the step (error rate early, p99 ratio at the dwell's end), and writes the next step,
  the promotion or the rollback, fenced by the leader key and a compare-and-swap on the record.
  Everything it needs is in the record and in Redis, so a new leader resumes where the old one
  was (it re-reads the step's seconds).

Weights at a step of p percent: stable 100 - p, candidate p (a weight of 0 is reached by the
rollout's tag route only: blue-green's validation step). Promotion: candidate 100, stable
dropped. Rollback: stable 100, candidate dropped.

Redis hash fields per (vmodel, second): "<model>|n" requests, "<model>|e" errors,
"<model>|l<i>" requests whose latency fell in bucket i (upper bound `bucket_upper_s(i)`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ABORTED = "aborted"
STATES = (RUNNING, PROMOTED, ROLLED_BACK, ABORTED)

RETENTION_S = 2 * 3600  # a second's counts expire after this (a step's dwell must be shorter)
MAX_DWELL_S = RETENTION_S - 600
MIN_REQUESTS = 20  # default: candidate requests a step needs before it is judged
HISTORY_LIMIT = 32  # steps kept in the record

# Latency histogram: bucket i holds latencies in (FIRST_S * 2**((i-1)/4), FIRST_S * 2**(i/4)];
# 19 % wide, from 0.25 ms to about 220 s.
FIRST_S = 0.00025
PER_OCTAVE = 4
BUCKETS = 80


def latency_bucket(seconds: float) -> int:
    if seconds <= FIRST_S:
        return 0
    return min(BUCKETS - 1, math.ceil(PER_OCTAVE * math.log2(seconds / FIRST_S)))


def bucket_upper_s(i: int) -> float:
    return FIRST_S * 2 ** (i / PER_OCTAVE)


@dataclasses.dataclass
class Counts:
    """One target's requests over some seconds."""

    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = dataclasses.field(default_factory=dict)  # bucket -> requests

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for i, n in other.latency.items():
            self.latency[i] = self.latency.get(i, 0) + n

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile_s(self, q: float) -> float:
        """The q-quantile of latency (0 without samples), interpolated within its bucket."""
        total = sum(self.latency.values())
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for i in sorted(self.latency):
            n = self.latency[i]
            if seen + n >= rank:
                low = bucket_upper_s(i - 1) if i > 0 else 0.0
                return low + (bucket_upper_s(i) - low) * ((rank - seen) / n)
            seen += n
        return bucket_upper_s(max(self.latency))


def parse_fields(fields: Mapping[Any, Any]) -> dict[str, Counts]:
    """A second's Redis hash -> model id -> Counts (malformed fields are skipped)."""
    out: dict[str, Counts] = {}
    for raw_key, raw_value in fields.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        model, sep, kind = key.rpartition("|")
        try:
            n = int(raw_value)
        except (TypeError, ValueError):
            continue
        if not sep or not model or not kind:
            continue
        counts = out.setdefault(model, Counts())
        if kind == "n":
            counts.requests += n
        elif kind == "e":
            counts.errors += n
        elif kind[0] == "l" and kind[1:].isdigit():
            counts.latency[int(kind[1:])] = counts.latency.get(int(kind[1:]), 0) + n
    return out


def check_steps(steps: Sequence[int]) -> str:
    """Why `steps` is not a valid step list ('' when it is): increasing percentages 0..100
    ending at 100."""
    if not steps:
        return "give at least one step, ending at 100 (e.g. 1,10,50,100)"
    if any(s < 0 or s > 100 for s in steps):
        return "steps are percentages of traffic, 0 to 100"
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        return "steps must increase (e.g. 1,10,50,100)"
    if steps[-1] != 100:
        return "the last step must be 100 (the candidate takes all traffic)"
    return ""


@dataclasses.dataclass
class Rollout:
    """VModelRecord.rollout, decoded. Model ids are internal ids (tenant:name)."""

    stable: str
    candidate: str
    steps: list[int]
    dwell_s: float
    max_error_rate: float = 0.01  # candidate error rate over a step above the stable one's
    max_p99_ratio: float = 0.0  # candidate p99 / stable p99 over a step; 0: not checked
    min_requests: int = MIN_REQUESTS
    tag_header: str = ""  # during the rollout a request with tag_header: tag_value goes to the candidate
    tag_value: str = ""
    state: str = RUNNING
    step: int = 0  # index into steps
    step_started_unix_ms: int = 0
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    reason: str = ""  # why it was promoted, rolled back or aborted; or why a step waits
    figures: dict[str, float] = dataclasses.field(default_factory=dict)  # the last judgement's figures
    # (keys: candidate_requests, candidate_errors, candidate_error_rate, candidate_p99_ms,
    #  stable_requests, stable_p99_ms, p99_ratio, first_error_unix_ms, detected_unix_ms)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one entry per finished step

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def percent(self) -> int:
        return self.steps[min(self.step, len(self.steps) - 1)]

    def weights(self) -> dict[str, int]:
        """The vmodel's active weights for the current state."""
        if self.state == PROMOTED:
            return {self.candidate: 100}
        if self.state in (ROLLED_BACK, ABORTED):
            return {self.stable: 100}
        p = self.percent
        out = {self.candidate: p}
        if p < 100:
            out[self.stable] = 100 - p
        return out

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, raw: Mapping[str, Any]) -> Rollout | None:
        """None for an empty mapping (no rollout) or a malformed one."""
        if not raw:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            out = cls(**{k: v for k, v in raw.items() if k in names})
            if not isinstance(out.steps, list) or not all(type(s) is int for s in out.steps) or check_steps(out.steps):
                return None
            numbers = (out.dwell_s, out.max_error_rate, out.max_p99_ratio, out.min_requests, out.step,
                       out.step_started_unix_ms, out.started_unix_ms, out.finished_unix_ms)
        except TypeError:
            return None
        if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
            return None
        if not isinstance(out.figures, dict) or not isinstance(out.history, list):
            return None
        if not out.stable or not out.candidate or out.state not in STATES:
            return None
        return out


def with_tag(tags: Mapping[str, Mapping[str, str]], header: str, value: str, model_id: str) -> dict[str, dict[str, str]]:
    """A vmodel's `tags` plus the route header: value -> model_id (none when header is empty)."""
    out = {h: dict(routes) for h, routes in tags.items()}
    if header:
        out.setdefault(header, {})[value] = model_id
    return out


def without_tag(tags: Mapping[str, Mapping[str, str]], ro: Rollout) -> dict[str, dict[str, str]]:
    """`tags` less the rollout's tag route (when it still names the candidate)."""
    out = {h: dict(routes) for h, routes in tags.items()}
    routes = out.get(ro.tag_header)
    if routes is not None and routes.get(ro.tag_value) == ro.candidate:
        del routes[ro.tag_value]
        if not routes:
            del out[ro.tag_header]
    return out
