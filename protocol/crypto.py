"""DS1 cryptographic primitives and labels (PROTOCOL.md notation, §1, §5).

SHA-256/HMAC come from the standard library (hashlib/hmac, the fastest path in
CPython); X25519 and ChaCha20-Poly1305 from ``cryptography``. HKDF is RFC 5869
with an empty salt, written out as Extract/Expand because the key schedule of
§5.2 uses the two halves separately.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol.errors import AuthenticationError

# Random byte source: takes a size, returns that many bytes. Injected everywhere.
RandomSource = Callable[[int], bytes]

LABEL_KEY_HELLO = b"DS1 key hello"
LABEL_KEY_SEAL = b"DS1 key seal"
LABEL_KEY_WRAP = b"DS1 key wrap"
LABEL_COMMIT = b"DS1 commit"
LABEL_TAG_HELLO = b"DS1 tag hello"
LABEL_TH = b"DS1 th"
LABEL_FIN_C = b"DS1 fin C"
LABEL_FIN_D = b"DS1 fin D"
LABEL_KEY_C2D = b"DS1 key C2D"
LABEL_KEY_D2C = b"DS1 key D2C"
LABEL_IV_C2D = b"DS1 iv C2D"
LABEL_IV_D2C = b"DS1 iv D2C"
LABEL_SAS = b"DS1 sas"
LABEL_BIND_ACK = b"DS1 bind-ack"
LABEL_REQ = b"DS1 req"

AEAD_TAG_SIZE = 16
NONCE_SIZE = 12


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return _hmac.digest(key, data, "sha256")


def extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 §2.2); an empty salt means HashLen zero bytes."""
    return hmac_sha256(salt if salt else bytes(32), ikm)


def expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869 §2.3)."""
    if length <= 32:  # one block: the common case in DS1
        return hmac_sha256(prk, info + b"\x01")[:length]
    if length > 255 * 32:
        raise ValueError("HKDF output too long")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac_sha256(prk, block + info + bytes([counter]))
        out += block
        counter += 1
    return out[:length]


def hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    """``HKDF(ikm, info, L)`` with empty salt."""
    return expand(extract(b"", ikm), info, length)


def equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison for secrets and MACs."""
    return _hmac.compare_digest(a, b)


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, *, what: str) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise AuthenticationError(f"{what} did not authenticate", code=f"bad_{what}") from None


class EphemeralKey:
    """An X25519 key pair for one session (eSK/ePK of §5.1)."""

    __slots__ = ("_private", "public")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("X25519 secret must be 32 bytes")
        # cryptography clamps the 32 drawn bytes per RFC 7748.
        self._private: X25519PrivateKey | None = X25519PrivateKey.from_private_bytes(secret)
        self.public: bytes = self._private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, rng: RandomSource) -> EphemeralKey:
        return cls(rng(32))

    def exchange(self, peer_public: bytes) -> bytes:
        """``X25519(eSK, peer)``; low-order peer keys (all-zero secret) abort."""
        if self._private is None:
            raise AuthenticationError("ephemeral key already erased", code="key_erased")
        if len(peer_public) != 32:
            raise AuthenticationError("bad X25519 public key size", code="bad_public_key")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            # OpenSSL refuses an all-zero shared secret (low-order point).
            raise AuthenticationError("low-order X25519 public key", code="low_order_key") from None
        if not any(shared):
            raise AuthenticationError("low-order X25519 public key", code="low_order_key")
        return shared

    def erase(self) -> None:
        self._private = None


def initial_subkeys(k_init: bytes) -> tuple[bytes, bytes, bytes]:
    """(K_hello, K_seal, K_wrap) of §1.

    Each is ``HKDF(K_init, label, 32)`` with an empty salt, so the three share
    one HKDF-Extract, computed once here.
    """
    prk = extract(b"", k_init)
    return (
        expand(prk, LABEL_KEY_HELLO, 32),
        expand(prk, LABEL_KEY_SEAL, 32),
        expand(prk, LABEL_KEY_WRAP, 32),
    )
