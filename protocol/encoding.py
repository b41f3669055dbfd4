"""Byte encodings of DS1: strict CBOR (§4) and base64url (§6).

Encoding uses cbor2's canonical mode, which for DS1's maps (unsigned integer
keys only) is RFC 8949 §4.2.1 core deterministic encoding. Decoding is our own
small strict decoder, because §4 requires rejecting what general-purpose
decoders accept: indefinite lengths, duplicate or non-uint map keys, invalid
UTF-8, tags, simple values and trailing bytes. Non-shortest forms are accepted.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import cbor2

from protocol.errors import MessageError

CborValue = int | bytes | str | list["CborValue"] | dict[int, "CborValue"]

_MAX_DEPTH = 8


_CONTAINERS = (dict, list)
_INT_LIMIT = 1 << 64  # CBOR's major types 0 and 1 hold magnitudes below 2**64


def _sorted(value: Any) -> Any:
    """``value`` with every map's keys in ascending order (containers copied only if needed)."""
    if isinstance(value, dict):
        return {
            k: (_sorted(value[k]) if isinstance(value[k], _CONTAINERS) else value[k])
            for k in sorted(value)
        }
    if isinstance(value, list):
        return [_sorted(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value


def cbor_encode(value: Any) -> bytes:
    """Core deterministic CBOR encoding of ints, bytes, str, lists and uint-keyed maps.

    cbor2 always writes shortest forms; for unsigned integer keys, numeric
    order is the bytewise order of their encodings that RFC 8949 §4.2.1
    asks for, so sorting the keys here gives deterministic output without
    cbor2's (three times slower) canonical mode. Tests compare both.
    """
    return cbor2.dumps(_sorted(value))


def _plain(value: object, depth: int = 0) -> bool:
    """True if ``value`` only holds DS1's CBOR types (no tags, floats, simple values).

    Integers beyond 64 bits are excluded: cbor2 reads tag 2/3 bignums as ``int``.
    """
    if isinstance(value, (bytes, str)):
        return True
    if type(value) is int:
        return -_INT_LIMIT <= value < _INT_LIMIT
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(
            type(k) is int and 0 <= k < _INT_LIMIT and _plain(v, depth + 1)
            for k, v in value.items()
        )
    return False


def cbor_decode(data: bytes) -> CborValue:
    """Decode exactly one CBOR item spanning all of ``data`` under the §4 rules.

    Fast path: when cbor2's C decoder reads the bytes and re-encoding the result
    (keys in the order read) gives the same bytes back, the input had no
    indefinite lengths, duplicate keys or trailing bytes; a type walk then
    excludes tags, floats, simple values and bignums. Anything else (including
    valid non-shortest forms) takes the strict decoder below, which also names
    the exact error. Neither path requires sorted keys (§4 asks senders for
    deterministic encoding; receivers check what they must).
    """
    try:
        value = cbor2.loads(data)
        if _plain(value) and cbor2.dumps(value) == data:
            return value  # type: ignore[no-any-return]
    except Exception:  # noqa: S110 - any decoder complaint: let the strict path explain it
        pass
    return _strict_decode(data)


def _strict_decode(data: bytes) -> CborValue:
    value, end = _decode_item(memoryview(data), 0, 0)
    if end != len(data):
        raise MessageError("trailing bytes after CBOR item", code="cbor_trailing_bytes")
    return value


def cbor_decode_map(data: bytes) -> dict[int, CborValue]:
    value = cbor_decode(data)
    if not isinstance(value, dict):
        raise MessageError("message body is not a CBOR map", code="cbor_wrong_type")
    return value


def _read_argument(buf: memoryview, pos: int, info: int) -> tuple[int, int]:
    if info < 24:
        return info, pos
    if info > 27:
        # 28–30 reserved, 31 indefinite length / break
        raise MessageError("indefinite or reserved CBOR length", code="cbor_indefinite")
    size = 1 << (info - 24)
    if pos + size > len(buf):
        raise MessageError("truncated CBOR item", code="cbor_truncated")
    return int.from_bytes(buf[pos : pos + size], "big"), pos + size


def _decode_item(buf: memoryview, pos: int, depth: int) -> tuple[CborValue, int]:
    if depth > _MAX_DEPTH:
        raise MessageError("CBOR nesting too deep", code="cbor_too_deep")
    if pos >= len(buf):
        raise MessageError("truncated CBOR item", code="cbor_truncated")
    initial = buf[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if major == 7:
        raise MessageError("CBOR simple values and floats are not allowed", code="cbor_wrong_type")
    arg, pos = _read_argument(buf, pos, info)
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        end = pos + arg
        if end > len(buf):
            raise MessageError("truncated CBOR string", code="cbor_truncated")
        raw = bytes(buf[pos:end])
        if major == 2:
            return raw, end
        try:
            return raw.decode("utf-8"), end
        except UnicodeDecodeError:
            raise MessageError("invalid UTF-8 in text string", code="cbor_invalid_utf8") from None
    if major == 4:
        if arg > len(buf) - pos:  # each element takes at least one byte
            raise MessageError("truncated CBOR array", code="cbor_truncated")
        items: list[CborValue] = []
        for _ in range(arg):
            item, pos = _decode_item(buf, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        if 2 * arg > len(buf) - pos:
            raise MessageError("truncated CBOR map", code="cbor_truncated")
        result: dict[int, CborValue] = {}
        for _ in range(arg):
            if pos >= len(buf) or buf[pos] >> 5 != 0:
                raise MessageError("CBOR map key is not an unsigned integer", code="cbor_bad_key")
            key, pos = _decode_item(buf, pos, depth + 1)
            assert isinstance(key, int)
            if key in result:
                raise MessageError("duplicate CBOR map key", code="cbor_duplicate_key")
            result[key], pos = _decode_item(buf, pos, depth + 1)
        return result, pos
    raise MessageError("CBOR tags are not allowed", code="cbor_wrong_type")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    """base64url without padding (§6)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding: rejects padding, other alphabets and bad lengths."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise MessageError("not base64url without padding", code="bad_base64")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MessageError("not base64url without padding", code="bad_base64") from None
    if b64url_encode(raw) != text:  # non-canonical trailing bits
        raise MessageError("non-canonical base64url", code="bad_base64")
    return raw


_HEX = re.compile(r"[0-9a-f]*")


def hex_decode(text: str, size: int) -> bytes:
    """Lowercase hex of exactly ``size`` bytes (dev_id, identifier in §6)."""
    if not isinstance(text, str) or len(text) != 2 * size or not _HEX.fullmatch(text):
        raise MessageError(f"expected {2 * size} lowercase hex digits", code="bad_hex")
    return bytes.fromhex(text)


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def lp(data: bytes) -> bytes:
    """``u16(len(x)) ‖ x``."""
    return len(data).to_bytes(2, "big") + data
