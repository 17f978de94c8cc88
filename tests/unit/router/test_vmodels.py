"""The pure pieces of vmodels (router/vmodels.py): weighted pick, sticky hash, tag routes,
validation."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from mesh.errors import InvalidArgument
from mesh.types import VModelRecord
from router import vmodels
from router.vmodels import Wanted


def record(**kw: object) -> VModelRecord:
    kw.setdefault("name", "ab")
    kw.setdefault("active", {"a": 70, "b": 30})
    return VModelRecord(**kw)  # type: ignore[arg-type]


def test_weighted_covers_each_interval_exactly() -> None:
    targets = {"b": 30, "a": 70, "z": 0}
    picks = [vmodels.weighted(targets, p) for p in range(100)]
    assert picks.count("a") == 70 and picks.count("b") == 30 and "z" not in picks


def test_random_pick_follows_the_weights() -> None:
    rng = random.Random(1)
    rec = record()
    picks = [vmodels.pick(rec, {}, rng) for _ in range(10_000)]
    share = picks.count("a") / len(picks)
    assert 0.67 < share < 0.73  # 70 %, 6.5 standard deviations either side


def test_sticky_key_always_picks_the_same_target() -> None:
    rec = record(sticky_header="x-user")
    rng = random.Random(2)
    for user in ("alice", "bob", "carol", "dave"):
        first = vmodels.pick(rec, {"x-user": user}, rng)
        assert all(vmodels.pick(rec, {"x-user": user}, rng) == first for _ in range(50))
    keys = [vmodels.pick(rec, {"x-user": f"u{i}"}, rng) for i in range(2000)]
    assert 0.65 < keys.count("a") / len(keys) < 0.75  # keys spread by weight too


def test_sticky_hash_is_the_same_in_another_process() -> None:
    """Python's hash() is salted per process; the pick must not depend on it."""
    code = "from router import vmodels; print(vmodels.sticky_point('ab', 'alice', 1000))"
    out = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert out == {str(vmodels.sticky_point("ab", "alice", 1000))}


def test_tag_route_wins_over_weights_and_sticky() -> None:
    rec = record(sticky_header="x-user", tags={"x-variant": {"canary": "c"}})
    rng = random.Random(3)
    assert {vmodels.pick(rec, {"x-variant": "canary", "x-user": "u"}, rng) for _ in range(20)} == {"c"}
    assert vmodels.pick(rec, {"x-variant": "other"}, rng) in ("a", "b")


def test_pending_targets_are_never_picked() -> None:
    rec = record(active={"a": 1}, pending={"b": 100})
    rng = random.Random(4)
    assert {vmodels.pick(rec, {}, rng) for _ in range(200)} == {"a"}


def test_primary_is_the_heaviest_target() -> None:
    assert vmodels.primary(record(), {}) == "a"
    assert vmodels.primary(record(active={"b": 5, "a": 5}), {}) == "a"
    assert vmodels.primary(record(tags={"x-v": {"1": "b"}}), {"x-v": "1"}) == "b"


@pytest.mark.parametrize(("wanted", "message"), [
    (Wanted("v", ()), "at least one target"),
    (Wanted("v", (("a", 0),)), "weight 0"),
    (Wanted("v", (("a", 1), ("a", 2))), "named twice"),
    (Wanted("v", (("a", 10_001),)), "invalid weight"),
    (Wanted("v", (("a", 1),), sticky_header="Bad Header"), "invalid sticky_header"),
    (Wanted("v", (("a", 1),), sticky_header="authorization"), "invalid sticky_header"),
    (Wanted("v", (("a", 1),), sticky_header="x-key-bin"), "invalid sticky_header"),
    (Wanted("v", (("a", 1),), tags=(("x-v", "", "a"),)), "invalid value"),
    (Wanted("v", (("a", 1),), tags=(("x-v", "1", "a"), ("x-v", "1", "b"))), "given twice"),
    (Wanted("v", tuple((f"m{i}", 1) for i in range(17))), "too many targets"),
])
def test_bad_specs_are_refused_with_a_reason(wanted: Wanted, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        vmodels.check_shape(wanted)


def test_a_good_spec_passes() -> None:
    vmodels.check_shape(Wanted("v", (("a", 70), ("b", 30)), "x-user", (("x-variant", "canary", "b"),)))


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": ()}, "at least one step"),
    ({"steps": (10, 5, 100)}, "increase"),
    ({"steps": (10, 50)}, "last step must be 100"),
    ({"steps": (0, 100)}, "tag route"),
    ({"steps": (10, 101)}, "0 to 100"),
    ({"dwell_s": 0.1}, "dwell"),
    ({"dwell_s": float("nan")}, "dwell"),
    ({"max_error_rate": 1.5}, "max_error_rate"),
    ({"max_p99_ratio": -1.0}, "max_p99_ratio"),
    ({"tag_header": "x-canary"}, "both a header and a value"),
    ({"tag_header": "authorization", "tag_value": "1"}, "tag header"),
    ({"candidate": ""}, "candidate"),
])
def test_bad_rollouts_are_refused_with_a_reason(changes: dict, message: str) -> None:
    import dataclasses

    good = vmodels.RolloutWanted(vmodel="vm", candidate="m2", steps=(1, 10, 100), dwell_s=30.0)
    with pytest.raises(InvalidArgument, match=message):
        vmodels.check_rollout(dataclasses.replace(good, **changes))


def test_a_rollout_gets_the_default_bounds() -> None:
    checked = vmodels.check_rollout(vmodels.RolloutWanted(vmodel="vm", candidate="m2", steps=(0, 100), dwell_s=5,
                                                          tag_header="x-canary", tag_value="1"))
    assert checked.max_error_rate == vmodels.DEFAULT_MAX_ERROR_RATE and checked.min_requests == 20
