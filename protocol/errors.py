"""Doorstep's error tree with stable codes (PROTOCOL.md §4 status codes).

Every error raised by the protocol core carries a DS1 ``status`` (the number
that travels in ERROR, RESULT and CLOSE) and a stable string ``code`` (what
logs, the cloud's problem+json bodies and the CLI print). Messages never
contain key material or passphrases.

::

    DS1Error (status, code)
    ├── FramingError          11 protocol_error   §3 fragment rules
    ├── MessageError          11 malformed_message §4 decoding/validation
    ├── StateError            11 unexpected_message  a legal message in the wrong state
    ├── AuthenticationError   12 authentication_failed  tag, Cmt, seal, Fin, records, Ack
    ├── IdentityError          8 invalid_identity  W does not open or epoch too low
    ├── WifiParameterError    14 invalid_wifi_parameters  ssid/passphrase rules of §4
    ├── UnsupportedSecurity    4 unsupported_security
    ├── PeerError             (peer's status)  the peer sent ERROR/RESULT/CLOSE ≠ 0
    ├── SessionTimeout        13 timed_out
    ├── WindowClosed          10 pairing_window_closed
    ├── Busy                   9 busy
    ├── SignatureError        12 bad_signature  §6.3 request signatures
    └── EntropyError          (no status) the OS entropy source failed: fail closed
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """DS1 status codes (§4), carried in RESULT, CLOSE and ERROR."""

    OK = 0
    REJECTED_BY_USER = 1
    NETWORK_NOT_FOUND = 2
    WIFI_AUTH_FAILED = 3
    UNSUPPORTED_SECURITY = 4
    JOIN_TIMEOUT = 5
    NO_IP_ADDRESS = 6
    INVALID_IDENTITY = 8
    BUSY = 9
    WINDOW_CLOSED = 10
    PROTOCOL_ERROR = 11
    AUTHENTICATION_FAILED = 12
    TIMED_OUT = 13
    INVALID_WIFI_PARAMETERS = 14

    @property
    def describe(self) -> str:
        return STATUS_TEXT[self]


STATUS_TEXT: dict[Status, str] = {
    Status.OK: "ok",
    Status.REJECTED_BY_USER: "rejected by the user",
    Status.NETWORK_NOT_FOUND: "Wi-Fi network not found",
    Status.WIFI_AUTH_FAILED: "Wi-Fi authentication failed (wrong passphrase?)",
    Status.UNSUPPORTED_SECURITY: "unsupported Wi-Fi security type",
    Status.JOIN_TIMEOUT: "joining the Wi-Fi network timed out",
    Status.NO_IP_ADDRESS: "joined Wi-Fi but obtained no IP address",
    Status.INVALID_IDENTITY: "the identity from the cloud was not accepted",
    Status.BUSY: "the device is busy with another commissioner",
    Status.WINDOW_CLOSED: "the device's pairing window is closed",
    Status.PROTOCOL_ERROR: "protocol error",
    Status.AUTHENTICATION_FAILED: "authentication failed",
    Status.TIMED_OUT: "timed out",
    Status.INVALID_WIFI_PARAMETERS: "invalid Wi-Fi parameters",
}

# Statuses a device may answer to PROVISION while keeping the session open (§5.3 step 4).
WIFI_JOIN_FAILURES = frozenset(
    {
        Status.NETWORK_NOT_FOUND,
        Status.WIFI_AUTH_FAILED,
        Status.UNSUPPORTED_SECURITY,
        Status.JOIN_TIMEOUT,
        Status.NO_IP_ADDRESS,
    }
)


def status_from_int(value: int) -> Status | None:
    """The Status for a wire value, or None for an unassigned one (e.g. 7)."""
    try:
        return Status(value)
    except ValueError:
        return None


def peer_status(value: int) -> Status:
    """A peer's wire status; an unassigned value counts as a protocol error.

    (Not ``status_from_int(v) or …``: ``Status.OK`` is 0 and therefore falsy.)
    """
    status = status_from_int(value)
    return Status.PROTOCOL_ERROR if status is None else status


class DS1Error(Exception):
    """Base of all Doorstep protocol errors: a stable ``code`` and a DS1 ``status``."""

    status: Status = Status.PROTOCOL_ERROR
    code: str = "protocol_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class FramingError(DS1Error):
    """A §3 fragment rule was broken; the session closes (ERROR 11 before M4)."""

    status = Status.PROTOCOL_ERROR
    code = "framing_error"


class MessageError(DS1Error):
    """A message failed §4 decoding or validation."""

    status = Status.PROTOCOL_ERROR
    code = "malformed_message"


class StateError(DS1Error):
    """A well-formed message arrived in a state where it is not allowed."""

    status = Status.PROTOCOL_ERROR
    code = "unexpected_message"


class AuthenticationError(DS1Error):
    """A commitment, tag, seal, Finished value, record or Ack did not verify."""

    status = Status.AUTHENTICATION_FAILED
    code = "authentication_failed"


class IdentityError(DS1Error):
    """W did not open, or its epoch is not above the active one (§5.3 step 2)."""

    status = Status.INVALID_IDENTITY
    code = "invalid_identity"


class WifiParameterError(DS1Error):
    """SSID or passphrase breaks the §4 rules."""

    status = Status.INVALID_WIFI_PARAMETERS
    code = "invalid_wifi_parameters"


class UnsupportedSecurity(DS1Error):
    """A security type the device does not know (§5.3 step 1)."""

    status = Status.UNSUPPORTED_SECURITY
    code = "unsupported_security"


class SessionTimeout(DS1Error):
    """A protocol timer expired (§5.1, §5.3, §5.4)."""

    status = Status.TIMED_OUT
    code = "timed_out"


class WindowClosed(DS1Error):
    """The device's pairing window is closed or it is backing off (§5.6)."""

    status = Status.WINDOW_CLOSED
    code = "pairing_window_closed"


class Busy(DS1Error):
    """Another commissioner is connected (§5.1 step 1)."""

    status = Status.BUSY
    code = "busy"


class PeerError(DS1Error):
    """The peer ended the exchange with a non-zero status (ERROR, RESULT or CLOSE)."""

    def __init__(self, status: int, reason: str = "") -> None:
        known = status_from_int(status)
        self.peer_status = status
        self.status = known if known is not None else Status.PROTOCOL_ERROR
        self.reason = reason
        self.code = f"peer_status_{status}"
        text = known.describe if known is not None else f"unknown status {status}"
        super().__init__(f"peer reported {status} ({text})")


class SignatureError(DS1Error):
    """A §6.3 request signature is malformed, stale, replayed or wrong."""

    status = Status.AUTHENTICATION_FAILED
    code = "bad_signature"


class EntropyError(DS1Error):
    """The OS entropy source failed: no random value is produced (fail closed).

    Never sent on the air; its status only matters if it ends a session.
    """

    code = "entropy_unavailable"
