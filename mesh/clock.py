"""Injected clocks: staleness, recency and timeouts read the clock they were given."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def unix_ms(self) -> int: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def unix_ms(self) -> int:
        return int(time.time() * 1000)


class FakeClock:
    """For tests: time moves only when told."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._ms = start_ms

    def advance(self, seconds: float) -> None:
        self._ms += int(seconds * 1000)

    def monotonic(self) -> float:
        return self._ms / 1000

    def unix_ms(self) -> int:
        return self._ms
