"""Which copy serves a request: the pure choice, apart from the machinery around it.

Power of two choices (Mitzenmacher; Ray Serve's router): two distinct copies drawn at random,
the one with fewer in-flight requests wins (the first drawn on a tie). O(1) in the number of
copies and models, and routers that see the same counts do not all pile onto the same pod.
Excluded copies (those that just answered UNAVAILABLE) are filtered out first; that only
happens on retries. Ejector keeps pods that keep failing (frozen, blackholed) out of picks for
a while, so a stuck pod stops receiving requests long before its lease lapses, but never a pod
that keeps answering, however slowly (an overloaded pod is shed from, not ejected: F21).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence


def pick(
    addresses: Sequence[str],
    in_flight: Mapping[str, int],
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
) -> str | None:
    """The less loaded of two random addresses not excluded; None when none is left."""
    if exclude:
        addresses = [a for a in addresses if a not in exclude]
    n = len(addresses)
    if n == 0:
        return None
    if n == 1:
        return addresses[0]
    r = rng or random
    i = r.randrange(n)
    j = r.randrange(n - 1)
    if j >= i:
        j += 1
    a, b = addresses[i], addresses[j]
    return b if in_flight.get(b, 0) < in_flight.get(a, 0) else a


class Ejector:
    """Outlier ejection per pod address (Envoy's consecutive-gateway-failure detector).

    `eject_after` consecutive failures (unreachable, or no answer within the attempt timeout)
    leave the address out of picks for `base_s`, doubled for each ejection in a row up to
    `max_s`. When the time is up, and the caller's `connected(address)` says its connection is
    up again (a frozen pod's never is; probing it with requests would cost each one an attempt
    timeout), the address is picked again on probation: its first answer clears the record, a
    failure before any answer ejects it again at once. Pure: the clock and the connection
    check are injected, nothing here does I/O.

    Only a pod that answers nothing is ejected: a failed attempt given its start time
    (`failure(address, since)`) is no evidence when the pod answered anything since then
    (`success`, any status of the pod's own). An overloaded pod answers slowly and sheds, but
    it answers; counting its slow attempts ejected it, and every request for a model whose
    copies were all ejected then failed UNAVAILABLE "no reachable copy" (F21). A frozen or
    blackholed pod answers nothing at all, so its failures still count.
    """

    def __init__(self, eject_after: int, base_s: float, max_s: float, clock: Callable[[], float]) -> None:
        self.eject_after = eject_after
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self._failures: dict[str, int] = {}  # address -> consecutive failures
        self._ejections: dict[str, int] = {}  # address -> ejections in a row (0: healthy)
        self._until: dict[str, float] = {}  # address -> clock time its ejection ends
        self._answered: dict[str, float] = {}  # address -> clock time of its last answer

    def ejected(self, address: str, connected: Callable[[str], bool] | None = None) -> bool:
        until = self._until.get(address)
        if until is None:
            return False
        if self.clock() < until or (connected is not None and not connected(address)):
            return True
        del self._until[address]  # time is up: on probation until it answers
        return False

    def admitted(self, addresses: Iterable[str], connected: Callable[[str], bool] | None = None) -> list[str]:
        """`addresses` without the ejected ones, in order."""
        if not self._until:
            return list(addresses)
        return [a for a in addresses if not self.ejected(a, connected)]

    def success(self, address: str) -> None:
        """The pod at `address` answered (OK, or any status of its own)."""
        self._answered[address] = self.clock()
        if self._failures or self._ejections:
            self._failures.pop(address, None)
            self._ejections.pop(address, None)

    def failure(self, address: str, since: float | None = None) -> bool:
        """Counts one failure of an attempt started at clock time `since` (None: no start
        known); True when it ejects the address now. Not counted when the pod answered
        something since `since`: it is alive, only slow."""
        if since is not None and self._answered.get(address, float("-inf")) >= since:
            return False
        if self.ejected(address):
            return False  # attempts already in flight when it was ejected: counted once
        failures = self._failures.get(address, 0) + 1
        on_probation = self._ejections.get(address, 0) > 0
        if failures < self.eject_after and not on_probation:
            self._failures[address] = failures
            return False
        times = self._ejections.get(address, 0) + 1
        self._ejections[address] = times
        self._failures.pop(address, None)
        self._until[address] = self.clock() + min(self.base_s * 2 ** (times - 1), self.max_s)
        return True

    def forget(self, address: str) -> None:
        """Drops what is known of an address (its pod is gone)."""
        self._failures.pop(address, None)
        self._ejections.pop(address, None)
        self._until.pop(address, None)
        self._answered.pop(address, None)

    def ejected_addresses(self, connected: Callable[[str], bool] | None = None) -> list[str]:
        """Addresses ejected or waiting to be re-admitted (read-only: re-admits nothing).
        With `connected`, one whose time is up and whose connection is up is not listed: a
        pod with no copy of a model is never picked again to end its ejection, so listing it
        kept it excluded from placement for good (F19: the only pod, its hot model unserved)."""
        now = self.clock()
        return [a for a, until in self._until.items()
                if connected is None or now < until or not connected(a)]
