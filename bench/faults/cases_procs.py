"""Process faults: F1 pod crash, F2 router crash, F3 leader crash, F4 zombie leader, F5 pod
pause, F6 graceful drain, F7 rolling restart."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from typing import Any

from bench.faults import report
from bench.faults.cases import case
from bench.faults.harness import Run, Scenario
from bench.faults.observe import etcd_call
from mesh.cli.local import router_name
from mesh.kv.keys import Keys


def instances(run: Run) -> set[str]:
    return keys(run, "instances")


def registered_since(run: Run, name: str, since_unix: float) -> bool:
    """True once pod `name` has an instance record written by a process started after
    `since_unix` (a killed pod's old record lingers until its lease lapses)."""
    from mesh import types

    async def read(client: Any) -> bool:
        kv = await client.get(Keys(run.mesh.root).instance(name))
        return kv is not None and types.decode(types.InstanceRecord, kv.value).started_unix_ms >= since_unix * 1000

    return etcd_call(run.mesh.etcd, read)


def keys(run: Run, section: str) -> set[str]:
    """The keys under <root>/<section>/, without that prefix (a linearizable read)."""

    async def read(client: Any) -> set[str]:
        kvs, _ = await client.get_prefix(Keys(run.mesh.root).prefix(section))
        return {kv.key.split(f"/{section}/", 1)[1] for kv in kvs}

    return etcd_call(run.mesh.etcd, read)


def _holder(run: Run, model_id: str) -> str:
    return run.loaded_on(model_id)[0]


@case("F1", "Runtime pod crash under load",
      "kill -9 the pod holding hot-a (half the single-copy hot models); it stays dead",
      "hot-2copy: 0 failed requests; single-copy: only UNAVAILABLE/DEADLINE_EXCEEDED, re-served "
      "≤ lease TTL + load time (goal ≤ 15 s at TTL 10 s)")
def f1(run: Run) -> None:
    victim = _holder(run, "hot-a")
    run.start_registrations()
    run.begin_fault(recovery_from="fault_start")
    run.kill9(victim)
    run.end_fault()
    run.figures["victim"] = victim
    run.figures["hot_a_reserved_s"] = run.wait_until(
        lambda: any(p != victim for p in run.loaded_on("hot-a")), 60, "hot-a never re-served")
    run.close_during(15)
    run.stop_registrations()

    def two_copy(row: dict, rows: list) -> None:
        m = row["per_model_during_after"].get("hot-2copy", {})
        run.figures["hot_2copy_failed"] = m.get("requests", 0) - m.get("ok", 0)

    run.post.append(two_copy)


def _in_flight_post(run: Run, victim_index: int, at: float) -> None:
    def figures(row: dict, rows: list) -> None:
        mine = [r for r in rows if r[2] == victim_index]
        run.figures["in_flight_at_kill"] = sum(1 for r in mine if r[0] <= at <= r[1])
        bad = [r for r in rows if r[1] >= at and r[5] not in ("OK", "CANCELLED_BY_CLIENT")]  # ended after
        run.figures["failed"] = len(bad)
        run.figures["failed_started_1s_after"] = sum(1 for r in bad if r[0] > at + 1)

    run.post.append(figures)


@case("F2", "Router crash", "kill -9 router-1 of two (clients round robin over both); restarted "
      "on its port after 5 s", "failures ≤ RPCs in flight on it at kill time; 0 after 1 s",
      scenario=lambda: Scenario(routers=2))
def f2(run: Run) -> None:
    address = run.routers[1]
    run.begin_fault(recovery_from="fault_start")
    at = time.monotonic()
    run.kill9("router-1")
    _in_flight_post(run, 1, at)
    run.sleep(5)
    run.restart("router-1")
    run.wait_until(lambda: run.mesh.router_ready(address), 30, "router-1 never ready again")
    run.end_fault()
    run.close_during()


@case("F3", "Placement leader crash", "kill -9 the placement leader of two replicas; a model "
      "never loaded is registered and asked for after the failover",
      "standby leads ≤ TTL + 2 s; serving unaffected; no assignment lost",
      scenario=lambda: Scenario(placements=2))
def f3(run: Run) -> None:
    leader = run.leader()
    before = keys(run, "assignments")
    run.begin_fault(recovery_from="fault_start")
    run.kill9(leader)
    run.end_fault()
    run.figures["failover_s"] = run.wait_until(lambda: run.leader() not in ("", leader), 60, "no new leader")
    after = keys(run, "assignments")
    run.figures["assignments_before"], run.figures["assignments_after"] = len(before), len(after)
    run.figures["assignments_lost"] = len(before - after)
    cold = dataclasses.replace(run.hot[0], model_id="cold-f3")
    run.register("cold-f3", run.models_dir / f"{run.hot[0].model_id}.onnx")
    run.figures["cold_miss_after_failover"] = run.infer_code(cold, timeout=30)
    run.close_during(run.opts.lease_ttl_s + 2)


@case("F4", "Leader GC pause (zombie leader)", "SIGSTOP the placement leader for TTL + 3 s (a "
      "cold miss sent to it as it freezes), let the standby take over, SIGCONT",
      "every write of the paused ex-leader is rejected by its fencing txn (0 applied); never two "
      "leaders", scenario=lambda: Scenario(placements=2))
def f4(run: Run) -> None:
    leader = run.leader()
    ttl = run.opts.lease_ttl_s
    rejected_before = _fenced(run, leader)
    run.register("cold-f4", run.models_dir / f"{run.hot[1].model_id}.onnx")
    cold = dataclasses.replace(run.hot[1], model_id="cold-f4")
    answers: dict[str, str] = {}
    # A miss sent while the leader key still names the paused replica: its EnsureLoaded waits in
    # the paused process, which on SIGCONT tries to place the model under its old fence.
    miss = threading.Thread(target=lambda: answers.update(code=run.infer_code(cold, timeout=3 * ttl + 10)))
    run.begin_fault()
    run.signal(leader, signal.SIGSTOP)
    miss.start()
    run.figures["takeover_s"] = run.wait_until(lambda: run.leader() not in ("", leader), 3 * ttl + 5,
                                               "standby never took over")
    run.sleep(max(0.0, ttl + 3 - (time.monotonic() - run.marks["fault_start"])))
    run.signal(leader, signal.SIGCONT)
    run.end_fault()
    miss.join(3 * ttl + 15)
    run.figures["cold_miss_sent_while_paused"] = answers.get("code", "no answer")
    both = 0
    for _ in range(int(ttl * 10)):  # watch both replicas' leader gauges for one TTL
        gauges = [_is_leader(run, n) for n in run.mesh.procs if n.startswith("placement")]
        both += sum(1 for g in gauges if g == 1) > 1
        time.sleep(0.1)
    run.figures["samples_with_two_leaders"] = both
    run.figures["ex_leader_leads_after"] = _is_leader(run, leader) == 1
    run.figures["fenced_writes_rejected"] = _fenced(run, leader) - rejected_before
    run.close_during()


def _is_leader(run: Run, name: str) -> float:
    try:
        return run.mesh.scrape(name).get("mesh_placement_leader", -1)
    except Exception:
        return -1


def _fenced(run: Run, name: str) -> int:
    """Fenced writes that found another leader: the metric, plus the log line saying so."""
    try:
        metric = run.mesh.scrape(name).get('mesh_placements_total{result="lost_leadership"}', 0)
    except Exception:
        metric = 0
    log = run.mesh.log(name)
    lines = log.read_text(errors="replace").count("fenced write found another leader") if log.exists() else 0
    return int(metric) + lines


@case("F5", "Runtime pause (half-dead pod)", "SIGSTOP the pod holding hot-a for 2 × TTL, then SIGCONT",
      "router stops sending to it within 5 s; on thaw it re-registers and drops assignments it no "
      "longer owns")
def f5(run: Run) -> None:
    victim = _holder(run, "hot-a")
    ttl = run.opts.lease_ttl_s
    run.figures["victim"] = victim
    run.begin_fault(recovery_from="fault_start")
    run.signal(victim, signal.SIGSTOP)
    at = time.monotonic()
    lapsed = None
    while time.monotonic() - at < 2 * ttl:  # watch its lease lapse meanwhile
        if lapsed is None and victim not in instances(run):
            lapsed = round(time.monotonic() - at, 2)
        time.sleep(0.2)
    run.signal(victim, signal.SIGCONT)
    run.end_fault()
    thaw = time.monotonic()
    run.figures["lease_lapsed_after_s"] = lapsed
    run.figures["rejoin_s"] = run.wait_until(lambda: victim in instances(run), 30, "pod never re-registered")

    def stale() -> int:
        copies = {k.split("/")[0] for k in keys(run, "copies") if k.endswith("/" + victim)}
        owned = {k.split("/")[1] for k in keys(run, "assignments") if k.startswith(victim + "/")}
        return len(copies - owned)

    run.sleep(ttl)
    run.figures["copies_not_owned_after_rejoin"] = stale()
    run.close_during()

    def detection(row: dict, rows: list) -> None:
        frozen = [r for r in rows if at <= r[0] < thaw]
        run.figures["detect_s"] = report.recovery_s(frozen, at)
        run.figures["slow_or_failed_started_5s_after_freeze"] = sum(
            1 for r in frozen if r[0] > at + 5 and (r[5] != "OK" or r[1] - r[0] > 1.0))

    run.post.append(detection)


def _term_and_wait(run: Run, name: str, limit: float = 45) -> float | None:
    """SIGTERM; seconds until the process exited (None: still running at `limit`, then killed)."""
    proc = run.mesh.procs[name]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit)
        took: float | None = round(time.monotonic() - start, 2)
    except subprocess.TimeoutExpired:
        took = None
    run.kill9(name)  # forget it (kills it if it is still running)
    return took


@case("F6", "Graceful drain", "SIGTERM the pod holding hot-a under load; it stays down",
      "0 client-visible errors; its loaded models are ready elsewhere before it stops serving "
      "them; exit ≤ grace (30 s)")
def f6(run: Run) -> None:
    victim = _holder(run, "hot-a")
    mine = [m.model_id for m in run.hot if victim in run.loaded_on(m.model_id)]
    run.figures["victim"], run.figures["models_on_victim"] = victim, len(mine)
    run.begin_fault()
    run.figures["drain_s"] = _term_and_wait(run, victim)
    run.end_fault()
    run.figures["models_ready_elsewhere_at_exit"] = sum(
        1 for m in mine if any(p != victim for p in run.loaded_on(m)))
    run.close_during()


@case("F7", "Rolling restart", "F6 on every pod in turn, then SIGTERM + restart of each router "
      "(each back and registered before the next)", "0 errors; ≤ 1 pod draining at a time",
      scenario=lambda: Scenario(routers=2))
def f7(run: Run) -> None:
    run.begin_fault()
    drains = []
    for i in range(run.scenario.pods):
        name = f"pod-{i}"
        drains.append(_term_and_wait(run, name))
        since = time.time()
        run.restart(name)
        run.wait_until(lambda name=name, since=since: registered_since(run, name, since), 60,
                       f"{name} never registered again")
        run.sleep(2)  # let placement use the new pod before the next one drains
    for i in range(run.scenario.routers):
        name = router_name(i)
        address = run.routers[i]
        drains.append(_term_and_wait(run, name))
        run.restart(name)
        run.wait_until(lambda a=address: run.mesh.router_ready(a), 30, f"{name} never ready again")
    run.end_fault()
    run.figures["drain_s"] = drains
    run.figures["total_s"] = round(time.monotonic() - run.marks["fault_start"], 1)
    run.close_during()

