"""Which copy serves a request: the pure choice, apart from the machinery around it.

Power of two choices (Mitzenmacher; Ray Serve's router): two distinct copies drawn at random,
the one with fewer in-flight requests wins (the first drawn on a tie). O(1) in the number of
copies and models, and routers that see the same counts do not all pile onto the same pod.
Excluded copies (those that just answered UNAVAILABLE) are filtered out first; that only
happens on retries.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence


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
