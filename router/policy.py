"""Which copy serves a request: the pure choice, apart from the machinery around it.

Least in-flight wins; ties are broken at random (a seeded Random in tests) so routers that
see the same counts do not all pick the same pod.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping


def pick(
    addresses: Iterable[str],
    in_flight: Mapping[str, int],
    exclude: Collection[str] = (),
    rng: random.Random | None = None,
) -> str | None:
    """The address with the fewest in-flight requests, not excluded; None when none is left."""
    best: list[str] = []
    best_load = 0
    for address in addresses:
        if address in exclude:
            continue
        load = in_flight.get(address, 0)
        if not best or load < best_load:
            best, best_load = [address], load
        elif load == best_load:
            best.append(address)
    if not best:
        return None
    if len(best) == 1:
        return best[0]
    return (rng or random).choice(best)
