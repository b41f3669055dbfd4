"""§6.3 request signatures for hubs and devices: sign, parse and verify.

``Authorization: DS1-HMAC id=<hex>, ts=<decimal>, nonce=<b64url 16 B>, sig=<b64url>``
with ``sig = HMAC(K_dev, "DS1 req" ‖ method ‖ "\\n" ‖ path-and-query ‖ "\\n" ‖ ts
‖ "\\n" ‖ nonce ‖ "\\n" ‖ H(body))``. The form is exact: these four parameters
in this order, separated by ", ", nothing else. Nonce uniqueness is the
cloud's job (it keeps the nonces it has seen for the skew window).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.crypto import LABEL_REQ, equal, hmac_sha256, sha256
from protocol.encoding import b64url_decode, b64url_encode
from protocol.errors import MessageError, SignatureError

SCHEME = "DS1-HMAC"
MAX_SKEW_S = 300

_HEADER = re.compile(
    r"DS1-HMAC id=([0-9a-f]{32}), ts=(0|[1-9][0-9]{0,18}), "
    r"nonce=([A-Za-z0-9_-]{22}), sig=([A-Za-z0-9_-]{43})"
)


@dataclass(frozen=True)
class SignedAuthorization:
    """A parsed DS1-HMAC Authorization header."""

    identifier: bytes
    ts: int
    nonce: bytes
    sig: bytes


def mac_input(method: str, path: str, ts: int, nonce: bytes, body: bytes) -> bytes:
    return (
        LABEL_REQ
        + method.encode("ascii")
        + b"\n"
        + path.encode("ascii")
        + b"\n"
        + str(ts).encode("ascii")
        + b"\n"
        + nonce
        + b"\n"
        + sha256(body)
    )


def sign_request(
    identifier: bytes, k_dev: bytes, method: str, path: str, body: bytes, ts: int, nonce: bytes
) -> str:
    """The Authorization header value for one request."""
    if len(nonce) != 16:
        raise ValueError("nonce must be 16 bytes")
    sig = hmac_sha256(k_dev, mac_input(method, path, ts, nonce, body))
    return (
        f"{SCHEME} id={identifier.hex()}, ts={ts}, "
        f"nonce={b64url_encode(nonce)}, sig={b64url_encode(sig)}"
    )


def parse_authorization(value: str) -> SignedAuthorization:
    match = _HEADER.fullmatch(value)
    if match is None:
        raise SignatureError("malformed DS1-HMAC authorization", code="bad_signature")
    try:
        nonce = b64url_decode(match.group(3))
        sig = b64url_decode(match.group(4))
    except MessageError:
        raise SignatureError("malformed DS1-HMAC authorization", code="bad_signature") from None
    return SignedAuthorization(bytes.fromhex(match.group(1)), int(match.group(2)), nonce, sig)


def verify_request(
    auth: SignedAuthorization,
    k_dev: bytes,
    method: str,
    path: str,
    body: bytes,
    now: float,
    max_skew: int = MAX_SKEW_S,
) -> None:
    """Check skew and signature; the caller then records ``auth.nonce`` as used."""
    if abs(now - auth.ts) > max_skew:
        raise SignatureError("request timestamp outside the allowed skew", code="clock_skew")
    expected = hmac_sha256(k_dev, mac_input(method, path, auth.ts, auth.nonce, body))
    if not equal(expected, auth.sig):
        raise SignatureError("request signature does not verify", code="bad_signature")
