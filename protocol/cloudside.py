"""The cloud's side of the DS1 handshake (PROTOCOL.md §5.1 step 3–4, §5.3, §6.1–§6.2).

Pure functions the cloud service calls while answering ``/v1/bind/start`` and
``/v1/bind/complete``: check the commitment, verify the device's tag, build
the seal and the wrapped identity, and verify the device's Ack. The service
supplies all randomness (R, nonces, identifier, K_dev) from its entropy source.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.crypto import (
    LABEL_KEY_HELLO,
    LABEL_KEY_SEAL,
    LABEL_KEY_WRAP,
    NONCE_SIZE,
    aead_open,
    aead_seal,
    equal,
    hkdf,
    initial_subkeys,
)
from protocol.encoding import u32
from protocol.errors import AuthenticationError, IdentityError, MessageError
from protocol.messages import Challenge, Hello, decode_message
from protocol.schedule import bind_ack, challenge_tag, commitment, transcript_hash

__all__ = [
    "Identity",
    "InitialKeys",
    "bind_ack",
    "build_seal",
    "build_wrapped_identity",
    "check_commitment",
    "open_seal",
    "open_wrapped_identity",
    "parse_challenge",
    "transcript_hash",
    "verify_ack",
    "verify_challenge_tag",
]


@dataclass(frozen=True, repr=False)
class InitialKeys:
    """``K_hello``, ``K_seal`` and ``K_wrap`` of one ``K_init`` (§3).

    Derived together (:func:`~protocol.crypto.initial_subkeys`: one HKDF-Extract
    for the three), for a caller that needs more than one of them. The functions
    below take either this or ``K_init`` itself. ``repr`` hides the keys.
    """

    hello: bytes
    seal: bytes
    wrap: bytes

    @classmethod
    def derive(cls, k_init: bytes) -> InitialKeys:
        return cls(*initial_subkeys(k_init))

    def __repr__(self) -> str:
        return "InitialKeys(…)"


def _subkey(k_init: bytes | InitialKeys, label: bytes) -> bytes:
    """The sub-key ``label`` of ``K_init``: looked up if derived already, else derived alone."""
    if isinstance(k_init, InitialKeys):
        return {
            LABEL_KEY_HELLO: k_init.hello,
            LABEL_KEY_SEAL: k_init.seal,
            LABEL_KEY_WRAP: k_init.wrap,
        }[label]
    return hkdf(k_init, label, 32)


def check_commitment(m1: bytes, commissioner_pub: bytes, commissioner_nonce: bytes) -> Hello:
    """Decode M1 and check ``Cmt = H("DS1 commit" ‖ ePK_C ‖ N_C)``."""
    hello = decode_message(m1)
    if not isinstance(hello, Hello):
        raise MessageError("m1 is not a HELLO", code="wrong_message")
    if len(commissioner_pub) != 32 or len(commissioner_nonce) != 16:
        raise MessageError("commissioner key or nonce has a wrong size", code="wrong_size")
    if not equal(hello.commitment, commitment(commissioner_pub, commissioner_nonce)):
        raise AuthenticationError("commitment does not match", code="bad_commitment")
    return hello


def parse_challenge(m2: bytes) -> Challenge:
    """Decode M2 (tag included)."""
    challenge = decode_message(m2)
    if not isinstance(challenge, Challenge):
        raise MessageError("m2 is not a CHALLENGE", code="wrong_message")
    return challenge


def verify_challenge_tag(k_init: bytes | InitialKeys, m1: bytes, m2: bytes) -> None:
    """Check ``tag_D`` on M2 under the device's ``K_hello``."""
    k_hello = _subkey(k_init, LABEL_KEY_HELLO)
    expected = challenge_tag(k_hello, m1, m2[:-16])
    if not equal(expected, m2[-16:]):
        raise AuthenticationError("device tag does not verify", code="bad_tag")


def build_seal(
    k_init: bytes | InitialKeys, th: bytes, n_d: bytes, session_secret: bytes, nonce: bytes
) -> bytes:
    """``seal = n ‖ AEAD(K_seal, n, N_D ‖ R, aad = TH)`` (76 bytes)."""
    k_seal = _subkey(k_init, LABEL_KEY_SEAL)
    return nonce + aead_seal(k_seal, nonce, n_d + session_secret, th)


def open_seal(k_seal: bytes, th: bytes, seal: bytes) -> tuple[bytes, bytes]:
    """The device's side: (N_D, R) from ``seal``."""
    plain = aead_open(k_seal, seal[:NONCE_SIZE], seal[NONCE_SIZE:], th, what="seal")
    return plain[:16], plain[16:]


@dataclass(frozen=True, repr=False)
class Identity:
    """What W carries: the new identifier, K_dev and epoch. ``repr`` hides K_dev."""

    identifier: bytes
    k_dev: bytes
    epoch: int

    def __repr__(self) -> str:
        return f"Identity(identifier={self.identifier.hex()[:8]}…, epoch={self.epoch})"


def build_wrapped_identity(
    k_init: bytes | InitialKeys, th: bytes, identity: Identity, nonce: bytes
) -> bytes:
    """``W = n ‖ AEAD(K_wrap, n, identifier ‖ K_dev ‖ u32(epoch), aad = TH)`` (80 bytes)."""
    k_wrap = _subkey(k_init, LABEL_KEY_WRAP)
    plain = identity.identifier + identity.k_dev + u32(identity.epoch)
    return nonce + aead_seal(k_wrap, nonce, plain, th)


def open_wrapped_identity(k_wrap: bytes, th: bytes, w: bytes, active_epoch: int) -> Identity:
    """The device's side of §5.3 step 2: open W and check its epoch is above the active one."""
    try:
        plain = aead_open(k_wrap, w[:NONCE_SIZE], w[NONCE_SIZE:], th, what="wrapped_identity")
    except AuthenticationError:
        raise IdentityError("W did not open", code="bad_wrapped_identity") from None
    if len(plain) != 52:
        raise IdentityError("W has a wrong size", code="bad_wrapped_identity")
    identity = Identity(plain[:16], plain[16:48], int.from_bytes(plain[48:], "big"))
    if identity.epoch <= active_epoch:
        raise IdentityError("epoch not above the active epoch", code="epoch_rollback")
    return identity


def verify_ack(k_dev: bytes, dev_id: bytes, identity: Identity, th: bytes, ack: bytes) -> None:
    """Check the device's ``Ack`` (§5.3 step 5) for bind/complete or check-in."""
    if not equal(bind_ack(k_dev, dev_id, identity.identifier, identity.epoch, th), ack):
        raise AuthenticationError("ack does not verify", code="bad_ack")
