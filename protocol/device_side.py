"""The device's side of one DS1 connection (PROTOCOL.md §3–§5), sans-I/O.

``DeviceSession`` takes fragments written to ``rx`` and produces fragments to
notify on ``tx``, plus events for the device application, which answers them
by calling methods back (admit, scan results, the user's decision, the Wi-Fi
join outcome, the atomic store). The handshake (``DeviceHandshake``) hands
over a ``SecureChannel`` after M4; the provisioning phase runs on it.

States and the one transition table, ``DEVICE_SESSION_TABLE``::

    AWAIT_HELLO ─M1→ ADMITTING ─admit→ AWAIT_AUTH ─M3→ SECURE
    SECURE ─SCAN→ SCANNING ─results→ SECURE
    SECURE ─PROVISION→ CONFIRMING ─accept→ JOINING ─joined→ STORING ─stored→ PROVISIONED
    (same SSID as already confirmed: SECURE ─PROVISION→ JOINING)
    JOINING ─join failed→ SECURE          any ─error/timeout/CLOSE→ CLOSED

Errors: before M4 the device answers ERROR (11 framing/decoding, 12 any M3
failure, 13 timer, 9/10 admission) and closes; after M4 a protocol failure
closes without a message (§3), a timer sends CLOSE 13.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from protocol.cloudside import Identity, open_wrapped_identity
from protocol.crypto import RandomSource
from protocol.errors import (
    AuthenticationError,
    DS1Error,
    FramingError,
    IdentityError,
    SessionTimeout,
    StateError,
    Status,
    peer_status,
)
from protocol.factory import FactoryRecord
from protocol.framing import MIN_FRAGMENT_PAYLOAD
from protocol.handshake import DeviceHandshake
from protocol.messages import (
    PROGRESS_TEXT,
    Auth,
    Close,
    Error,
    Hello,
    InnerMessage,
    Network,
    Progress,
    ProgressStage,
    Provision,
    Result,
    Scan,
    ScanResult,
    decode_inner,
    decode_message,
)
from protocol.schedule import bind_ack
from protocol.session import Session
from protocol.timers import (
    AWAIT_AUTH_S,
    AWAIT_HELLO_S,
    SESSION_S,
    USER_CONFIRM_S,
    Clock,
    default_clock,
)
from protocol.wifi import WifiCredentials, validate_wifi


class DeviceSessionState(Enum):
    AWAIT_HELLO = auto()
    ADMITTING = auto()
    AWAIT_AUTH = auto()
    SECURE = auto()
    SCANNING = auto()
    CONFIRMING = auto()
    JOINING = auto()
    STORING = auto()
    PROVISIONED = auto()
    CLOSED = auto()


class DeviceInput(Enum):
    HELLO = auto()
    ADMIT = auto()
    AUTH = auto()
    SCAN = auto()
    SCAN_DONE = auto()
    PROVISION = auto()
    PROVISION_CONFIRMED_SSID = auto()
    USER_ACCEPT = auto()
    JOIN_FAILED = auto()
    JOINED = auto()
    STORED = auto()


S = DeviceSessionState
I = DeviceInput  # noqa: E741

DEVICE_SESSION_TABLE: dict[tuple[DeviceSessionState, DeviceInput], DeviceSessionState] = {
    (S.AWAIT_HELLO, I.HELLO): S.ADMITTING,
    (S.ADMITTING, I.ADMIT): S.AWAIT_AUTH,
    (S.AWAIT_AUTH, I.AUTH): S.SECURE,
    (S.SECURE, I.SCAN): S.SCANNING,
    (S.SCANNING, I.SCAN_DONE): S.SECURE,
    (S.SECURE, I.PROVISION): S.CONFIRMING,
    (S.SECURE, I.PROVISION_CONFIRMED_SSID): S.JOINING,
    (S.CONFIRMING, I.USER_ACCEPT): S.JOINING,
    (S.JOINING, I.JOIN_FAILED): S.SECURE,
    (S.JOINING, I.JOINED): S.STORING,
    (S.STORING, I.STORED): S.PROVISIONED,
}

# States after M4: errors there close without an ERROR message.
_SECURE_STATES = frozenset(
    {S.SECURE, S.SCANNING, S.CONFIRMING, S.JOINING, S.STORING, S.PROVISIONED}
)


class DeviceTimer(Enum):
    HELLO = auto()
    AUTH = auto()
    SESSION = auto()
    USER = auto()


# ---- events handed to the device application ---------------------------------


@dataclass(frozen=True)
class HelloReceived:
    """A commissioner sent M1: call ``admit()`` or ``refuse(status)``."""


@dataclass(frozen=True)
class Authenticated:
    """M4 sent: the session is secure. ``sas`` is the code to show."""

    sas: str


@dataclass(frozen=True)
class ScanRequested:
    """Call ``scan_results(networks)``."""


@dataclass(frozen=True)
class ConfirmationRequested:
    """Ask the user (PROGRESS 1 sent); call ``user_decision(accepted)`` within 60 s."""

    ssid: bytes
    security: int
    sas: str
    deadline: float


@dataclass(frozen=True, repr=False)
class JoinRequested:
    """Join this network; report ``join_progress``, then ``joined()`` or ``join_failed(status)``."""

    credentials: WifiCredentials

    def __repr__(self) -> str:
        return f"JoinRequested({self.credentials!r})"


@dataclass(frozen=True, repr=False)
class PendingRecord:
    """What §5.3 step 5 stores in one atomic write: Wi-Fi, pending identity, Ack, TH."""

    credentials: WifiCredentials
    identity: Identity
    ack: bytes
    th: bytes

    def __repr__(self) -> str:
        return f"PendingRecord({self.credentials!r}, {self.identity!r})"


@dataclass(frozen=True, repr=False)
class StoreRequested:
    """Store ``record`` atomically, then call ``stored()``."""

    record: PendingRecord

    def __repr__(self) -> str:
        return f"StoreRequested({self.record!r})"


@dataclass(frozen=True)
class Provisioned:
    """RESULT 0 sent. The pairing window closes; check in next (§6.4)."""

    identifier: bytes


@dataclass(frozen=True)
class SessionEnded:
    """The session is over; disconnect. ``status`` is what the device told the peer (or got)."""

    status: Status
    reason: str
    sent_m2: bool
    accepted_m3: bool


DeviceEvent = (
    HelloReceived
    | Authenticated
    | ScanRequested
    | ConfirmationRequested
    | JoinRequested
    | StoreRequested
    | Provisioned
    | SessionEnded
)


class DeviceSession(Session[DeviceSessionState, DeviceInput, DeviceEvent, DeviceTimer]):
    """One commissioner connection on the device."""

    TABLE = DEVICE_SESSION_TABLE  # type: ignore[assignment]
    CLOSED = DeviceSessionState.CLOSED

    def __init__(
        self,
        factory: FactoryRecord,
        *,
        reset_ctr: int,
        active_epoch: int,
        fw: str = "1.0.0",
        rng: RandomSource,
        clock: Clock = default_clock,
        max_fragment: int = MIN_FRAGMENT_PAYLOAD,
    ) -> None:
        super().__init__(S.AWAIT_HELLO, clock, max_fragment)
        self._factory = factory
        self._active_epoch = active_epoch
        self._handshake = DeviceHandshake(factory, reset_ctr=reset_ctr, fw=fw, rng=rng)
        self._timers.start(DeviceTimer.HELLO, AWAIT_HELLO_S)
        self._confirmed_ssid: bytes | None = None
        self._provision: Provision | None = None
        self._credentials: WifiCredentials | None = None
        self._identity: Identity | None = None
        self._pending: PendingRecord | None = None
        self._m1 = b""
        self._hello: Hello | None = None
        self._sent_m2 = False
        self._accepted_m3 = False

    # ---- plumbing ---------------------------------------------------------

    def _end(self, status: Status, reason: str) -> None:
        if self.state is S.CLOSED:
            return
        self.state = S.CLOSED
        self._timers.clear()
        self._handshake.fail()  # erases ephemeral keys if still held
        self._reassembler.reset()
        self._events.append(SessionEnded(status, reason, self._sent_m2, self._accepted_m3))

    def _fail(self, exc: DS1Error) -> None:
        """Close on an error: ERROR before M4, nothing after (§3)."""
        if self.state is S.CLOSED:
            return
        if self.state not in _SECURE_STATES:
            status = exc.status
            if self.state is S.AWAIT_AUTH and not isinstance(exc, FramingError):
                status = Status.AUTHENTICATION_FAILED  # §5.1 step 6
            self._send(Error(int(status), exc.code).encode())
            self._end(status, exc.message)
        else:
            self._end(exc.status, exc.message)

    # ---- input from the link ----------------------------------------------

    def receive_fragment(self, data: bytes) -> list[DeviceEvent]:
        if self.state is S.CLOSED:
            return []
        try:
            message = self._reassembler.feed(data)
            if message is not None:
                self._receive_message(message)
        except DS1Error as exc:
            self._fail(exc)
        return self._drain()

    def connection_lost(self) -> list[DeviceEvent]:
        """The link dropped (the commissioner left or the radio failed)."""
        self._end(Status.PROTOCOL_ERROR, "disconnected")
        return self._drain()

    def _receive_message(self, message: bytes) -> None:
        if self.state is S.AWAIT_HELLO:
            msg = decode_message(message)
            if not isinstance(msg, Hello):
                raise StateError(f"expected HELLO, got {type(msg).__name__}")
            self._advance(I.HELLO)
            self._m1 = message
            self._hello = msg
            self._timers.stop(DeviceTimer.HELLO)
            self._timers.start(DeviceTimer.SESSION, SESSION_S)
            self._events.append(HelloReceived())
        elif self.state is S.AWAIT_AUTH:
            self._receive_auth(message)
        elif self.state in _SECURE_STATES:
            assert self._result is not None
            inner = decode_inner(self._result.channel.open_message(message))
            self._receive_inner(inner)
        else:
            raise StateError(f"message not expected in {self.state.name}")

    def _receive_auth(self, message: bytes) -> None:
        try:
            msg = decode_message(message)
        except DS1Error as exc:
            raise AuthenticationError(f"bad M3: {exc.message}", code="bad_m3") from None
        if not isinstance(msg, Auth):
            raise AuthenticationError("expected AUTH", code="unexpected_message")
        m4, result = self._handshake.receive_auth(message, msg)
        self._advance(I.AUTH)
        self._accepted_m3 = True
        self._timers.stop(DeviceTimer.AUTH)
        self._result = result
        self._send(m4)
        self._events.append(Authenticated(result.sas))

    def _receive_inner(self, inner: InnerMessage) -> None:
        if isinstance(inner, Close):
            status = peer_status(inner.status)
            self._end(status, "commissioner closed the session")
            return
        if self.state is S.PROVISIONED:
            raise StateError("only CLOSE is accepted after RESULT 0")
        if isinstance(inner, Scan):
            self._advance(I.SCAN)
            self._events.append(ScanRequested())
        elif isinstance(inner, Provision):
            self._receive_provision(inner)
        else:
            raise StateError(f"{type(inner).__name__} is not for the device")

    def _receive_provision(self, msg: Provision) -> None:
        if self.state is not S.SECURE:
            raise StateError(f"PROVISION not allowed in {self.state.name}")
        assert self._result is not None
        # §5.3 step 1: parameter checks answer RESULT and keep the session open.
        try:
            credentials = validate_wifi(msg.ssid, msg.security, msg.passphrase)
        except DS1Error as exc:
            self._send_inner(Result(int(exc.status), exc.code))
            return
        # Step 2: W must open under K_wrap and raise the epoch.
        try:
            identity = open_wrapped_identity(
                self._result.k_wrap, self._result.th, msg.wrapped_identity, self._active_epoch
            )
        except IdentityError as exc:
            self._send_inner(Result(int(Status.INVALID_IDENTITY), exc.code))
            self._end(Status.INVALID_IDENTITY, exc.message)
            return
        self._credentials = credentials
        self._identity = identity
        if self._confirmed_ssid == credentials.ssid:
            self._advance(I.PROVISION_CONFIRMED_SSID)
            self._start_join()
            return
        # Step 3: ask the user.
        self._advance(I.PROVISION)
        self._send_inner(Progress(ProgressStage.AWAITING_USER, PROGRESS_TEXT[1]))
        self._timers.start(DeviceTimer.USER, USER_CONFIRM_S)
        deadline = self._timers.clock() + USER_CONFIRM_S
        self._events.append(
            ConfirmationRequested(
                credentials.ssid, credentials.security, self._result.sas, deadline
            )
        )

    def _start_join(self) -> None:
        assert self._credentials is not None
        self._send_inner(Progress(ProgressStage.JOINING_WIFI, PROGRESS_TEXT[2]))
        self._events.append(JoinRequested(self._credentials))

    # ---- answers from the device application ------------------------------

    def _guard(self) -> bool:
        return self.state is not S.CLOSED

    def admit(self) -> list[DeviceEvent]:
        """Answer M1 with M2 and start the 120 s timer for M3."""
        if not self._guard():
            return self._drain()
        self._advance(I.ADMIT)
        try:
            m2 = self._handshake.receive_hello(self._m1, self._hello)
        except DS1Error as exc:
            self._fail(exc)
            return self._drain()
        self._sent_m2 = True
        self._send(m2)
        self._timers.start(DeviceTimer.AUTH, AWAIT_AUTH_S)
        return self._drain()

    def refuse(self, status: Status, reason: str = "") -> list[DeviceEvent]:
        """Answer M1 (or a connection) with ERROR ``status`` (9 busy, 10 window closed)."""
        if self._guard():
            self._send(Error(int(status), reason or status.describe).encode())
            self._end(status, reason or status.describe)
        return self._drain()

    def scan_results(self, networks: list[Network]) -> list[DeviceEvent]:
        if self._guard():
            self._advance(I.SCAN_DONE)
            self._send_inner(ScanResult(tuple(networks[:20])))
        return self._drain()

    def user_decision(self, accepted: bool) -> list[DeviceEvent]:
        if not self._guard():
            return self._drain()
        self._timers.stop(DeviceTimer.USER)
        if not accepted:
            self._send_inner(Result(int(Status.REJECTED_BY_USER), "rejected by user"))
            self._end(Status.REJECTED_BY_USER, "the user rejected the commissioner")
            return self._drain()
        self._advance(I.USER_ACCEPT)
        assert self._credentials is not None
        self._confirmed_ssid = self._credentials.ssid
        self._start_join()
        return self._drain()

    def join_progress(self, stage: int) -> list[DeviceEvent]:
        """Report PROGRESS 3 (obtaining address) while joining."""
        if self._guard() and self.state is S.JOINING:
            self._send_inner(Progress(stage, PROGRESS_TEXT.get(stage, "working")))
        return self._drain()

    def join_failed(self, status: Status, detail: str = "") -> list[DeviceEvent]:
        """§5.3 step 4: nothing stored; the session stays open for another PROVISION."""
        if self._guard():
            self._advance(I.JOIN_FAILED)
            self._send_inner(Result(int(status), detail or status.describe))
        return self._drain()

    def joined(self) -> list[DeviceEvent]:
        """Wi-Fi is up: compute Ack and ask for the atomic store (§5.3 step 5)."""
        if not self._guard():
            return self._drain()
        self._advance(I.JOINED)
        assert self._identity is not None and self._credentials is not None
        assert self._result is not None
        ident = self._identity
        ack = bind_ack(
            ident.k_dev, self._factory.dev_id, ident.identifier, ident.epoch, self._result.th
        )
        self._pending = PendingRecord(self._credentials, ident, ack, self._result.th)
        self._events.append(StoreRequested(self._pending))
        return self._drain()

    def stored(self) -> list[DeviceEvent]:
        """The pending record is durable: answer RESULT 0 with Ack."""
        if not self._guard():
            return self._drain()
        self._advance(I.STORED)
        assert self._pending is not None
        self._send_inner(Result(int(Status.OK), "ok", self._pending.ack))
        self._events.append(Provisioned(self._pending.identity.identifier))
        return self._drain()

    # ---- timers -------------------------------------------------------------

    def handle_timer(self, now: float | None = None) -> list[DeviceEvent]:
        expired = self._timers.expired(now)
        if expired is None or self.state is S.CLOSED:
            return self._drain()
        if expired is DeviceTimer.USER:
            self._send_inner(Result(int(Status.REJECTED_BY_USER), "no answer from user"))
            self._end(Status.REJECTED_BY_USER, "the user did not answer within 60 s")
        elif self.state in _SECURE_STATES:
            self._send_inner(Close(int(Status.TIMED_OUT)))
            self._end(Status.TIMED_OUT, f"{expired.name.lower()} timer expired")
        else:
            self._send(Error(int(Status.TIMED_OUT), "timed out").encode())
            self._end(Status.TIMED_OUT, f"{expired.name.lower()} timer expired")
        return self._drain()


def refusal_message(status: Status, reason: str = "") -> bytes:
    """A whole ERROR message, for a connection refused before any session (e.g. busy)."""
    return Error(int(status), reason or status.describe).encode()


__all__ = [
    "DEVICE_SESSION_TABLE",
    "Authenticated",
    "ConfirmationRequested",
    "DeviceEvent",
    "DeviceInput",
    "DeviceSession",
    "DeviceSessionState",
    "HelloReceived",
    "JoinRequested",
    "PendingRecord",
    "Provisioned",
    "ScanRequested",
    "SessionEnded",
    "SessionTimeout",
    "StoreRequested",
    "refusal_message",
]
