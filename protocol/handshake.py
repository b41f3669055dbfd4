"""The DS1 handshake (PROTOCOL.md §5.1–§5.2) as two role state machines.

Each role has a state enum and one explicit transition table
``(state, input) → next state``; any other input raises ``StateError``
and fails the handshake. Both work on whole messages (framing is below them,
provisioning above). Once done, a handshake hands over a ``SecureChannel``.

    commissioner:  START ─hello→ AWAIT_CHALLENGE ─M2→ AWAIT_CLOUD ─answer→ AWAIT_AUTH_OK ─M4→ DONE
    device:        AWAIT_HELLO ─M1→ AWAIT_AUTH ─M3→ DONE

The commissioner's bind/start request is exactly what the cloud needs (§6.1);
the cloud's answer is fed back with ``receive_cloud_answer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from protocol.channel import SecureChannel
from protocol.cloudside import open_seal
from protocol.crypto import EphemeralKey, RandomSource, equal
from protocol.encoding import b64url_encode
from protocol.errors import AuthenticationError, DS1Error, MessageError, StateError
from protocol.factory import FactoryRecord
from protocol.messages import Auth, AuthOk, Challenge, Hello, OuterMessage, decode_message
from protocol.schedule import (
    SessionKeys,
    challenge_tag,
    commitment,
    key_schedule,
    sas_code,
    transcript_hash,
)


class HandshakeInput(Enum):
    START = auto()
    CHALLENGE = auto()
    CLOUD_ANSWER = auto()
    HELLO = auto()
    AUTH = auto()
    AUTH_OK = auto()


class CommissionerState(Enum):
    START = auto()
    AWAIT_CHALLENGE = auto()
    AWAIT_CLOUD = auto()
    AWAIT_AUTH_OK = auto()
    DONE = auto()
    FAILED = auto()


COMMISSIONER_TRANSITIONS: dict[tuple[CommissionerState, HandshakeInput], CommissionerState] = {
    (CommissionerState.START, HandshakeInput.START): CommissionerState.AWAIT_CHALLENGE,
    (CommissionerState.AWAIT_CHALLENGE, HandshakeInput.CHALLENGE): CommissionerState.AWAIT_CLOUD,
    (CommissionerState.AWAIT_CLOUD, HandshakeInput.CLOUD_ANSWER): CommissionerState.AWAIT_AUTH_OK,
    (CommissionerState.AWAIT_AUTH_OK, HandshakeInput.AUTH_OK): CommissionerState.DONE,
}


class DeviceState(Enum):
    AWAIT_HELLO = auto()
    AWAIT_AUTH = auto()
    DONE = auto()
    FAILED = auto()


DEVICE_TRANSITIONS: dict[tuple[DeviceState, HandshakeInput], DeviceState] = {
    (DeviceState.AWAIT_HELLO, HandshakeInput.HELLO): DeviceState.AWAIT_AUTH,
    (DeviceState.AWAIT_AUTH, HandshakeInput.AUTH): DeviceState.DONE,
}


@dataclass(frozen=True)
class BindStartRequest:
    """What the commissioner sends to ``POST /v1/bind/start`` (§6.1)."""

    m1: bytes
    m2: bytes
    commissioner_pub: bytes
    commissioner_nonce: bytes
    challenge: Challenge

    def to_json(self) -> dict[str, str]:
        return {
            "m1": b64url_encode(self.m1),
            "m2": b64url_encode(self.m2),
            "commissioner_pub": b64url_encode(self.commissioner_pub),
            "commissioner_nonce": b64url_encode(self.commissioner_nonce),
        }


@dataclass(frozen=True, repr=False)
class HandshakeResult:
    """What a finished handshake hands over: the channel, the SAS and TH.

    ``k_wrap`` is set on the device side only (to open W in §5.3).
    """

    channel: SecureChannel
    sas: str
    th: bytes
    challenge: Challenge
    k_wrap: bytes = b""

    def __repr__(self) -> str:
        return "HandshakeResult(<hidden>)"


class CommissionerHandshake:
    """The commissioner's side of §5.1 (phone app or hub)."""

    def __init__(self, rng: RandomSource) -> None:
        self.state = CommissionerState.START
        self._rng = rng
        self._key: EphemeralKey | None = None
        self._n_c = b""
        self._m1 = b""
        self._m2 = b""
        self._challenge: Challenge | None = None
        self._keys: SessionKeys | None = None
        self._sas = ""
        self._z = b""
        self._channel: SecureChannel | None = None

    def _advance(self, event: HandshakeInput) -> None:
        nxt = COMMISSIONER_TRANSITIONS.get((self.state, event))
        if nxt is None:
            prior = self.state
            self.state = CommissionerState.FAILED
            raise StateError(f"{event.name} not allowed in {prior.name}")
        self.state = nxt

    def _fail(self) -> None:
        self.state = CommissionerState.FAILED
        if self._key is not None:
            self._key.erase()

    def hello(self) -> bytes:
        """M1. Draws eSK_C then N_C (the order the vectors use)."""
        self._advance(HandshakeInput.START)
        self._key = EphemeralKey.generate(self._rng)
        self._n_c = self._rng(16)
        self._m1 = Hello(commitment(self._key.public, self._n_c)).encode()
        return self._m1

    def receive_challenge(self, m2: bytes, decoded: OuterMessage | None = None) -> BindStartRequest:
        """Take M2; return the bind/start request for the cloud."""
        self._advance(HandshakeInput.CHALLENGE)
        try:
            msg = decode_message(m2) if decoded is None else decoded
            if not isinstance(msg, Challenge):
                raise StateError(f"expected CHALLENGE, got {type(msg).__name__}")
        except DS1Error:
            self._fail()
            raise
        assert self._key is not None
        self._m2 = m2
        self._challenge = msg
        return BindStartRequest(self._m1, m2, self._key.public, self._n_c, msg)

    def receive_cloud_answer(self, ticket: bytes, seal: bytes, session_secret: bytes) -> bytes:
        """Take the cloud's ticket, seal and R; return M3."""
        self._advance(HandshakeInput.CLOUD_ANSWER)
        assert self._key is not None and self._challenge is not None
        try:
            if not 1 <= len(ticket) <= 128 or len(seal) != 76 or len(session_secret) != 32:
                raise MessageError("cloud answer has wrong sizes", code="bad_cloud_answer")
            th = transcript_hash(self._m1, self._m2, self._key.public, self._n_c, ticket)
            z = self._key.exchange(self._challenge.epk_d)
        except DS1Error:
            self._fail()
            raise
        self._keys = key_schedule(th, z, session_secret)
        self._channel = SecureChannel.for_commissioner(self._keys)
        self._z = z
        return Auth(self._key.public, self._n_c, ticket, seal, self._keys.fin_c).encode()

    @property
    def early_channel(self) -> SecureChannel:
        """The channel M3's keys give, before M4 arrives.

        Only for pipelining an empty SCAN behind M3 (one round trip saved);
        the device answers it only after it accepted M3, and nothing secret
        is sent before ``Fin_D`` verifies.
        """
        if self._channel is None or self.state is not CommissionerState.AWAIT_AUTH_OK:
            raise StateError("no channel before the cloud's answer")
        return self._channel

    def receive_auth_ok(self, m4: bytes, decoded: OuterMessage | None = None) -> HandshakeResult:
        """Take M4, verify Fin_D; hand over the channel and the SAS."""
        self._advance(HandshakeInput.AUTH_OK)
        assert self._keys is not None and self._key is not None and self._challenge is not None
        try:
            msg = decode_message(m4) if decoded is None else decoded
            if not isinstance(msg, AuthOk):
                raise StateError(f"expected AUTH_OK, got {type(msg).__name__}")
            if not equal(msg.fin_d, self._keys.fin_d):
                raise AuthenticationError("device Finished does not verify", code="bad_fin_d")
        except DS1Error:
            self._fail()
            raise
        sas = sas_code(self._m1, self._m2, self._key.public, self._n_c, self._z)
        self._key.erase()
        self._z = b""
        assert self._channel is not None
        return HandshakeResult(self._channel, sas, self._keys.th, self._challenge)


class DeviceHandshake:
    """The device's side of §5.1, steps 2 and 6."""

    def __init__(
        self, factory: FactoryRecord, *, reset_ctr: int, fw: str, rng: RandomSource
    ) -> None:
        self.state = DeviceState.AWAIT_HELLO
        self._factory = factory
        self._reset_ctr = reset_ctr
        self._fw = fw
        self._rng = rng
        self._key: EphemeralKey | None = None
        self._m1 = b""
        self._m2 = b""
        self._n_d = b""
        self._hello: Hello | None = None
        self._challenge: Challenge | None = None

    def _advance(self, event: HandshakeInput) -> None:
        nxt = DEVICE_TRANSITIONS.get((self.state, event))
        if nxt is None:
            prior = self.state
            self.fail()
            raise StateError(f"{event.name} not allowed in {prior.name}")
        self.state = nxt

    def fail(self) -> None:
        """Erase ephemeral keys (§5.6: every error erases them)."""
        self.state = DeviceState.FAILED
        if self._key is not None:
            self._key.erase()

    def receive_hello(self, m1: bytes, decoded: OuterMessage | None = None) -> bytes:
        """Take M1 (admitted by the caller); return M2."""
        hello = decode_message(m1) if decoded is None else decoded
        if not isinstance(hello, Hello):
            raise StateError(f"expected HELLO, got {type(hello).__name__}")
        self._advance(HandshakeInput.HELLO)
        self._hello = hello
        self._m1 = m1
        self._n_d = self._rng(16)
        self._key = EphemeralKey.generate(self._rng)
        k_hello, _, _ = self._factory.subkeys
        challenge = Challenge(
            dev_id=self._factory.dev_id,
            mac=self._factory.mac,
            n_d=self._n_d,
            epk_d=self._key.public,
            reset_ctr=self._reset_ctr,
            model=self._factory.model,
            fw=self._fw,
        )
        untagged = challenge.encode_untagged()
        tag = challenge_tag(k_hello, m1, untagged)
        self._challenge = Challenge(**{**challenge.__dict__, "tag": tag})
        self._m2 = untagged + tag
        return self._m2

    def receive_auth(
        self, m3: bytes, decoded: OuterMessage | None = None
    ) -> tuple[bytes, HandshakeResult]:
        """Take M3; return M4 and the finished handshake. Any failure is ERROR 12."""
        self._advance(HandshakeInput.AUTH)
        assert self._key is not None and self._hello is not None and self._challenge is not None
        try:
            try:
                msg = decode_message(m3) if decoded is None else decoded
            except MessageError as exc:
                raise AuthenticationError(f"bad M3: {exc.message}", code="bad_m3") from None
            if not isinstance(msg, Auth):
                raise AuthenticationError("expected AUTH", code="unexpected_message")
            if not equal(self._hello.commitment, commitment(msg.epk_c, msg.n_c)):
                raise AuthenticationError("commitment does not match", code="bad_commitment")
            _, k_seal, k_wrap = self._factory.subkeys
            th = transcript_hash(self._m1, self._m2, msg.epk_c, msg.n_c, msg.ticket)
            n_d, r = open_seal(k_seal, th, msg.seal)
            if not equal(n_d, self._n_d):
                raise AuthenticationError("seal is for another challenge", code="stale_seal")
            z = self._key.exchange(msg.epk_c)
            keys = key_schedule(th, z, r)
            if not equal(msg.fin_c, keys.fin_c):
                raise AuthenticationError("commissioner Finished does not verify", code="bad_fin_c")
        except DS1Error:
            self.fail()
            raise
        sas = sas_code(self._m1, self._m2, msg.epk_c, msg.n_c, z)
        self._key.erase()
        m4 = AuthOk(keys.fin_d).encode()
        result = HandshakeResult(SecureChannel.for_device(keys), sas, th, self._challenge, k_wrap)
        return m4, result
