"""DS1 framing (PROTOCOL.md §3): messages ↔ GATT-sized fragments.

Header byte: bit 7 FIRST, bit 6 LAST, bits 0–5 a per-message counter (0 in
FIRST, +1 per fragment mod 64). A FIRST fragment carries ``u16`` message length
after the header. Every rejection rule of §3 raises ``FramingError``; the
reassembler's buffer never exceeds the 2048-byte cap.
"""

from __future__ import annotations

from protocol.errors import FramingError

FIRST = 0x80
LAST = 0x40
COUNTER_MASK = 0x3F
MAX_MESSAGE = 2048
MIN_FRAGMENT_PAYLOAD = 20  # ATT_MTU 23 − 3: must always work


def fragment(message: bytes, max_fragment: int) -> list[bytes]:
    """Split ``message`` into fragments of at most ``max_fragment`` bytes (ATT_MTU − 3)."""
    if not 1 <= len(message) <= MAX_MESSAGE:
        raise ValueError(f"message length {len(message)} outside 1..{MAX_MESSAGE}")
    if max_fragment < 4:
        raise ValueError("fragment size below the 4-byte minimum")
    out: list[bytes] = []
    first_room = max_fragment - 3
    pos = min(first_room, len(message))
    header = FIRST | (LAST if pos == len(message) else 0)
    out.append(bytes((header,)) + len(message).to_bytes(2, "big") + message[:pos])
    counter = 0
    room = max_fragment - 1
    while pos < len(message):
        counter = (counter + 1) & COUNTER_MASK
        end = min(pos + room, len(message))
        out.append(bytes(((LAST if end == len(message) else 0) | counter,)) + message[pos:end])
        pos = end
    return out


class Reassembler:
    """Collects fragments of one direction into whole messages, one at a time.

    ``feed`` returns the message a fragment completes, or None. After any
    error the reassembler stays failed: the session must close (§3).
    """

    __slots__ = ("_buffer", "_counter", "_expected", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._expected = 0  # 0: no message in progress
        self._counter = 0
        self._failed = False

    @property
    def in_progress(self) -> bool:
        return self._expected != 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def reset(self) -> None:
        self._buffer.clear()
        self._expected = 0
        self._counter = 0
        self._failed = False

    def _fail(self, reason: str, code: str) -> FramingError:
        self._failed = True
        self._buffer.clear()
        self._expected = 0
        return FramingError(reason, code=code)

    def feed(self, data: bytes) -> bytes | None:
        if self._failed:
            raise FramingError("framing already failed; session must close", code="framing_failed")
        if not data:
            raise self._fail("empty fragment", "empty_fragment")
        header = data[0]
        counter = header & COUNTER_MASK
        if header & FIRST:
            if self._expected:
                raise self._fail(
                    "FIRST fragment while a message is in progress", "unexpected_first"
                )
            if counter != 0:
                raise self._fail("FIRST fragment with a non-zero counter", "bad_counter")
            if len(data) < 4:
                raise self._fail("FIRST fragment shorter than 4 bytes", "short_first")
            declared = int.from_bytes(data[1:3], "big")
            if declared == 0 or declared > MAX_MESSAGE:
                raise self._fail(f"declared length {declared} outside 1..2048", "bad_length")
            payload = data[3:]
            self._expected = declared
            self._counter = 0
        else:
            if not self._expected:
                raise self._fail("fragment with no message in progress", "no_message")
            if counter != (self._counter + 1) & COUNTER_MASK:
                raise self._fail("fragment counter gap", "counter_gap")
            if len(data) < 2:
                raise self._fail("fragment with no payload", "empty_fragment")
            payload = data[1:]
            self._counter = counter
        if len(self._buffer) + len(payload) > self._expected:
            raise self._fail("more bytes than declared", "overrun")
        self._buffer += payload
        complete = len(self._buffer) == self._expected
        if complete != bool(header & LAST):
            if complete:
                raise self._fail("declared length complete without LAST", "missing_last")
            raise self._fail("LAST fragment before the declared length", "early_last")
        if not complete:
            return None
        message = bytes(self._buffer)
        self._buffer.clear()
        self._expected = 0
        return message
