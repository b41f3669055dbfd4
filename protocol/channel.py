"""The DS1 secure channel (PROTOCOL.md §5.4): RECORDs after M4.

``RECORD = u8 1 ‖ u8 0x10 ‖ u32 seq ‖ AEAD(k_dir, iv_dir XOR (0⁴ ‖ u64(seq)), inner, aad = header)``.
Keys are per direction and nonces are counters; a record whose ``seq`` is not
the expected one (replayed, skipped or reordered) or that does not
authenticate is rejected and the channel refuses anything after it.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocol.errors import AuthenticationError, StateError
from protocol.messages import Record, decode_message
from protocol.schedule import SessionKeys

SEQ_LIMIT = 2**32


def _nonce(iv: bytes, seq: int) -> bytes:
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")


class SecureChannel:
    """Seals outgoing and opens incoming inner messages for one side of a session."""

    __slots__ = (
        "_failed",
        "_recv_aead",
        "_recv_iv",
        "_recv_seq",
        "_send_aead",
        "_send_iv",
        "_send_seq",
    )

    def __init__(self, send_key: bytes, send_iv: bytes, recv_key: bytes, recv_iv: bytes) -> None:
        self._send_aead = ChaCha20Poly1305(send_key)
        self._recv_aead = ChaCha20Poly1305(recv_key)
        self._send_iv = send_iv
        self._recv_iv = recv_iv
        self._send_seq = 0
        self._recv_seq = 0
        self._failed = False

    @classmethod
    def for_commissioner(cls, keys: SessionKeys) -> SecureChannel:
        return cls(keys.k_c2d, keys.iv_c2d, keys.k_d2c, keys.iv_d2c)

    @classmethod
    def for_device(cls, keys: SessionKeys) -> SecureChannel:
        return cls(keys.k_d2c, keys.iv_d2c, keys.k_c2d, keys.iv_c2d)

    @property
    def sent(self) -> int:
        return self._send_seq

    @property
    def received(self) -> int:
        return self._recv_seq

    def seal(self, inner: bytes) -> bytes:
        """The whole RECORD message carrying ``inner``."""
        if self._send_seq >= SEQ_LIMIT:
            raise StateError("record sequence exhausted", code="seq_exhausted")
        header = Record(self._send_seq, b"").header()
        ct = self._send_aead.encrypt(_nonce(self._send_iv, self._send_seq), inner, header)
        self._send_seq += 1
        return header + ct

    def open(self, record: Record) -> bytes:
        """The inner message of ``record``; any failure poisons the channel."""
        if self._failed:
            raise AuthenticationError("channel already failed", code="channel_failed")
        if record.seq != self._recv_seq:
            self._failed = True
            raise AuthenticationError(
                f"record seq {record.seq}, expected {self._recv_seq}", code="bad_record_seq"
            )
        try:
            inner = self._recv_aead.decrypt(
                _nonce(self._recv_iv, record.seq), record.ciphertext, record.header()
            )
        except InvalidTag:
            self._failed = True
            raise AuthenticationError("record did not authenticate", code="bad_record") from None
        self._recv_seq += 1
        return inner

    def open_message(self, data: bytes) -> bytes:
        """Decode a whole RECORD message and open it."""
        msg = decode_message(data)
        if not isinstance(msg, Record):
            raise StateError("expected a RECORD", code="unexpected_message")
        return self.open(msg)
