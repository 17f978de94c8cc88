"""The pod agent's etcd side over a fake etcd: the resync loop (writes failing then recovering,
a lost lease re-granted and every record re-put), one warning per outage instead of a
traceback per retry, and draining (instance record `draining`, done when the assignments are
gone, cut short without a placement leader)."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from collections.abc import AsyncIterator

import pytest

from mesh import types
from mesh.types import CopyState, InstanceRecord, LeaderRecord
from puller import agent as agent_mod

from .pod import Pod


@pytest.fixture
async def pod(tmp_path: pathlib.Path) -> AsyncIterator[Pod]:
    p = await Pod(tmp_path).start()
    yield p
    await p.stop()


def _movers(pod: Pod, leader: bool = True, other: bool = True, other_draining: bool = False) -> None:
    """What a draining pod looks for: a placement leader, and another pod to take its models."""
    if leader:
        pod.etcd._put(pod.keys.leader(), types.encode(LeaderRecord("placement", "x")))
    if other:
        record = InstanceRecord("pod-b", "127.0.0.1:2", 100_000, draining=other_draining)
        pod.etcd._put(pod.keys.instance("pod-b"), types.encode(record))


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_writes_failing_are_retried_until_etcd_takes_them_with_one_warning(
    pod: Pod, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pod.etcd.fail_writes = True
    await pod.assign("a")
    await pod.assign("b")
    await pod.until(lambda: pod.etcd.failed_writes >= 3, "several failed rounds (one transaction each)")
    assert pod.copy("a") is None and pod.copy("b") is None
    assert pod.metrics.unsynced_records._value.get() >= 2
    pod.etcd.fail_writes = False
    await pod.until(lambda: pod.state("a") is pod.state("b") is CopyState.LOADED, "both LOADED")
    await pod.until(lambda: pod.instance().models == ("a", "b"), "instance record")  # type: ignore[union-attr]
    # The fake applies a transaction before the publisher resumes to log: wait for the round to end.
    assert await pod.agent.publisher.wait_synced(5.0)
    assert len(_lines(caplog, "writes of this pod's records failing")) == 1
    assert len(_lines(caplog, "succeed again")) == 1
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per retry


async def test_lost_lease_is_regranted_with_backoff_and_every_record_reput(
    pod: Pod, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: while etcd was down the lease loop crashed and was restarted by the
    supervisor, logging a full traceback every few seconds; and a record lost with the
    lease must come back under the new one."""
    caplog.set_level(logging.INFO)
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    old = pod.agent.lease
    assert old is not None
    pod.etcd.set_down(True)
    pod.etcd.expire(old.id)  # its keys are gone in etcd
    assert pod.instance() is None and pod.copy("a") is None
    await asyncio.sleep(1.0)  # several grant attempts fail meanwhile
    assert len(_lines(caplog, "cannot re-register")) == 1
    pod.etcd.set_down(False)
    await pod.until_state("a", CopyState.LOADED)
    await pod.until(lambda: pod.instance() is not None, "instance re-put")
    assert pod.agent.lease is not None and pod.agent.lease.id != old.id
    assert pod.etcd.data[pod.keys.copy("a", "pod-a")].lease == pod.agent.lease.id
    assert len(_lines(caplog, "re-registered after")) == 1
    assert not [r for r in caplog.records if r.exc_info]
    assert "a" in pod.table  # the loaded copy was kept throughout


async def test_write_refused_for_lease_not_found_regrants_and_reputs(pod: Pod) -> None:
    """etcd lost the lease without the keep-alive noticing yet: the first write naming it is
    refused, which re-grants the lease and puts every record again under the new one."""
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    old = pod.agent.lease
    assert old is not None
    pod.etcd.expire(old.id, tell=False)
    await pod.assign("b")
    await pod.until(lambda: pod.state("a") is pod.state("b") is CopyState.LOADED, "both re-put")
    await pod.until(lambda: pod.instance() is not None, "instance re-put")
    assert pod.agent.lease is not None and pod.agent.lease.id != old.id


async def test_watch_resumes_after_an_outage(pod: Pod) -> None:
    pod.etcd.set_down(True)
    await asyncio.sleep(0.05)
    pod.etcd.set_down(False)
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)


async def test_drain_marks_the_instance_and_ends_when_the_assignments_go(pod: Pod) -> None:
    _movers(pod)
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    stop = asyncio.Event()
    drain = asyncio.ensure_future(pod.agent.drain(30.0, stop))
    await pod.until(lambda: pod.instance().draining, "draining in etcd")  # type: ignore[union-attr]
    served = pod.table.get("a")
    assert served is not None and not drain.done()  # still serving a
    served.begin()
    await pod.unassign("a")  # placement: a is ready elsewhere
    await pod.until_state("a", CopyState.UNLOADING)
    await pod.settle()
    assert not drain.done()  # a request is still in flight
    served.end(1)
    assert await asyncio.wait_for(drain, 5.0) is True
    assert pod.state("a") is None and not pod.cache.pins


async def test_drain_times_out_and_stop_cuts_it_short(pod: Pod) -> None:
    _movers(pod)
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    assert await pod.agent.drain(0.2, asyncio.Event()) is False
    stop = asyncio.Event()
    drain = asyncio.ensure_future(pod.agent.drain(30.0, stop))
    await pod.settle()
    stop.set()
    assert await asyncio.wait_for(drain, 5.0) is False
    assert "a" in pod.table


@pytest.mark.parametrize(
    ("leader", "other", "other_draining", "why"),
    [
        (False, True, False, "no placement leader"),
        (True, False, False, "no other pod that is not draining"),
        (True, True, True, "no other pod that is not draining"),
    ],
)
async def test_drain_does_not_wait_when_nobody_can_move_the_models(
    pod: Pod, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    leader: bool, other: bool, other_draining: bool, why: str,
) -> None:
    """Stopping placement (or the last other pod) first, as `mesh up` and the tests do, must
    not leave every pod waiting out its whole drain timeout."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(agent_mod, "NO_MOVER_S", 0.1)
    _movers(pod, leader=leader, other=other, other_draining=other_draining)
    await pod.assign("a")
    await pod.until_state("a", CopyState.LOADED)
    assert await asyncio.wait_for(pod.agent.drain(30.0, asyncio.Event()), 10.0) is False
    assert _lines(caplog, why) and "a" in pod.table
