"""Copy choice: power of two choices over in-flight counts, exclusions, seeded randomness."""

from __future__ import annotations

import random

from router.policy import pick


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
