"""The commissioner's side of one DS1 connection (PROTOCOL.md §3–§5), sans-I/O.

Used by the phone app and the hub. ``CommissionerSession`` turns fragments
notified on ``tx`` into events and the application's calls into fragments to
write on ``rx``. It exposes exactly what must go to the cloud
(``BindStartNeeded.request``) and takes the cloud's answer back.

States and the one transition table, ``COMMISSIONER_SESSION_TABLE``::

    IDLE ─start→ AWAIT_CHALLENGE ─M2→ AWAIT_CLOUD ─answer→ AWAIT_AUTH_OK ─M4→ READY
    READY ─scan→ SCANNING ─SCAN_RESULT→ READY
    AWAIT_AUTH_OK ─scan→ AWAIT_AUTH_OK_SCANNING ─M4→ SCANNING   (SCAN pipelined behind M3)
    READY ─provision→ PROVISIONING ─RESULT 2–6/4/14→ READY
    PROVISIONING ─RESULT 0→ PROVISIONED        any ─ERROR/CLOSE/failure→ CLOSED

The user's confirmation of the SAS (§5.5) happens between ``Authenticated``
and ``provision()``; rejecting it is ``close(Status.REJECTED_BY_USER)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from protocol.crypto import RandomSource
from protocol.errors import (
    WIFI_JOIN_FAILURES,
    AuthenticationError,
    DS1Error,
    SessionTimeout,
    StateError,
    Status,
    peer_status,
)
from protocol.framing import MIN_FRAGMENT_PAYLOAD
from protocol.handshake import BindStartRequest, CommissionerHandshake
from protocol.messages import (
    Challenge,
    Close,
    Error,
    InnerMessage,
    Network,
    Progress,
    ProgressStage,
    Provision,
    Record,
    Result,
    Scan,
    ScanResult,
    decode_inner,
    decode_message,
)
from protocol.session import Session
from protocol.timers import (
    AWAIT_JOIN_START_S,
    DEVICE_ANSWER_S,
    RESULT_AFTER_JOIN_S,
    SESSION_S,
    Clock,
    default_clock,
)
from protocol.wifi import validate_wifi


class CommissionerSessionState(Enum):
    IDLE = auto()
    AWAIT_CHALLENGE = auto()
    AWAIT_CLOUD = auto()
    AWAIT_AUTH_OK = auto()
    AWAIT_AUTH_OK_SCANNING = auto()
    READY = auto()
    SCANNING = auto()
    PROVISIONING = auto()
    PROVISIONED = auto()
    CLOSED = auto()


class CommissionerInput(Enum):
    START = auto()
    CHALLENGE = auto()
    CLOUD_ANSWER = auto()
    AUTH_OK = auto()
    SCAN = auto()
    SCAN_RESULT = auto()
    PROVISION = auto()
    PROGRESS = auto()
    RESULT_RETRYABLE = auto()
    RESULT_OK = auto()


C = CommissionerSessionState
CI = CommissionerInput

COMMISSIONER_SESSION_TABLE: dict[
    tuple[CommissionerSessionState, CommissionerInput], CommissionerSessionState
] = {
    (C.IDLE, CI.START): C.AWAIT_CHALLENGE,
    (C.AWAIT_CHALLENGE, CI.CHALLENGE): C.AWAIT_CLOUD,
    (C.AWAIT_CLOUD, CI.CLOUD_ANSWER): C.AWAIT_AUTH_OK,
    (C.AWAIT_AUTH_OK, CI.AUTH_OK): C.READY,
    # SCAN pipelined behind M3 (one BLE round trip fewer):
    (C.AWAIT_AUTH_OK, CI.SCAN): C.AWAIT_AUTH_OK_SCANNING,
    (C.AWAIT_AUTH_OK_SCANNING, CI.AUTH_OK): C.SCANNING,
    (C.READY, CI.SCAN): C.SCANNING,
    (C.SCANNING, CI.SCAN_RESULT): C.READY,
    (C.READY, CI.PROVISION): C.PROVISIONING,
    (C.PROVISIONING, CI.PROGRESS): C.PROVISIONING,
    (C.PROVISIONING, CI.RESULT_RETRYABLE): C.READY,
    (C.PROVISIONING, CI.RESULT_OK): C.PROVISIONED,
}

_SECURE = frozenset({C.READY, C.SCANNING, C.PROVISIONING, C.PROVISIONED})
# RESULT statuses after which the device keeps the session open (§5.3 steps 1 and 4).
RETRYABLE_RESULTS = WIFI_JOIN_FAILURES | {Status.INVALID_WIFI_PARAMETERS}


class CommissionerTimer(Enum):
    SESSION = auto()
    ANSWER = auto()
    RESULT = auto()


@dataclass(frozen=True)
class BindStartNeeded:
    """Send ``request`` to ``POST /v1/bind/start``; then call ``cloud_answer``."""

    request: BindStartRequest


@dataclass(frozen=True)
class Authenticated:
    """M4 verified. Ask the user to confirm ``sas`` and the device (§5.5)."""

    sas: str
    challenge: Challenge


@dataclass(frozen=True)
class ScanResultsReceived:
    networks: tuple[Network, ...]


@dataclass(frozen=True)
class ProgressReported:
    stage: int
    detail: str


@dataclass(frozen=True)
class ProvisionFailed:
    """A RESULT that keeps the session open: fix the network or passphrase and retry."""

    status: Status
    detail: str


@dataclass(frozen=True)
class ProvisionSucceeded:
    """RESULT 0: relay ``ack`` to ``POST /v1/bind/complete``."""

    ack: bytes


@dataclass(frozen=True)
class SessionEnded:
    """The session is over (ERROR, CLOSE, a closing RESULT, timer or failure)."""

    status: Status
    reason: str
    by_device: bool


CommissionerEvent = (
    BindStartNeeded
    | Authenticated
    | ScanResultsReceived
    | ProgressReported
    | ProvisionFailed
    | ProvisionSucceeded
    | SessionEnded
)


class CommissionerSession(
    Session[CommissionerSessionState, CommissionerInput, CommissionerEvent, CommissionerTimer]
):
    """One device connection on the commissioner (phone app or hub)."""

    TABLE = COMMISSIONER_SESSION_TABLE  # type: ignore[assignment]
    CLOSED = CommissionerSessionState.CLOSED

    def __init__(
        self,
        *,
        rng: RandomSource,
        clock: Clock = default_clock,
        max_fragment: int = MIN_FRAGMENT_PAYLOAD,
    ) -> None:
        super().__init__(C.IDLE, clock, max_fragment)
        self._handshake = CommissionerHandshake(rng)
        self._wrapped_identity = b""
        self.end: SessionEnded | None = None

    # ---- plumbing -----------------------------------------------------------

    @property
    def transcript_hash(self) -> bytes | None:
        return self._result.th if self._result else None

    def _end(self, status: Status, reason: str, *, by_device: bool) -> None:
        if self.state is C.CLOSED:
            return
        self.state = C.CLOSED
        self._timers.clear()
        self._reassembler.reset()
        self.end = SessionEnded(status, reason, by_device)
        self._events.append(self.end)

    # ---- calls from the application ----------------------------------------

    def start(self) -> list[CommissionerEvent]:
        """Send M1 (call right after enabling ``tx`` notifications)."""
        self._advance(CI.START)
        self._send(self._handshake.hello())
        self._timers.start(CommissionerTimer.SESSION, SESSION_S)
        self._timers.start(CommissionerTimer.ANSWER, DEVICE_ANSWER_S)
        return self._drain()

    def cloud_answer(
        self, *, ticket: bytes, seal: bytes, session_secret: bytes, wrapped_identity: bytes
    ) -> list[CommissionerEvent]:
        """The cloud's 201 answer to bind/start: send M3."""
        self._advance(CI.CLOUD_ANSWER)
        if len(wrapped_identity) != 80:
            self._end(Status.PROTOCOL_ERROR, "cloud sent a malformed identity", by_device=False)
            raise AuthenticationError("wrapped identity must be 80 bytes", code="bad_cloud_answer")
        self._wrapped_identity = wrapped_identity
        try:
            m3 = self._handshake.receive_cloud_answer(ticket, seal, session_secret)
        except DS1Error as exc:
            self._end(exc.status, exc.message, by_device=False)
            raise
        self._send(m3)
        self._timers.start(CommissionerTimer.ANSWER, DEVICE_ANSWER_S)
        return self._drain()

    def scan(self) -> list[CommissionerEvent]:
        """Ask for the device's scan; allowed right after ``cloud_answer`` to share M3's round trip."""
        early = self.state is C.AWAIT_AUTH_OK
        self._advance(CI.SCAN)
        if early:
            self._send(self._handshake.early_channel.seal(Scan().encode()))
        else:
            self._send_inner(Scan())
        self._timers.start(CommissionerTimer.ANSWER, DEVICE_ANSWER_S)
        return self._drain()

    def provision(self, ssid: bytes, passphrase: str, security: int) -> list[CommissionerEvent]:
        """Send PROVISION with the cloud's W. Validates per §4 first (raises, sends nothing)."""
        if self.state is not C.READY:
            raise StateError(f"PROVISION not allowed in {self.state.name}")
        validate_wifi(ssid, security, passphrase)
        self._advance(CI.PROVISION)
        self._send_inner(Provision(ssid, passphrase, security, self._wrapped_identity))
        self._timers.start(CommissionerTimer.ANSWER, AWAIT_JOIN_START_S)
        return self._drain()

    def close(self, status: Status = Status.OK) -> list[CommissionerEvent]:
        """End the session: CLOSE after M4 (e.g. 1 when the user rejects the code)."""
        if self.state in _SECURE:
            self._send_inner(Close(int(status)))
        self._end(status, "closed by commissioner", by_device=False)
        return self._drain()

    def connection_lost(self) -> list[CommissionerEvent]:
        self._end(Status.PROTOCOL_ERROR, "the device disconnected", by_device=True)
        return self._drain()

    # ---- input from the link ------------------------------------------------

    def receive_fragment(self, data: bytes) -> list[CommissionerEvent]:
        """Feed one ``tx`` notification. Protocol violations raise after closing."""
        if self.state is C.CLOSED:
            return []
        try:
            message = self._reassembler.feed(data)
            if message is not None:
                self._receive_message(message)
        except DS1Error as exc:
            self._end(exc.status, exc.message, by_device=False)
            raise
        return self._drain()

    def _receive_message(self, message: bytes) -> None:
        msg = decode_message(message)
        if isinstance(msg, Error):
            if self.state in _SECURE:
                raise StateError("ERROR after M4")
            status = peer_status(msg.status)
            self._end(status, msg.reason, by_device=True)
            return
        if self.state is C.AWAIT_CHALLENGE:
            request = self._handshake.receive_challenge(message, msg)
            self._advance(CI.CHALLENGE)
            self._timers.stop(CommissionerTimer.ANSWER)
            self._events.append(BindStartNeeded(request))
        elif self.state in (C.AWAIT_AUTH_OK, C.AWAIT_AUTH_OK_SCANNING):
            self._result = self._handshake.receive_auth_ok(message, msg)
            self._advance(CI.AUTH_OK)
            self._timers.stop(CommissionerTimer.ANSWER)
            self._events.append(Authenticated(self._result.sas, self._result.challenge))
        elif self.state in _SECURE and isinstance(msg, Record):
            assert self._result is not None
            self._receive_inner(decode_inner(self._result.channel.open(msg)))
        else:
            raise StateError(f"{type(msg).__name__} not expected in {self.state.name}")

    def _receive_inner(self, inner: InnerMessage) -> None:
        if isinstance(inner, Close):
            status = peer_status(inner.status)
            self._end(status, "device closed the session", by_device=True)
        elif isinstance(inner, ScanResult):
            self._advance(CI.SCAN_RESULT)
            self._timers.stop(CommissionerTimer.ANSWER)
            self._events.append(ScanResultsReceived(inner.networks))
        elif isinstance(inner, Progress):
            self._advance(CI.PROGRESS)
            if inner.stage == ProgressStage.AWAITING_USER:
                self._timers.start(CommissionerTimer.ANSWER, AWAIT_JOIN_START_S)
            elif inner.stage == ProgressStage.JOINING_WIFI:
                self._timers.stop(CommissionerTimer.ANSWER)
                self._timers.start(CommissionerTimer.RESULT, RESULT_AFTER_JOIN_S)
            self._events.append(ProgressReported(inner.stage, inner.detail))
        elif isinstance(inner, Result):
            self._receive_result(inner)
        else:
            raise StateError(f"{type(inner).__name__} is not for the commissioner")

    def _receive_result(self, result: Result) -> None:
        if self.state is not C.PROVISIONING:
            raise StateError("RESULT without PROVISION")
        self._timers.stop(CommissionerTimer.ANSWER)
        self._timers.stop(CommissionerTimer.RESULT)
        status = peer_status(result.status)
        if status is Status.OK:
            assert result.ack is not None
            self._advance(CI.RESULT_OK)
            self._events.append(ProvisionSucceeded(result.ack))
        elif status in RETRYABLE_RESULTS:
            self._advance(CI.RESULT_RETRYABLE)
            self._events.append(ProvisionFailed(status, result.detail))
        else:
            self._end(status, result.detail, by_device=True)

    # ---- timers ----------------------------------------------------------------

    def handle_timer(self, now: float | None = None) -> list[CommissionerEvent]:
        expired = self._timers.expired(now)
        if expired is not None and self.state is not C.CLOSED:
            if self.state in _SECURE:
                self._send_inner(Close(int(Status.TIMED_OUT)))
            self._end(Status.TIMED_OUT, f"{expired.name.lower()} timer expired", by_device=False)
        return self._drain()


__all__ = [
    "COMMISSIONER_SESSION_TABLE",
    "Authenticated",
    "BindStartNeeded",
    "CommissionerEvent",
    "CommissionerInput",
    "CommissionerSession",
    "CommissionerSessionState",
    "ProgressReported",
    "ProvisionFailed",
    "ProvisionSucceeded",
    "ScanResultsReceived",
    "SessionEnded",
    "SessionTimeout",
]
