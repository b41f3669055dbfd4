"""The timing model: connection intervals, advertising interval, set-up cost.

Off by default (unit tests run as fast as the host allows); on for the
benchmark and the demo. The model is deliberately simple and documented so
benchmarks can check it:

* every ATT PDU crossing a link in the central → peripheral direction is
  delivered one connection interval after it was submitted, so a request
  "costs" one interval to reach the peripheral;
* a PDU in the peripheral → central direction is delivered at the next
  connection event of the link, the events being anchored at the last
  central → peripheral delivery; hence a write-with-response, a read, or a
  write followed by a notification costs two intervals end to end,
  independent of how long the peripheral application took (if below one
  interval);
* a scanner sees an advertiser after a random phase of one advertising
  interval; a connection costs half an advertising interval plus
  ``setup_intervals`` connection intervals, GATT discovery
  ``2 × (1 + services + characteristics)`` intervals.

Sleeping is done against an injected monotonic clock with a short final spin,
because the event loop's timer resolution (epoll rounds up to 1 ms) would
otherwise add a systematic error of several per cent at 7.5 ms intervals.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]

# Final part of a wait that is spun (yielding to the loop) instead of slept.
_SPIN_S = 0.0015


@dataclass(frozen=True)
class TimingModel:
    """Parameters of the timing model; ``enabled=False`` makes every cost zero."""

    enabled: bool = False
    interval_ms: float = 30.0
    adv_interval_ms: float = 100.0
    setup_intervals: int = 3
    supervision_timeout_ms: float = 2000.0

    @property
    def interval(self) -> float:
        return self.interval_ms / 1000.0

    @property
    def adv_interval(self) -> float:
        return self.adv_interval_ms / 1000.0

    def connect_cost(self) -> float:
        if not self.enabled:
            return 0.0
        return self.adv_interval / 2 + self.setup_intervals * self.interval

    def discovery_cost(self, services: int, characteristics: int) -> float:
        if not self.enabled:
            return 0.0
        return 2 * (1 + services + characteristics) * self.interval

    def scan_delay(self, phase: float) -> float:
        """Delay before a scanner sees an advertiser; ``phase`` in [0, 1)."""
        if not self.enabled:
            return 0.0
        return phase * self.adv_interval


def monotonic() -> float:
    return time.monotonic()


async def sleep_until(deadline: float, clock: Clock = monotonic) -> None:
    """Sleep until ``clock() >= deadline`` with sub-millisecond accuracy."""
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return
        if remaining > _SPIN_S:
            await asyncio.sleep(remaining - _SPIN_S)
        else:
            await asyncio.sleep(0)


def next_event(anchor: float, interval: float, after: float) -> float:
    """First connection event ``anchor + k·interval`` with k ≥ 1 and time ≥ ``after``."""
    if interval <= 0:
        return after
    k = max(1, math.ceil((after - anchor) / interval - 1e-9))
    return anchor + k * interval
