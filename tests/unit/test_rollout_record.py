"""mesh/rollout.py, the record a rollout's router and leader share: weights per state, the
latency histogram's quantiles, and records that do not decode (a hand-edited or foreign
etcd value) read as no rollout instead of breaking the runner."""

from __future__ import annotations

import pytest

from mesh import rollout
from mesh.rollout import Counts, Rollout


def test_weights_follow_the_state() -> None:
    ro = Rollout("s", "c", [0, 10, 100], 5.0)
    assert ro.weights() == {"c": 0, "s": 100}
    ro.step = 1
    assert ro.weights() == {"c": 10, "s": 90}
    ro.step = 2
    assert ro.weights() == {"c": 100}
    for state, want in ((rollout.PROMOTED, {"c": 100}), (rollout.ROLLED_BACK, {"s": 100}),
                        (rollout.ABORTED, {"s": 100})):
        ro.state = state
        assert ro.weights() == want


def test_quantiles_come_from_the_histogram_within_one_bucket() -> None:
    c = Counts()
    for ms, n in ((1.0, 98), (50.0, 2)):
        i = rollout.latency_bucket(ms / 1000)
        c.latency[i] = c.latency.get(i, 0) + n
        c.requests += n
    assert rollout.bucket_upper_s(rollout.latency_bucket(0.001) - 1) < c.quantile_s(0.5) <= 0.0012
    assert 0.040 < c.quantile_s(0.99) <= 0.060
    assert Counts().quantile_s(0.99) == 0.0
    assert rollout.latency_bucket(0.0) == 0 and rollout.latency_bucket(1e6) == rollout.BUCKETS - 1


@pytest.mark.parametrize("bad", [{"steps": 100}, {"steps": ["1", "100"]}, {"steps": [50, 10, 100]},
                                 {"dwell_s": "soon"}, {"history": 3}, {"state": "paused"}, {"stable": ""},
                                 {"unknown_only": 1, "stable": None}])
def test_a_malformed_record_is_no_rollout(bad: dict) -> None:
    good = Rollout("s", "c", [1, 100], 5.0).to_record()
    assert Rollout.from_record(good) == Rollout("s", "c", [1, 100], 5.0)
    assert Rollout.from_record({**good, **bad}) is None
    assert Rollout.from_record({}) is None


def test_tag_routes_are_added_and_removed_without_touching_others() -> None:
    ro = Rollout("s", "c", [0, 100], 5.0, tag_header="x-canary", tag_value="1")
    tags = rollout.with_tag({"x-lane": {"blue": "s"}}, "x-canary", "1", "c")
    assert tags == {"x-lane": {"blue": "s"}, "x-canary": {"1": "c"}}
    assert rollout.without_tag(tags, ro) == {"x-lane": {"blue": "s"}}
    assert rollout.without_tag({"x-canary": {"1": "other"}}, ro) == {"x-canary": {"1": "other"}}
