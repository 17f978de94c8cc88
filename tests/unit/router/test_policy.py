"""Copy choice: power of two choices over in-flight counts, exclusions, seeded randomness; outlier
ejection of pods that keep failing (issue 9: a frozen pod must stop receiving requests)."""

from __future__ import annotations

import random

import pytest

from router.policy import Ejector, pick


def test_of_two_the_less_loaded_wins() -> None:
    rng = random.Random(3)
    assert {pick(["a", "b"], {"a": 3, "b": 1}, rng=rng) for _ in range(50)} == {"b"}


def test_the_most_loaded_is_never_picked_and_the_least_is_favoured() -> None:
    rng = random.Random(5)
    chosen = [pick(["a", "b", "c"], {"a": 3, "b": 1, "c": 2}, rng=rng) for _ in range(600)]
    assert "a" not in chosen
    assert chosen.count("b") > chosen.count("c")  # b wins both pairs it is in, c one of two


def test_unknown_address_counts_as_idle() -> None:
    assert pick(["a", "b"], {"a": 1}, rng=random.Random(0)) == "b"


def test_excluded_are_skipped() -> None:
    assert pick(["a", "b"], {"a": 0, "b": 5}, exclude={"a"}) == "b"
    assert pick(["a"], {}, exclude={"a"}) is None
    assert pick([], {}) is None


def test_ties_are_spread_and_seeded() -> None:
    rng = random.Random(7)
    chosen = [pick(["a", "b", "c"], {}, rng=rng) for _ in range(300)]
    assert set(chosen) == {"a", "b", "c"}
    again = random.Random(7)
    assert chosen == [pick(["a", "b", "c"], {}, rng=again) for _ in range(300)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_consecutive_failures_eject_and_a_success_resets_the_count(clock: Clock) -> None:
    ej = Ejector(eject_after=3, base_s=5, max_s=60, clock=clock)
    assert not ej.failure("a") and not ej.failure("a")
    ej.success("a")  # not consecutive any more
    assert not ej.failure("a") and not ej.failure("a")
    assert ej.admitted(["a", "b"]) == ["a", "b"]
    assert ej.failure("a")  # the third in a row
    assert ej.admitted(["a", "b"]) == ["b"] and ej.ejected("a")
    assert ej.ejected_addresses() == ["a"]
    assert not ej.failure("a")  # attempts in flight at ejection time do not eject it again


def test_ejection_ends_after_its_time_and_doubles_when_it_fails_again(clock: Clock) -> None:
    ej = Ejector(eject_after=2, base_s=5, max_s=12, clock=clock)
    ej.failure("a")
    ej.failure("a")
    clock.now += 4.9
    assert ej.ejected("a")
    clock.now += 0.2
    assert ej.admitted(["a"]) == ["a"]  # on probation
    assert ej.failure("a")  # one failure on probation is enough
    clock.now += 9.9
    assert ej.ejected("a")  # 10 s the second time
    clock.now += 0.2
    assert not ej.ejected("a")
    assert ej.failure("a")
    clock.now += 11.9
    assert ej.ejected("a")  # 20 s capped at max_s = 12
    clock.now += 0.2
    assert not ej.ejected("a")
    ej.success("a")  # it answered: healthy again, the count starts over
    assert not ej.failure("a")
    assert ej.failure("a")
    clock.now += 5.1
    assert not ej.ejected("a")  # back to the base time


def test_not_readmitted_while_its_connection_is_down(clock: Clock) -> None:
    """A frozen pod's connection never comes back: its ejection lasts until it does, rather
    than letting a request find out the hard way every ejection period."""
    ej = Ejector(eject_after=1, base_s=5, max_s=60, clock=clock)
    ej.failure("a")
    clock.now += 30
    up = {"a": False}
    assert ej.admitted(["a", "b"], lambda addr: up[addr]) == ["b"]
    assert ej.ejected_addresses() == ["a"]  # still listed, e.g. for placement to avoid
    up["a"] = True
    assert ej.admitted(["a", "b"], lambda addr: up[addr]) == ["a", "b"]
    assert ej.ejected_addresses() == []


def test_forget_drops_a_gone_pod(clock: Clock) -> None:
    ej = Ejector(eject_after=1, base_s=5, max_s=60, clock=clock)
    ej.failure("a")
    ej.forget("a")
    assert not ej.ejected("a") and ej.ejected_addresses() == []
    assert ej.failure("a")  # a fresh record: the base count, not probation
    clock.now += 5.1
    assert not ej.ejected("a")


def test_a_slow_but_answering_pod_is_not_ejected(clock: Clock) -> None:
    """Regression (F21, overload 3×): attempts that timed out on an overloaded pod counted as
    failures, so a pod that kept answering other requests, only slowly, was ejected, and a
    model whose copies were all ejected was answered UNAVAILABLE "no reachable copy". An
    attempt's failure is no evidence when the pod answered anything since the attempt began."""
    ej = Ejector(eject_after=2, base_s=5, max_s=60, clock=clock)
    for _ in range(10):
        started = clock.now
        clock.now += 0.5
        ej.success("a")  # another request on the pod answered (OK, or shed) meanwhile
        clock.now += 0.5
        assert not ej.failure("a", since=started)  # this attempt timed out after 1 s
    assert ej.admitted(["a", "b"]) == ["a", "b"] and ej.ejected_addresses() == []


def test_a_frozen_pod_is_ejected_though_it_answered_before(clock: Clock) -> None:
    """A pod that answers nothing after its attempts start (SIGSTOP, blackhole) is ejected as
    before: answers older than an attempt do not excuse it."""
    ej = Ejector(eject_after=3, base_s=5, max_s=60, clock=clock)
    ej.success("a")
    clock.now += 0.1  # frozen from here on
    results = []
    for _ in range(3):
        started = clock.now
        clock.now += 1.0
        results.append(ej.failure("a", since=started))
    assert results == [False, False, True]
    assert ej.admitted(["a", "b"]) == ["b"]


def test_an_answer_during_only_some_attempts_excuses_only_those(clock: Clock) -> None:
    """Attempts in flight when a pod froze began before its last answer: excused. The ones
    sent after it froze count, consecutively."""
    ej = Ejector(eject_after=2, base_s=5, max_s=60, clock=clock)
    in_flight_before = clock.now
    clock.now += 0.2
    ej.success("a")  # its last answer; then it froze
    clock.now += 1.0
    assert not ej.failure("a", since=in_flight_before)  # excused: it answered since
    sent_after = clock.now
    clock.now += 1.0
    assert not ej.failure("a", since=sent_after)
    sent_after = clock.now
    clock.now += 1.0
    assert ej.failure("a", since=sent_after)  # two in a row with no answer: ejected
