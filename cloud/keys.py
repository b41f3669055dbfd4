"""Secrets at rest (PROTOCOL.md §7): the key-encryption key and wrapped values.

``K_init``, ``K_dev`` and stored bind/start answers (they contain ``R``) are kept
in the database only as ``nonce(12) ‖ ChaCha20-Poly1305(KEK, nonce, secret,
aad = purpose ‖ owner id)``. The KEK comes from a file (``DOORSTEP_KEK_FILE`` or
``--kek-file``) or the ``DOORSTEP_KEK`` variable (base64url of 32 bytes) and is
never written to the database. :class:`SecretBytes` keeps secrets out of
``repr``/logs.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cloud.errors import ConfigurationError
from protocol.encoding import b64url_decode, b64url_encode
from protocol.errors import MessageError

KEK_SIZE: Final = 32
_NONCE: Final = 12
_AAD_LABEL: Final = b"doorstep kek v1 "

ENV_KEK: Final = "DOORSTEP_KEK"
ENV_KEK_FILE: Final = "DOORSTEP_KEK_FILE"

# Purposes bound into the AAD so a wrapped value cannot be moved between roles.
PURPOSE_K_INIT: Final = b"k_init"
PURPOSE_K_DEV: Final = b"k_dev"
PURPOSE_ANSWER: Final = b"answer"


class SecretBytes:
    """Bytes that never show in ``repr``/``str``; compare with :meth:`equals`."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def equals(self, other: bytes) -> bool:
        return hmac.compare_digest(self._value, other)

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self._value)} bytes hidden>)"

    __str__ = __repr__


class UnwrapError(Exception):
    """A wrapped secret did not open: wrong KEK or tampered database row."""


class KeyEncryptionKey:
    """Wraps and unwraps secrets stored in the database."""

    def __init__(self, key: bytes, rng: Callable[[int], bytes] = os.urandom) -> None:
        if len(key) != KEK_SIZE:
            raise ConfigurationError("the KEK must be 32 bytes", code="kek_invalid")
        self._aead = ChaCha20Poly1305(key)
        self._rng = rng

    def __repr__(self) -> str:
        return "KeyEncryptionKey(<hidden>)"

    def wrap(self, purpose: bytes, owner: bytes, secret: bytes) -> bytes:
        return self.wrap_many(purpose, [(owner, secret)])[0]

    def wrap_many(self, purpose: bytes, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """:meth:`wrap` of each ``(owner, secret)``, with every nonce from one draw."""
        nonces = self._rng(_NONCE * len(items))
        if len(nonces) != _NONCE * len(items):
            raise ValueError("the nonce source returned too few bytes")
        encrypt, prefix = self._aead.encrypt, _AAD_LABEL + purpose + b" "
        out = []
        for at, (owner, secret) in enumerate(items):
            nonce = nonces[at * _NONCE : (at + 1) * _NONCE]
            out.append(nonce + encrypt(nonce, secret, prefix + owner))
        return out

    def unwrap(self, purpose: bytes, owner: bytes, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _AAD_LABEL + purpose + b" " + owner
            )
        except (InvalidTag, ValueError):
            raise UnwrapError(f"wrapped {purpose.decode()} does not open") from None


def parse_kek_text(text: str, origin: str) -> bytes:
    try:
        key = b64url_decode(text.strip().removesuffix("="))  # "=" padding is tolerated
    except MessageError:
        raise ConfigurationError(
            f"{origin}: the KEK must be base64url of 32 bytes", code="kek_invalid"
        ) from None
    if len(key) != KEK_SIZE:
        raise ConfigurationError(f"{origin}: the KEK must be 32 bytes", code="kek_invalid")
    return key


def load_kek(kek_file: str | None = None, env: Mapping[str, str] | None = None) -> bytes:
    """The KEK bytes from ``kek_file``, ``$DOORSTEP_KEK_FILE`` or ``$DOORSTEP_KEK``.

    Raises :class:`ConfigurationError` with code ``kek_missing`` when none is set.
    """
    env = os.environ if env is None else env
    path = kek_file or env.get(ENV_KEK_FILE)
    if path:
        try:
            text = Path(path).read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"{path}: the KEK must be base64url of 32 bytes", code="kek_invalid"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the KEK file {path}: {exc}", code="kek_missing"
            ) from None
        return parse_kek_text(text, path)
    value = env.get(ENV_KEK)
    if value:
        return parse_kek_text(value, ENV_KEK)
    raise ConfigurationError(
        "no key-encryption key: set DOORSTEP_KEK_FILE (or --kek-file) to a file made with "
        "`doorstep cloud kek new --out FILE`, or DOORSTEP_KEK to base64url of 32 random bytes",
        code="kek_missing",
    )


def write_new_kek(path: Path, rng: Callable[[int], bytes] = os.urandom) -> None:
    """Create ``path`` (mode 0600, must not exist) holding a fresh KEK as base64url."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(b64url_encode(rng(KEK_SIZE)) + "\n")
