"""What both DS1 role sessions share: framing, the outbox, events, the state table.

``DeviceSession`` and ``CommissionerSession`` each define their own states,
inputs, transition table and events; this base holds the plumbing so the
two stay alike where §3–§5.4 treat them alike.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Generic, TypeVar

from protocol.errors import StateError
from protocol.framing import Reassembler, fragment
from protocol.handshake import HandshakeResult
from protocol.messages import InnerMessage
from protocol.timers import Clock, Timers

StateT = TypeVar("StateT", bound=Enum)
InputT = TypeVar("InputT", bound=Enum)
EventT = TypeVar("EventT")
TimerT = TypeVar("TimerT", bound=Enum)


class Session(Generic[StateT, InputT, EventT, TimerT]):
    """One connection's protocol state, without I/O."""

    TABLE: ClassVar[dict[tuple[Enum, Enum], Enum]]
    CLOSED: ClassVar[Enum]

    def __init__(self, state: StateT, clock: Clock, max_fragment: int) -> None:
        self.state = state
        self.max_fragment = max_fragment
        self._reassembler = Reassembler()
        self._outbox: list[bytes] = []
        self._events: list[EventT] = []
        self._timers: Timers[TimerT] = Timers(clock)
        self._result: HandshakeResult | None = None

    @property
    def closed(self) -> bool:
        return self.state is self.CLOSED

    @property
    def sas(self) -> str | None:
        """The 6-digit code, once the handshake is done."""
        return self._result.sas if self._result else None

    def data_to_send(self) -> list[bytes]:
        """Fragments to put on the air (GATT writes or notifications), in order."""
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float | None:
        return self._timers.next_deadline()

    def _send(self, message: bytes) -> None:
        self._outbox.extend(fragment(message, self.max_fragment))

    def _send_inner(self, inner: InnerMessage) -> None:
        assert self._result is not None
        self._send(self._result.channel.seal(inner.encode()))

    def _advance(self, event: InputT) -> None:
        """Move along the one transition table; any other move is a StateError."""
        nxt = self.TABLE.get((self.state, event))
        if nxt is None:
            raise StateError(f"{event.name} not allowed in {self.state.name}")
        self.state = nxt  # type: ignore[assignment]

    def _drain(self) -> list[EventT]:
        out, self._events = self._events, []
        return out
