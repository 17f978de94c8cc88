"""The placement leader's rollout runner: judges each RUNNING rollout's step from the routers'
per-second figures in Redis and writes the next step, the promotion or the rollback
(mesh/rollout.py is the design; router/rollout_store.py starts and aborts rollouts).

Every `tick_s` the leader sums, for each running rollout, the candidate's and the stable
target's counts over the seconds of the current step (keys `TelemetryKeys.rollout`). The
candidate is rolled back as soon as it has `min_requests` and an error rate over the stable
one's by more than the bound (the stable rate of an earlier step at the 100 % step); at
the dwell's end it is also judged by its p99 against the stable one's (at the 100 % step, the
stable p99 of an earlier step), then promoted to the next step or, past the last, to all
traffic. Between decisions the live figures (and why a step waits) are refreshed at most every
PROGRESS_S.

Closed seconds (older than CLOSED_MS: routers flush about once a second) are folded into one
running sum per step, so a tick reads only the newest few seconds; that sum is the only state
kept, and a new leader rebuilds it from Redis. Every write re-reads the record and is fenced
by leadership and a compare on its mod revision: a router's abort in between wins, and a lost
write is simply judged again on the next tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aetcd.rpc import rpc_pb2

from mesh import rollout, types
from mesh.clock import Clock
from mesh.kv.etcd import KV, MOD, compare, put_op
from mesh.rollout import Counts, Rollout
from mesh.state import MeshState
from mesh.telemetry import TelemetryKeys
from mesh.types import VModelRecord

log = logging.getLogger(__name__)

CHUNK = 500  # HGETALLs per Redis round trip
CLOSED_MS = 3000  # a second this much past its end is complete: routers flush ~1/s
PROGRESS_S = 5.0  # live figures and waiting notes are written at most this often

Build = Callable[[VModelRecord, Rollout], VModelRecord | None]


class _Client(Protocol):
    async def get(self, key: str) -> KV | None: ...


class _Fenced(Protocol):
    @property
    def is_leader(self) -> bool: ...

    async def write(self, ops: Sequence[rpc_pb2.RequestOp],
                    extra_compares: Sequence[rpc_pb2.Compare] = ()) -> bool: ...


class RedisDown(Exception):
    """Reading the step's seconds failed: nothing is decided this tick."""


@dataclasses.dataclass
class _Step:
    """The closed seconds of one rollout step, summed."""

    ident: tuple[Any, ...]
    next_second: int  # the first second not folded in yet
    sums: dict[str, Counts] = dataclasses.field(default_factory=dict)
    first_error_s: int = 0


def _ident(ro: Rollout) -> tuple[Any, ...]:
    return ro.candidate, ro.started_unix_ms, ro.step, ro.step_started_unix_ms


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _earlier(ro: Rollout, figure: str) -> float | None:
    """The last value of `figure` an earlier step recorded (None: none did)."""
    for entry in reversed(ro.history):
        figs = entry.get("figures", {})
        if float(figs.get("stable_requests", 0.0)) >= ro.min_requests and figure in figs:
            return float(figs[figure])
    return None


def stable_reference_ms(ro: Rollout, stable: Counts) -> float:
    """The stable p99 a step is compared with: this step's when the stable target had
    min_requests, else the last one an earlier step recorded (0: none known)."""
    if stable.requests >= ro.min_requests and stable.quantile_s(0.99) > 0:
        return _ms(stable.quantile_s(0.99))
    return _earlier(ro, "stable_p99_ms") or 0.0


def stable_error_rate(ro: Rollout, stable: Counts) -> float:
    """The stable error rate the candidate's is compared with: this step's when the stable
    target had min_requests, else an earlier step's (the 100 % step has no stable traffic), else 0."""
    if stable.requests >= ro.min_requests:
        return stable.error_rate
    return _earlier(ro, "stable_error_rate") or 0.0


def figures(ro: Rollout, cand: Counts, stable: Counts, first_error_s: int) -> dict[str, float]:
    return {
        "candidate_requests": float(cand.requests), "candidate_errors": float(cand.errors),
        "candidate_error_rate": cand.error_rate, "candidate_p99_ms": _ms(cand.quantile_s(0.99)),
        "stable_requests": float(stable.requests), "stable_p99_ms": stable_reference_ms(ro, stable),
        "stable_error_rate": stable_error_rate(ro, stable),
        "p99_ratio": 0.0, "first_error_unix_ms": float(first_error_s * 1000), "detected_unix_ms": 0.0,
    }


def _ended(ro: Rollout, outcome: str, figs: dict[str, float], now: int) -> list[dict[str, Any]]:
    entry = {"percent": ro.percent, "started_unix_ms": ro.step_started_unix_ms, "ended_unix_ms": now,
             "outcome": outcome, "figures": dict(figs)}
    return [*ro.history, entry][-rollout.HISTORY_LIMIT:]


def rolled_back(record: VModelRecord, ro: Rollout, reason: str, figs: dict[str, float],
                now: int) -> VModelRecord:
    figs = {**figs, "detected_unix_ms": float(now)}
    done = dataclasses.replace(ro, state=rollout.ROLLED_BACK, finished_unix_ms=now, reason=reason, figures=figs,
                               history=_ended(ro, rollout.ROLLED_BACK, figs, now))
    return dataclasses.replace(record, active=done.weights(), rollout=done.to_record(), updated_unix_ms=now,
                               tags=rollout.without_tag(record.tags, ro))


def promoted(record: VModelRecord, ro: Rollout, judged: str, figs: dict[str, float], now: int) -> VModelRecord:
    """`record` with the step of `ro` passed: the next step, or all traffic on the candidate."""
    figs = {**figs, "detected_unix_ms": float(now)}
    history = _ended(ro, rollout.PROMOTED, figs, now)
    step = ro.step + 1
    tags = record.tags
    if step >= len(ro.steps):
        new = dataclasses.replace(ro, state=rollout.PROMOTED, step=step, finished_unix_ms=now, figures=figs,
                                  history=history, reason=f"promoted: {judged}")
        tags = rollout.without_tag(record.tags, ro)
    else:
        new = dataclasses.replace(ro, step=step, step_started_unix_ms=now, figures=figs, history=history,
                                  reason=f"step {step + 1} of {len(ro.steps)}: {ro.steps[step]}% to the "
                                         f"candidate (passed {ro.percent}%: {judged})")
    return dataclasses.replace(record, active=new.weights(), rollout=new.to_record(), updated_unix_ms=now, tags=tags)


def progressed(record: VModelRecord, ro: Rollout, reason: str | None, figs: dict[str, float],
               now: int) -> VModelRecord | None:
    """Live figures (and why the step waits) when they changed, at most every PROGRESS_S."""
    reason = ro.reason if reason is None else reason
    if (reason, figs) == (ro.reason, ro.figures) or now - record.updated_unix_ms < PROGRESS_S * 1000:
        return None
    new = dataclasses.replace(ro, reason=reason, figures=figs)
    return dataclasses.replace(record, rollout=new.to_record(), updated_unix_ms=now)


class RolloutRunner:
    def __init__(self, client: _Client, redis: object, keys: TelemetryKeys, state: MeshState, leader: _Fenced,
                 clock: Clock, tick_s: float = 0.5) -> None:
        self.client = client  # EtcdClient: the record is re-read before each write
        self.redis = redis  # redis.asyncio.Redis
        self.keys = keys
        self.state = state
        self.leader = leader
        self.clock = clock
        self.tick_s = tick_s
        self._steps: dict[str, _Step] = {}  # vmodel -> its current step's closed seconds
        self._failing = False
        self._bad: dict[str, str] = {}  # vmodel -> the error last logged for it (logged once)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self.tick()

    async def tick(self) -> int:
        """Judges every running rollout once; returns how many decisions (step passed, promoted,
        rolled back) it wrote."""
        if not self.leader.is_leader:
            self._steps.clear()
            return 0
        running: dict[str, tuple[VModelRecord, Rollout]] = {}
        for name, record in list(self.state.vmodels.items()):
            ro = Rollout.from_record(record.rollout)
            if ro is None and record.rollout:
                self._complain(name, "malformed rollout record, not judged")
                continue
            if ro is not None and ro.running:
                running[name] = (record, ro)
        self._steps = {n: s for n, s in self._steps.items() if n in running and s.ident == _ident(running[n][1])}
        self._bad = {n: why for n, why in self._bad.items() if n in self.state.vmodels}
        decided = 0
        for name, (record, ro) in sorted(running.items()):
            try:
                decided += await self._judge(name, record, ro)
                self._bad.pop(name, None)
            except RedisDown as exc:
                if not self._failing:
                    log.warning("rollouts: Redis read failed, no rollout is judged until it answers "
                                "(MESH_REDIS_URL): %s", exc)
                self._failing = True
                return decided
            except Exception as exc:  # noqa: BLE001 - one bad vmodel must not stop the others' rollouts
                self._complain(name, f"judging failed, retried every tick: {exc!r}", exc)
        return decided

    def _complain(self, name: str, why: str, exc: Exception | None = None) -> None:
        if self._bad.get(name) != why:
            log.warning("rollout of vmodel %s: %s", name, why, exc_info=exc)
            self._bad[name] = why

    async def _judge(self, name: str, record: VModelRecord, ro: Rollout) -> int:
        now = self.clock.unix_ms()
        sums, first_error_s = await self._sums(name, ro, now)
        cand, stable = sums.get(ro.candidate, Counts()), sums.get(ro.stable, Counts())
        figs = figures(ro, cand, stable, first_error_s)
        over = f"over {cand.requests} requests at step {ro.percent}%"
        # Relative to the stable target: callers' own bad requests fail on both alike.
        bound = figs["stable_error_rate"] + ro.max_error_rate
        rate = f"candidate error rate {cand.error_rate:.3g}"
        if cand.requests >= ro.min_requests and cand.error_rate > bound:
            why = f"{rate} > {bound:.3g} (stable {figs['stable_error_rate']:.3g} + {ro.max_error_rate:g}) {over}"
            return await self._decide(name, ro, lambda r, f: rolled_back(r, f, why, figs, now), why)
        if now - ro.step_started_unix_ms < ro.dwell_s * 1000:
            await self._write(name, ro, lambda r, f: progressed(r, f, None, figs, now))
            return 0
        if cand.requests < ro.min_requests:
            note = f"waiting: {cand.requests} of {ro.min_requests} candidate requests this step"
            await self._write(name, ro, lambda r, f: progressed(r, f, note, figs, now))
            return 0
        judged = f"{rate} <= {bound:.3g}"
        if ro.max_p99_ratio > 0:
            if figs["stable_p99_ms"] > 0:
                ratio = figs["p99_ratio"] = round(figs["candidate_p99_ms"] / figs["stable_p99_ms"], 4)
                p99 = (f"candidate p99 {figs['candidate_p99_ms']:.1f} ms / stable p99 "
                       f"{figs['stable_p99_ms']:.1f} ms = {ratio:.2f}")
                if ratio > ro.max_p99_ratio:
                    why = f"{p99} > {ro.max_p99_ratio:g} {over}"
                    return await self._decide(name, ro, lambda r, f: rolled_back(r, f, why, figs, now), why)
                judged += f", {p99} <= {ro.max_p99_ratio:g}"
            else:
                judged += ", p99 not compared: no stable p99 known"
        judged += f" {over}"
        return await self._decide(name, ro, lambda r, f: promoted(r, f, judged, figs, now), judged)

    async def _decide(self, name: str, ro: Rollout, build: Build, why: str) -> int:
        if not await self._write(name, ro, build):
            return 0
        self._steps.pop(name, None)
        log.info("rollout of vmodel %s to %s at step %d%%: %s", name, ro.candidate, ro.percent, why)
        return 1

    async def _write(self, name: str, ro: Rollout, build: Build) -> bool:
        """Applies `build` to the record as etcd has it now, if it still runs the same step."""
        key = self.state.keys.vmodel(name)
        kv = await self.client.get(key)
        if kv is None:
            return False
        current = types.decode(VModelRecord, kv.value)
        fresh = Rollout.from_record(current.rollout)
        if fresh is None or not fresh.running or _ident(fresh) != _ident(ro):
            return False  # aborted, or decided already (our view lags behind our own write)
        new = build(current, fresh)
        if new is None:
            return False
        return await self.leader.write([put_op(key, types.encode(new))], [compare(key, MOD, kv.mod_revision)])

    async def _sums(self, name: str, ro: Rollout, now: int) -> tuple[dict[str, Counts], int]:
        """The step's counts per model so far, and the first second with candidate errors (0: none)."""
        start = ro.step_started_unix_ms // 1000
        step = self._steps.get(name)
        if step is None or step.ident != _ident(ro):
            step = self._steps[name] = _Step(_ident(ro), start)
        newest = now // 1000
        step.next_second = max(step.next_second, newest - rollout.RETENTION_S)  # older ones have expired
        seconds = list(range(step.next_second, newest + 1))
        hashes = await self._read([self.keys.rollout(name, s) for s in seconds])
        sums = {m: dataclasses.replace(c, latency=dict(c.latency)) for m, c in step.sums.items()}
        first_error_s = step.first_error_s
        for second, fields in zip(seconds, hashes, strict=True):
            parsed = rollout.parse_fields(fields or {})
            errors = parsed.get(ro.candidate, Counts()).errors
            if errors and not first_error_s:
                first_error_s = second
            for model, counts in parsed.items():
                sums.setdefault(model, Counts()).add(counts)
            if (second + 1) * 1000 + CLOSED_MS <= now and second == step.next_second:
                for model, counts in parsed.items():
                    step.sums.setdefault(model, Counts()).add(counts)
                if errors and not step.first_error_s:
                    step.first_error_s = second
                step.next_second = second + 1
        return sums, first_error_s

    async def _read(self, keys: list[str]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(keys), CHUNK):
            pipe = self.redis.pipeline(transaction=False)  # type: ignore[attr-defined]
            try:
                for key in keys[i:i + CHUNK]:
                    pipe.hgetall(key)
                out.extend(await pipe.execute())
            except Exception as exc:  # noqa: BLE001 - any Redis failure: judge nothing on partial data
                raise RedisDown(str(exc) or type(exc).__name__) from exc
            finally:
                await pipe.reset()
        if self._failing:
            log.info("rollouts: Redis answers again")
            self._failing = False
        return out
