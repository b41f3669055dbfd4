"""DS1 transcript values and key schedule (PROTOCOL.md §5.1–§5.3), as pure functions.

Both roles and the cloud compute these; nothing here keeps state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.crypto import (
    LABEL_BIND_ACK,
    LABEL_COMMIT,
    LABEL_FIN_C,
    LABEL_FIN_D,
    LABEL_IV_C2D,
    LABEL_IV_D2C,
    LABEL_KEY_C2D,
    LABEL_KEY_D2C,
    LABEL_SAS,
    LABEL_TAG_HELLO,
    LABEL_TH,
    expand,
    extract,
    hmac_sha256,
    sha256,
)
from protocol.encoding import lp, u32

TAG_SIZE = 16


def commitment(epk_c: bytes, n_c: bytes) -> bytes:
    """``Cmt = H("DS1 commit" ‖ ePK_C ‖ N_C)``."""
    return sha256(LABEL_COMMIT + epk_c + n_c)


def challenge_tag(k_hello: bytes, m1: bytes, m2_untagged: bytes) -> bytes:
    """``tag_D = HMAC(K_hello, "DS1 tag hello" ‖ lp(M1) ‖ lp(M2_untagged))[:16]``."""
    return hmac_sha256(k_hello, LABEL_TAG_HELLO + lp(m1) + lp(m2_untagged))[:TAG_SIZE]


def transcript_hash(m1: bytes, m2: bytes, epk_c: bytes, n_c: bytes, ticket: bytes) -> bytes:
    """``TH = H("DS1 th" ‖ lp(M1) ‖ lp(M2) ‖ ePK_C ‖ N_C ‖ lp(ticket))``."""
    return sha256(LABEL_TH + lp(m1) + lp(m2) + epk_c + n_c + lp(ticket))


def sas_code(m1: bytes, m2: bytes, epk_c: bytes, n_c: bytes, z: bytes) -> str:
    """The 6-digit short authentication string of §5.2."""
    salt = sha256(LABEL_SAS + lp(m1) + lp(m2) + epk_c + n_c)
    okm = expand(extract(salt, z), LABEL_SAS, 8)
    return f"{int.from_bytes(okm, 'big') % 1_000_000:06d}"


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The §5.2 key schedule for one session. ``repr`` hides every key."""

    th: bytes
    fk_c: bytes
    fk_d: bytes
    k_c2d: bytes
    k_d2c: bytes
    iv_c2d: bytes
    iv_d2c: bytes
    fin_c: bytes = field(default=b"")
    fin_d: bytes = field(default=b"")

    def __repr__(self) -> str:
        return "SessionKeys(<hidden>)"


def key_schedule(th: bytes, z: bytes, r: bytes) -> SessionKeys:
    hs = extract(th, z + r)
    fk_c = expand(hs, LABEL_FIN_C, 32)
    fk_d = expand(hs, LABEL_FIN_D, 32)
    fin_c = hmac_sha256(fk_c, th)
    return SessionKeys(
        th=th,
        fk_c=fk_c,
        fk_d=fk_d,
        k_c2d=expand(hs, LABEL_KEY_C2D, 32),
        k_d2c=expand(hs, LABEL_KEY_D2C, 32),
        iv_c2d=expand(hs, LABEL_IV_C2D, 12),
        iv_d2c=expand(hs, LABEL_IV_D2C, 12),
        fin_c=fin_c,
        fin_d=hmac_sha256(fk_d, th + fin_c),
    )


def bind_ack(k_dev: bytes, dev_id: bytes, identifier: bytes, epoch: int, th: bytes) -> bytes:
    """``Ack = HMAC(K_dev, "DS1 bind-ack" ‖ dev_id ‖ identifier ‖ u32(epoch) ‖ TH)``."""
    return hmac_sha256(k_dev, LABEL_BIND_ACK + dev_id + identifier + u32(epoch) + th)
