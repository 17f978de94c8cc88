"""placement/rollouts.py: the leader judges running rollouts from Redis and writes their steps.

The fakes model what the runner must get right: etcd records carry mod revisions and the fake
leader applies a write only while leading and when its MOD compare still holds (a router may
abort in between); Redis answers pipelined HGETALLs with bytes, as redis.asyncio does without
decode_responses, and can fail.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import pytest
from aetcd.rpc import rpc_pb2

from mesh import types
from mesh.clock import FakeClock
from mesh.kv.etcd import KV, MOD
from mesh.kv.keys import Keys
from mesh.rollout import Rollout, latency_bucket
from mesh.telemetry import TelemetryKeys
from mesh.types import VModelRecord
from placement.rollouts import CHUNK, RolloutRunner

VM, STABLE, CAND = "acme:chat", "acme:v1", "acme:v2"
TAGS = {"x-canary": {"1": CAND}, "x-lane": {"blue": STABLE}}


class FakeEtcd:
    """Records with mod revisions; `on_get` runs after a get (a concurrent writer)."""

    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, KV] = {}
        self.on_get: Callable[[], None] | None = None
        self.gets = 0

    def put(self, key: str, value: bytes) -> None:
        self.revision += 1
        self.data[key] = KV(key, value, self.revision)

    async def get(self, key: str) -> KV | None:
        self.gets += 1
        kv = self.data.get(key)
        if self.on_get is not None:
            self.on_get()
        return kv


class FakeLeader:
    def __init__(self, etcd: FakeEtcd) -> None:
        self.etcd, self.is_leader, self.writes = etcd, True, 0

    async def write(self, ops: Sequence[rpc_pb2.RequestOp], extra_compares: Sequence[rpc_pb2.Compare] = ()) -> bool:
        if not self.is_leader:
            return False
        for cmp in extra_compares:
            assert cmp.target == MOD
            kv = self.etcd.data.get(cmp.key.decode())
            if (kv.mod_revision if kv else 0) != cmp.mod_revision:
                return False
        for op in ops:
            self.etcd.put(op.request_put.key.decode(), op.request_put.value)
        self.writes += 1
        return True


class FakeState:
    """MeshState's keys and vmodels, decoded from the fake etcd (a view without lag)."""

    def __init__(self, etcd: FakeEtcd, keys: Keys) -> None:
        self.etcd, self.keys = etcd, keys

    @property
    def vmodels(self) -> dict[str, VModelRecord]:
        prefix = self.keys.vmodel("")
        return {k[len(prefix):]: types.decode(VModelRecord, kv.value) for k, kv in self.etcd.data.items()
                if k.startswith(prefix)}


class FakePipe:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis, self.keys = redis, []

    def hgetall(self, key: str) -> None:
        self.keys.append(key)

    async def execute(self) -> list[dict[bytes, bytes]]:
        if self.redis.fail:
            raise ConnectionError("Connection refused")
        self.redis.trips.append(len(self.keys))
        return [{f.encode(): str(n).encode() for f, n in self.redis.hashes.get(k, {}).items()} for k in self.keys]

    async def reset(self) -> None:
        self.keys = []


class FakeRedis:
    def __init__(self, keys: TelemetryKeys) -> None:
        self.tkeys, self.hashes, self.fail = keys, {}, False
        self.trips: list[int] = []  # HGETALLs per round trip

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)

    def record(self, at_ms: int, model: str, n: int, errors: int = 0, latency_s: float = 0.01) -> None:
        """What routers flush: n requests to `model` in the second of `at_ms`."""
        h = self.hashes.setdefault(self.tkeys.rollout(VM, at_ms // 1000), {})
        for field, add in ((f"{model}|n", n), (f"{model}|e", errors), (f"{model}|l{latency_bucket(latency_s)}", n)):
            if add:
                h[field] = h.get(field, 0) + add


@dataclasses.dataclass
class World:
    clock: FakeClock
    etcd: FakeEtcd
    leader: FakeLeader
    redis: FakeRedis
    runner: RolloutRunner
    keys: Keys

    def record(self) -> VModelRecord:
        return types.decode(VModelRecord, self.etcd.data[self.keys.vmodel(VM)].value)

    def rollout(self) -> Rollout:
        ro = Rollout.from_record(self.record().rollout)
        assert ro is not None
        return ro

    def fresh_runner(self) -> RolloutRunner:
        tkeys = self.runner.keys
        return RolloutRunner(self.etcd, self.redis, tkeys, self.runner.state, self.leader, self.clock)

    def traffic(self, seconds: int, cand: int, stable: int = 0, errors: int = 0, cand_s: float = 0.01,
                stable_s: float = 0.01) -> None:
        """`seconds` seconds of traffic per second, the clock moving along."""
        for _ in range(seconds):
            self.redis.record(self.clock.unix_ms(), CAND, cand, errors, cand_s)
            if stable:
                self.redis.record(self.clock.unix_ms(), STABLE, stable, 0, stable_s)
            self.clock.advance(1)


def world(steps: list[int], dwell_s: float = 10.0, **bounds: object) -> World:
    clock, etcd = FakeClock(), FakeEtcd()
    keys, tkeys = Keys("/t"), TelemetryKeys("/t")
    now = clock.unix_ms()
    ro = Rollout(stable=STABLE, candidate=CAND, steps=steps, dwell_s=dwell_s, tag_header="x-canary", tag_value="1",
                 step_started_unix_ms=now, started_unix_ms=now, reason="step 1", **bounds)  # type: ignore[arg-type]
    etcd.put(keys.vmodel(VM), types.encode(VModelRecord(VM, "acme", active=ro.weights(), tags=TAGS,
                                                        rollout=ro.to_record(), updated_unix_ms=now)))
    leader, redis = FakeLeader(etcd), FakeRedis(tkeys)
    runner = RolloutRunner(etcd, redis, tkeys, FakeState(etcd, keys), leader, clock)  # type: ignore[arg-type]
    return World(clock, etcd, leader, redis, runner, keys)


async def test_a_failing_candidate_is_rolled_back_early_with_reason_and_figures() -> None:
    w = world([10, 50, 100], dwell_s=60.0, max_error_rate=0.01)
    w.clock.advance(2)
    first_error_ms = w.clock.unix_ms() // 1000 * 1000
    w.traffic(1, cand=40, stable=360, errors=14)
    assert await w.runner.tick() == 1  # long before the 60 s dwell
    rec, ro = w.record(), w.rollout()
    assert ro.state == "rolled_back" and ro.step == 0 and rec.active == {STABLE: 100}
    assert ro.reason == "candidate error rate 0.35 > 0.01 (stable 0 + 0.01) over 40 requests at step 10%"
    assert ro.finished_unix_ms == w.clock.unix_ms()
    f = ro.figures
    assert (f["candidate_requests"], f["candidate_errors"], f["stable_requests"]) == (40, 14, 360)
    assert f["candidate_error_rate"] == pytest.approx(0.35) and f["candidate_p99_ms"] > 0
    assert f["first_error_unix_ms"] == first_error_ms and f["detected_unix_ms"] == w.clock.unix_ms()
    assert [(h["percent"], h["outcome"]) for h in ro.history] == [(10, "rolled_back")]
    assert rec.tags == {"x-lane": {"blue": STABLE}}  # the rollout's tag route went, the others stay
    assert await w.runner.tick() == 0 and w.leader.writes == 1


async def test_the_error_rate_is_judged_against_the_stable_targets() -> None:
    """Callers' own bad requests fail on both targets alike: 20 % errors on each is no reason to
    roll back; at the 100 % step (no stable traffic) the stable rate of the step before counts."""
    w = world([50, 100], dwell_s=5.0, max_error_rate=0.05)
    for _ in range(5):
        w.redis.record(w.clock.unix_ms(), CAND, 50, 10, 0.01)
        w.redis.record(w.clock.unix_ms(), STABLE, 50, 10, 0.01)
        w.clock.advance(1)
    assert await w.runner.tick() == 1
    ro = w.rollout()
    assert ro.running and ro.step == 1 and ro.history[-1]["figures"]["stable_error_rate"] == pytest.approx(0.2)
    w.traffic(2, cand=50, errors=12)  # 24 %: within 20 % + 5 %
    assert await w.runner.tick() == 0 and w.rollout().running
    w.traffic(1, cand=50, errors=40)  # now 64 / 150 = 43 %
    assert await w.runner.tick() == 1
    ro = w.rollout()
    assert ro.state == "rolled_back" and "(stable 0.2 + 0.05)" in ro.reason, ro.reason


async def test_a_healthy_candidate_is_promoted_step_by_step() -> None:
    w = world([10, 50, 100], dwell_s=10.0, max_p99_ratio=2.0)
    for i, (percent, nxt) in enumerate([(10, {CAND: 50, STABLE: 50}), (50, {CAND: 100}), (100, {CAND: 100})]):
        w.traffic(9, cand=5, stable=5)
        assert await w.runner.tick() == 0 and w.rollout().step == i  # the dwell has not ended
        started = w.clock.unix_ms() + 1000
        w.traffic(1, cand=5, stable=5)
        assert await w.runner.tick() == 1
        ro = w.rollout()
        assert ro.history[-1]["percent"] == percent and ro.history[-1]["outcome"] == "promoted"
        assert ro.history[-1]["figures"]["candidate_requests"] == 50
        assert w.record().active == nxt
        if percent < 100:
            assert ro.running and ro.step == i + 1 and ro.step_started_unix_ms == started
    ro = w.rollout()
    assert ro.state == "promoted" and ro.finished_unix_ms == w.clock.unix_ms() and ro.reason.startswith("promoted")
    assert [h["percent"] for h in ro.history] == [10, 50, 100]
    assert ro.history[0]["figures"]["p99_ratio"] == pytest.approx(1.0)
    assert w.record().tags == {"x-lane": {"blue": STABLE}}


async def test_at_the_dwell_end_too_few_requests_wait() -> None:
    w = world([50, 100], dwell_s=10.0, min_requests=20)
    w.traffic(11, cand=0)
    w.traffic(1, cand=5)
    assert await w.runner.tick() == 0
    ro = w.rollout()
    assert ro.running and ro.step == 0 and ro.reason == "waiting: 5 of 20 candidate requests this step"
    assert ro.figures["candidate_requests"] == 5
    writes = w.leader.writes
    w.traffic(1, cand=1)
    assert await w.runner.tick() == 0 and w.leader.writes == writes  # at most every 5 s
    w.traffic(1, cand=14)
    assert await w.runner.tick() == 1 and w.rollout().step == 1


async def test_p99_ratio_over_the_bound_rolls_back_using_the_history_stable_p99_at_100() -> None:
    w = world([50, 100], dwell_s=5.0, max_p99_ratio=1.5)
    w.traffic(6, cand=10, stable=10, cand_s=0.010, stable_s=0.010)
    assert await w.runner.tick() == 1
    stable_p99 = w.rollout().history[0]["figures"]["stable_p99_ms"]
    assert 9 < stable_p99 < 13
    w.traffic(6, cand=20, cand_s=0.030)  # the 100 % step: no stable traffic at all
    assert await w.runner.tick() == 1
    ro = w.rollout()
    assert ro.state == "rolled_back" and w.record().active == {STABLE: 100}
    assert "p99" in ro.reason and "> 1.5" in ro.reason and "step 100%" in ro.reason
    assert ro.figures["stable_p99_ms"] == stable_p99 and ro.figures["p99_ratio"] > 2
    assert ro.figures["stable_requests"] == 0


async def test_a_record_changed_concurrently_is_not_overwritten() -> None:
    w = world([10, 100], dwell_s=60.0)
    w.traffic(2, cand=30, errors=30)
    key = w.keys.vmodel(VM)

    def router_writes() -> None:  # e.g. an operator adds a tag route between the read and the write
        w.etcd.on_get = None
        w.etcd.put(key, types.encode(dataclasses.replace(w.record(), tags={**TAGS, "x-new": {"a": STABLE}})))

    w.etcd.on_get = router_writes
    assert await w.runner.tick() == 0
    assert w.rollout().running and "x-new" in w.record().tags  # not overwritten
    assert await w.runner.tick() == 1  # retried on the next tick, from the record as it is now
    assert w.rollout().state == "rolled_back" and w.record().tags == {"x-lane": {"blue": STABLE}, "x-new": {"a": STABLE}}


async def test_an_abort_in_between_wins() -> None:
    w = world([10, 100], dwell_s=60.0)
    w.traffic(2, cand=30, errors=30)
    view = w.runner.state.vmodels  # the view still shows the rollout running
    aborted = dataclasses.replace(w.rollout(), state="aborted")
    w.etcd.put(w.keys.vmodel(VM), types.encode(dataclasses.replace(w.record(), rollout=aborted.to_record())))
    w.runner.state = type("Lagging", (), {"vmodels": view, "keys": w.keys})()  # type: ignore[assignment]
    assert await w.runner.tick() == 0 and w.leader.writes == 0 and w.rollout().state == "aborted"


async def test_a_view_lagging_behind_our_own_write_does_not_pass_a_step_twice() -> None:
    w = world([10, 50, 100], dwell_s=5.0)
    view = w.runner.state.vmodels  # step 0, as the view will keep showing it
    w.traffic(6, cand=10, stable=90)
    assert await w.runner.tick() == 1 and w.rollout().step == 1
    w.runner.state = type("Lagging", (), {"vmodels": view, "keys": w.keys})()  # type: ignore[assignment]
    w.clock.advance(1)
    assert await w.runner.tick() == 0 and w.leader.writes == 1 and w.rollout().step == 1


async def test_not_leader_writes_nothing() -> None:
    w = world([10, 100], dwell_s=1.0)
    w.leader.is_leader = False
    w.traffic(3, cand=30, errors=30)
    assert await w.runner.tick() == 0
    assert w.leader.writes == 0 and w.redis.trips == [] and w.rollout().running


async def test_redis_failing_decides_nothing_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    w = world([10, 100], dwell_s=60.0)
    w.traffic(2, cand=30, errors=30)
    w.redis.fail = True
    with caplog.at_level(logging.INFO, logger="placement.rollouts"):
        assert await w.runner.tick() == 0
        assert await w.runner.tick() == 0
        assert w.leader.writes == 0 and w.rollout().running
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        w.redis.fail = False
        assert await w.runner.tick() == 1
    assert "answers again" in caplog.records[1].getMessage() and w.rollout().state == "rolled_back"


async def test_one_bad_vmodel_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    w = world([10, 100], dwell_s=60.0)
    w.etcd.put(w.keys.vmodel("acme:bad"), b'{"name": "acme:bad", "rollout": {"stable": "a", "candidate": "b", '
                                          b'"steps": [100], "dwell_s": "soon"}}')  # dwell_s: not a number
    w.etcd.put(w.keys.vmodel("acme:worse"), b'{"name": "acme:worse", "rollout": {"stable": "a", "candidate": "b", '
                                            b'"steps": 100, "dwell_s": 1}}')  # steps: not a list
    w.traffic(2, cand=30, errors=30)
    assert await w.runner.tick() == 1 and w.rollout().state == "rolled_back"
    await w.runner.tick()
    assert sorted(r.getMessage().split(":")[1] for r in caplog.records if r.levelno == logging.WARNING) == [
        "bad", "worse"]  # each logged once


async def test_closed_seconds_are_read_once_in_chunks() -> None:
    w = world([10, 100], dwell_s=3600.0)
    w.traffic(1200, cand=1, stable=9)
    assert await w.runner.tick() == 0
    assert max(w.redis.trips) <= CHUNK and sum(w.redis.trips) == 1201
    w.redis.trips.clear()
    w.clock.advance(0.5)
    await w.runner.tick()
    assert sum(w.redis.trips) <= 5  # only the seconds that may still grow
    assert w.rollout().figures["candidate_requests"] == 1200


async def test_a_new_leader_resumes_from_the_record_and_redis() -> None:
    w = world([10, 100], dwell_s=1200.0)
    w.traffic(1100, cand=1, stable=9)
    assert await w.runner.tick() == 0  # the old leader's cache holds most of the step
    w.leader.is_leader = False
    assert await w.runner.tick() == 0
    w.traffic(101, cand=1, stable=9)
    w.leader.is_leader = True
    assert await w.fresh_runner().tick() == 1  # its cache is empty: it reads the whole step again
    ro = w.rollout()
    assert ro.step == 1 and ro.history[0]["figures"]["candidate_requests"] == 1201
    assert ro.history[0]["figures"]["stable_requests"] == 1201 * 9


async def test_blue_green_validates_on_tagged_requests_then_takes_all_traffic() -> None:
    """Steps 0 -> 100: at 0 % only the tag route reaches the candidate; its requests are judged
    like any step's, then it takes everything and the tag route goes."""
    w = world([0, 100], dwell_s=5.0)
    assert w.record().active == {CAND: 0, STABLE: 100}
    w.traffic(5, cand=5, stable=50)  # the candidate's 5/s are the tagged requests
    assert await w.runner.tick() == 1
    ro = w.rollout()
    assert ro.running and ro.step == 1 and w.record().active == {CAND: 100}
    assert ro.history[0]["percent"] == 0 and ro.history[0]["figures"]["candidate_requests"] == 25
    w.traffic(5, cand=50)
    assert await w.runner.tick() == 1
    assert w.rollout().state == "promoted" and w.record().tags == {"x-lane": {"blue": STABLE}}
