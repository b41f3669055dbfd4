"""DS1 messages (PROTOCOL.md §4) as frozen dataclasses with symmetric encode/decode.

Outer messages are ``u8 version ‖ u8 type ‖ body``; inner messages, carried in
RECORDs, are ``u8 type ‖ CBOR map``. ``decode_message`` and ``decode_inner``
look the type up in a registry keyed by type byte (as bumble's ``att.py`` does
with opcodes). Unknown map keys are ignored in M1, M2, ERROR and inner
messages and rejected in M3 and M4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from protocol.encoding import CborValue, cbor_decode_map, cbor_encode
from protocol.errors import MessageError

VERSION = 1
MAX_MESSAGE = 2048
TAG_SIZE = 16
U32_MAX = 2**32 - 1

T = TypeVar("T")


# ---- field readers: each raises MessageError with a precise code -------------


def _field(body: Mapping[int, CborValue], key: int, what: str) -> CborValue:
    if key not in body:
        raise MessageError(f"missing field {key} ({what})", code="missing_field")
    return body[key]


def _bstr(body: Mapping[int, CborValue], key: int, what: str, lo: int, hi: int) -> bytes:
    value = _field(body, key, what)
    if not isinstance(value, bytes):
        raise MessageError(f"{what} must be a byte string", code="wrong_type")
    if not lo <= len(value) <= hi:
        raise MessageError(f"{what} has a wrong size ({len(value)} bytes)", code="wrong_size")
    return value


def _tstr(body: Mapping[int, CborValue], key: int, what: str, max_bytes: int) -> str:
    value = _field(body, key, what)
    if not isinstance(value, str):
        raise MessageError(f"{what} must be a text string", code="wrong_type")
    if len(value.encode("utf-8")) > max_bytes:
        raise MessageError(f"{what} longer than {max_bytes} bytes", code="wrong_size")
    return value


def _uint(body: Mapping[int, CborValue], key: int, what: str, hi: int = 2**64 - 1) -> int:
    value = _field(body, key, what)
    if not isinstance(value, int) or value < 0:
        raise MessageError(f"{what} must be an unsigned integer", code="wrong_type")
    if value > hi:
        raise MessageError(f"{what} out of range", code="wrong_size")
    return value


def _no_unknown_keys(body: Mapping[int, CborValue], known: set[int], name: str) -> None:
    extra = set(body) - known
    if extra:
        raise MessageError(f"unknown keys in {name}: {sorted(extra)}", code="unknown_field")


def clip_text(text: str, max_bytes: int) -> str:
    """Shorten ``text`` to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


# ---- outer messages ---------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """HELLO (M1), C→D: the commissioner's commitment ``Cmt`` (§5.1 step 1)."""

    TYPE: ClassVar[int] = 0x01
    commitment: bytes

    def encode(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + cbor_encode({1: self.commitment})

    @classmethod
    def decode_body(cls, body: bytes) -> Hello:
        m = cbor_decode_map(body)
        return cls(_bstr(m, 1, "Cmt", 32, 32))


@dataclass(frozen=True)
class Challenge:
    """CHALLENGE (M2), D→C: device identity, nonce, ephemeral key, then ``tag_D`` (§5.1 step 2)."""

    TYPE: ClassVar[int] = 0x02
    dev_id: bytes
    mac: bytes
    n_d: bytes
    epk_d: bytes
    reset_ctr: int
    model: str
    fw: str
    tag: bytes = b""

    def encode_untagged(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + cbor_encode(
            {
                1: self.dev_id,
                2: self.mac,
                3: self.n_d,
                4: self.epk_d,
                5: self.reset_ctr,
                6: self.model,
                7: self.fw,
            }
        )

    def encode(self) -> bytes:
        if len(self.tag) != TAG_SIZE:
            raise ValueError("M2 needs its 16-byte tag before encoding")
        return self.encode_untagged() + self.tag

    @classmethod
    def decode_body(cls, body: bytes) -> Challenge:
        if len(body) <= TAG_SIZE:
            raise MessageError("M2 too short for its tag", code="wrong_size")
        m = cbor_decode_map(body[:-TAG_SIZE])
        return cls(
            dev_id=_bstr(m, 1, "dev_id", 16, 16),
            mac=_bstr(m, 2, "mac", 6, 6),
            n_d=_bstr(m, 3, "N_D", 16, 16),
            epk_d=_bstr(m, 4, "ePK_D", 32, 32),
            reset_ctr=_uint(m, 5, "reset_ctr", U32_MAX),
            model=_tstr(m, 6, "model", 32),
            fw=_tstr(m, 7, "fw", 16),
            tag=body[-TAG_SIZE:],
        )


@dataclass(frozen=True)
class Auth:
    """AUTH (M3), C→D: commissioner key and nonce, the cloud's ticket and seal, ``Fin_C``."""

    TYPE: ClassVar[int] = 0x03
    epk_c: bytes
    n_c: bytes
    ticket: bytes
    seal: bytes
    fin_c: bytes

    def encode(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + cbor_encode(
            {1: self.epk_c, 2: self.n_c, 3: self.ticket, 4: self.seal, 5: self.fin_c}
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Auth:
        m = cbor_decode_map(body)
        _no_unknown_keys(m, {1, 2, 3, 4, 5}, "M3")
        return cls(
            epk_c=_bstr(m, 1, "ePK_C", 32, 32),
            n_c=_bstr(m, 2, "N_C", 16, 16),
            ticket=_bstr(m, 3, "ticket", 1, 128),
            seal=_bstr(m, 4, "seal", 76, 76),
            fin_c=_bstr(m, 5, "Fin_C", 32, 32),
        )


@dataclass(frozen=True)
class AuthOk:
    """AUTH_OK (M4), D→C: ``Fin_D``."""

    TYPE: ClassVar[int] = 0x04
    fin_d: bytes

    def encode(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + cbor_encode({1: self.fin_d})

    @classmethod
    def decode_body(cls, body: bytes) -> AuthOk:
        m = cbor_decode_map(body)
        _no_unknown_keys(m, {1}, "M4")
        return cls(_bstr(m, 1, "Fin_D", 32, 32))


@dataclass(frozen=True)
class Record:
    """RECORD, both directions: ``u32 seq ‖ ciphertext`` (§5.4); not CBOR."""

    TYPE: ClassVar[int] = 0x10
    seq: int
    ciphertext: bytes

    def header(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + self.seq.to_bytes(4, "big")

    def encode(self) -> bytes:
        return self.header() + self.ciphertext

    @classmethod
    def decode_body(cls, body: bytes) -> Record:
        # 4-byte seq, then at least one inner byte plus the 16-byte AEAD tag.
        if len(body) < 4 + 1 + 16:
            raise MessageError("RECORD too short", code="wrong_size")
        return cls(int.from_bytes(body[:4], "big"), body[4:])


@dataclass(frozen=True)
class Error:
    """ERROR, D→C, plaintext and only before M4: ``{1: status, 2: reason}``."""

    TYPE: ClassVar[int] = 0x7F
    status: int
    reason: str

    def encode(self) -> bytes:
        return bytes((VERSION, self.TYPE)) + cbor_encode(
            {1: self.status, 2: clip_text(self.reason, 64)}
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Error:
        m = cbor_decode_map(body)
        return cls(_uint(m, 1, "status"), _tstr(m, 2, "reason", 64))


OuterMessage = Hello | Challenge | Auth | AuthOk | Record | Error

_OUTER: dict[int, Callable[[bytes], OuterMessage]] = {
    cls.TYPE: cls.decode_body for cls in (Hello, Challenge, Auth, AuthOk, Record, Error)
}


def decode_message(data: bytes) -> OuterMessage:
    """Decode a whole outer message (version and type included)."""
    if len(data) < 2:
        raise MessageError("message shorter than its header", code="wrong_size")
    if len(data) > MAX_MESSAGE:
        raise MessageError("message longer than 2048 bytes", code="wrong_size")
    if data[0] != VERSION:
        raise MessageError(f"unsupported version {data[0]}", code="unsupported_version")
    decoder = _OUTER.get(data[1])
    if decoder is None:
        raise MessageError(f"unknown message type 0x{data[1]:02x}", code="unknown_type")
    return decoder(data[2:])


# ---- inner messages ---------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """SCAN, C→D: ask for the device's view of Wi-Fi networks."""

    TYPE: ClassVar[int] = 0x20

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + cbor_encode({})

    @classmethod
    def decode_body(cls, body: bytes) -> Scan:
        cbor_decode_map(body)
        return cls()


@dataclass(frozen=True)
class Network:
    """One SCAN_RESULT entry."""

    ssid: bytes
    rssi: int
    security: int
    channel: int

    def to_cbor(self) -> dict[int, CborValue]:
        return {1: self.ssid, 2: self.rssi, 3: self.security, 4: self.channel}

    @classmethod
    def from_cbor(cls, value: CborValue) -> Network:
        if not isinstance(value, dict):
            raise MessageError("network entry must be a map", code="wrong_type")
        rssi = _field(value, 2, "rssi")
        if not isinstance(rssi, int) or not -128 <= rssi <= 0:
            raise MessageError("rssi must be an integer in -128..0", code="wrong_size")
        return cls(
            ssid=_bstr(value, 1, "ssid", 0, 32),
            rssi=rssi,
            security=_uint(value, 3, "security"),
            channel=_uint(value, 4, "channel", 255),
        )


MAX_SCAN_RESULTS = 20


@dataclass(frozen=True)
class ScanResult:
    """SCAN_RESULT, D→C: at most 20 networks."""

    TYPE: ClassVar[int] = 0x21
    networks: tuple[Network, ...]

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + cbor_encode({1: [n.to_cbor() for n in self.networks]})

    @classmethod
    def decode_body(cls, body: bytes) -> ScanResult:
        m = cbor_decode_map(body)
        entries = _field(m, 1, "networks")
        if not isinstance(entries, list):
            raise MessageError("networks must be an array", code="wrong_type")
        if len(entries) > MAX_SCAN_RESULTS:
            raise MessageError("more than 20 networks", code="wrong_size")
        return cls(tuple(Network.from_cbor(e) for e in entries))


@dataclass(frozen=True, repr=False)
class Provision:
    """PROVISION, C→D: Wi-Fi credentials and the cloud's wrapped identity ``W``.

    The decoder only checks CBOR types and W's size; the §4 Wi-Fi rules are
    checked by the device in the order of §5.3 step 1 so it can answer RESULT.
    ``repr`` leaves the passphrase out so it cannot reach a log.
    """

    TYPE: ClassVar[int] = 0x22
    ssid: bytes
    passphrase: str
    security: int
    wrapped_identity: bytes

    def __repr__(self) -> str:
        return f"Provision(ssid={self.ssid!r}, security={self.security}, passphrase=<hidden>)"

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + cbor_encode(
            {1: self.ssid, 2: self.passphrase, 3: self.security, 4: self.wrapped_identity}
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Provision:
        m = cbor_decode_map(body)
        return cls(
            ssid=_bstr(m, 1, "ssid", 0, MAX_MESSAGE),
            passphrase=_tstr(m, 2, "passphrase", MAX_MESSAGE),
            security=_uint(m, 3, "security"),
            wrapped_identity=_bstr(m, 4, "W", 80, 80),
        )


class ProgressStage:
    AWAITING_USER = 1
    JOINING_WIFI = 2
    OBTAINING_ADDRESS = 3


PROGRESS_TEXT = {
    ProgressStage.AWAITING_USER: "awaiting user",
    ProgressStage.JOINING_WIFI: "joining Wi-Fi",
    ProgressStage.OBTAINING_ADDRESS: "obtaining address",
}


@dataclass(frozen=True)
class Progress:
    """PROGRESS, D→C: stage 1 awaiting user, 2 joining Wi-Fi, 3 obtaining address."""

    TYPE: ClassVar[int] = 0x23
    stage: int
    detail: str

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + cbor_encode({1: self.stage, 2: clip_text(self.detail, 64)})

    @classmethod
    def decode_body(cls, body: bytes) -> Progress:
        m = cbor_decode_map(body)
        return cls(_uint(m, 1, "stage"), _tstr(m, 2, "detail", 64))


@dataclass(frozen=True)
class Result:
    """RESULT, D→C: status, detail, and ``Ack`` exactly when status = 0 (§5.3 step 5)."""

    TYPE: ClassVar[int] = 0x24
    status: int
    detail: str
    ack: bytes | None = None

    def encode(self) -> bytes:
        body: dict[int, CborValue] = {1: self.status, 3: clip_text(self.detail, 64)}
        if self.ack is not None:
            body[2] = self.ack
        return bytes((self.TYPE,)) + cbor_encode(body)

    @classmethod
    def decode_body(cls, body: bytes) -> Result:
        m = cbor_decode_map(body)
        status = _uint(m, 1, "status")
        detail = _tstr(m, 3, "detail", 64)
        if status == 0:
            return cls(status, detail, _bstr(m, 2, "Ack", 32, 32))
        if 2 in m:
            raise MessageError("Ack present in a failed RESULT", code="unexpected_field")
        return cls(status, detail, None)


@dataclass(frozen=True)
class Close:
    """CLOSE, both directions: ``{1: status}``."""

    TYPE: ClassVar[int] = 0x25
    status: int

    def encode(self) -> bytes:
        return bytes((self.TYPE,)) + cbor_encode({1: self.status})

    @classmethod
    def decode_body(cls, body: bytes) -> Close:
        m = cbor_decode_map(body)
        return cls(_uint(m, 1, "status"))


InnerMessage = Scan | ScanResult | Provision | Progress | Result | Close

_INNER: dict[int, Callable[[bytes], InnerMessage]] = {
    cls.TYPE: cls.decode_body for cls in (Scan, ScanResult, Provision, Progress, Result, Close)
}


def decode_inner(data: bytes) -> InnerMessage:
    """Decode an inner message (``u8 type ‖ CBOR map``) taken out of a RECORD."""
    if not data:
        raise MessageError("empty inner message", code="wrong_size")
    decoder = _INNER.get(data[0])
    if decoder is None:
        raise MessageError(f"unknown inner type 0x{data[0]:02x}", code="unknown_type")
    return decoder(data[1:])
