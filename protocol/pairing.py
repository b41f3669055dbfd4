"""The device's pairing window and M3 back-off (PROTOCOL.md §5.6), as pure logic.

The window is open for 10 minutes after power-on of a device without an
active identity, after a button press and after a factory reset; RESULT 0
closes it. After ``n`` consecutive sessions in which the device sent M2 but
accepted no M3, M1 is answered with ERROR 10 for ``min(2^(n−1), 64)`` s.
``n`` (and the back-off deadline) survive power cycles, so the state is a
small dict the device stores; times are wall-clock seconds from an injected
clock so they mean the same after a reboot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.errors import Status

WINDOW_S = 600.0
BACKOFF_CAP_S = 64.0


def backoff_seconds(failures: int) -> float:
    return 0.0 if failures <= 0 else min(2.0 ** (failures - 1), BACKOFF_CAP_S)


@dataclass
class PairingGate:
    """Whether M1 is admitted now; updated by the device at session ends."""

    clock: Callable[[], float]
    window_until: float = 0.0
    failures: int = 0
    backoff_until: float = 0.0

    def open_window(self) -> None:
        """Power-on without identity, button press or factory reset."""
        self.window_until = self.clock() + WINDOW_S

    def button_pressed(self) -> None:
        self.failures = 0
        self.backoff_until = 0.0
        self.open_window()

    def factory_reset(self) -> None:
        self.button_pressed()

    def close_window(self) -> None:
        """RESULT 0 was sent."""
        self.window_until = 0.0

    @property
    def window_open(self) -> bool:
        return self.clock() < self.window_until

    def admit(self) -> Status | None:
        """None to answer M1 with M2, else the ERROR status (10)."""
        now = self.clock()
        if now >= self.window_until or now < self.backoff_until:
            return Status.WINDOW_CLOSED
        return None

    def session_ended(self, *, sent_m2: bool, accepted_m3: bool) -> None:
        if accepted_m3:
            self.failures = 0
            self.backoff_until = 0.0
        elif sent_m2:
            self.failures += 1
            self.backoff_until = self.clock() + backoff_seconds(self.failures)

    def to_json(self) -> dict[str, Any]:
        return {
            "window_until": self.window_until,
            "failures": self.failures,
            "backoff_until": self.backoff_until,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], clock: Callable[[], float]) -> PairingGate:
        return cls(
            clock=clock,
            window_until=float(data.get("window_until", 0.0)),
            failures=int(data.get("failures", 0)),
            backoff_until=float(data.get("backoff_until", 0.0)),
        )
