"""Copy choice: least in-flight, random tie-break, exclusions."""

from __future__ import annotations

import random

from router.policy import pick


def test_least_in_flight_wins() -> None:
    assert pick(["a", "b", "c"], {"a": 3, "b": 1, "c": 2}) == "b"


def test_unknown_address_counts_as_idle() -> None:
    assert pick(["a", "b"], {"a": 1}) == "b"


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


def test_ties_only_among_the_least_loaded() -> None:
    rng = random.Random(1)
    chosen = {pick(["a", "b", "c"], {"a": 2, "b": 0, "c": 0}, rng=rng) for _ in range(100)}
    assert chosen == {"b", "c"}
