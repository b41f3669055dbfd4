"""Protocol timers (PROTOCOL.md §5.1, §5.3, §5.4) for the sans-I/O sessions.

A session never sleeps: it records deadlines on an injected clock; the
transport asks ``next_deadline()`` and calls ``handle_timer()`` when it passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar

Clock = Callable[[], float]

default_clock: Clock = time.monotonic

SESSION_S = 600.0  # a session lasts at most 10 minutes from M1 (§5.4)
AWAIT_AUTH_S = 120.0  # the device waits 120 s for M3 (§5.1 step 2)
USER_CONFIRM_S = 60.0  # the device's user has 60 s (§5.3 step 3)
RESULT_AFTER_JOIN_S = 120.0  # a commissioner waits 120 s for RESULT after PROGRESS 2 (§5.4)
# Our choices where DS1 is silent (docs/PROTOCOL.md): how long a connected
# commissioner may stay silent before M1, and how long the commissioner waits
# for a device's answer that needs no user or radio work (M2, M4, SCAN_RESULT).
AWAIT_HELLO_S = 30.0
DEVICE_ANSWER_S = 30.0
# PROVISION → first answer: the device asks its user (60 s) before joining.
AWAIT_JOIN_START_S = USER_CONFIRM_S + 15.0


K = TypeVar("K", bound=Enum)


class Timers(Generic[K]):
    """A handful of named deadlines."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._deadlines: dict[K, float] = {}

    def start(self, name: K, seconds: float) -> None:
        self._deadlines[name] = self.clock() + seconds

    def stop(self, name: K) -> None:
        self._deadlines.pop(name, None)

    def clear(self) -> None:
        self._deadlines.clear()

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def expired(self, now: float | None = None) -> K | None:
        """The earliest expired timer, removed, or None."""
        t = self.clock() if now is None else now
        due = [(d, k) for k, d in self._deadlines.items() if d <= t]
        if not due:
            return None
        _, name = min(due, key=lambda pair: pair[0])
        del self._deadlines[name]
        return name
