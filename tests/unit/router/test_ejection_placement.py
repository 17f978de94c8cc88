"""router.policy.Ejector.ejected_addresses: what a miss tells placement to avoid."""

from __future__ import annotations

from router.policy import Ejector


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_expired_ejection_of_a_connected_pod_stops_excluding_it() -> None:
    """F19 regression: the only pod was ejected (its "not loaded here" answers counted as
    failures) and stayed in the miss's avoid list for good, because the list held every
    ejection until the pod was picked again, and a pod with no copy of the model is never
    picked: placement found no pod for the hot model, which went unserved after the fault.
    Once the ejection's time is up and the connection is up, it is no longer avoided."""
    clock = Clock()
    ej = Ejector(eject_after=1, base_s=5, max_s=60, clock=clock)
    up = {"a": True}
    assert ej.failure("a")
    assert ej.ejected_addresses(lambda addr: up[addr]) == ["a"]  # within its time
    clock.now += 5.1
    assert ej.ejected_addresses(lambda addr: up[addr]) == []
    up["a"] = False  # a frozen pod's connection is down: still avoided
    assert ej.ejected_addresses(lambda addr: up[addr]) == ["a"]
    assert ej.ejected_addresses() == ["a"]  # without a connection check: as before
