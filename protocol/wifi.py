"""Wi-Fi parameter rules of PROTOCOL.md §4, checked in the order of §5.3 step 1.

ssid 1–32 bytes (else 14), then the security type (unknown → 4), then the
passphrase for that type (else 14). Shared by the device (which answers
RESULT) and commissioners (which validate before sending).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from protocol.errors import UnsupportedSecurity, WifiParameterError


class Security(IntEnum):
    OPEN = 0
    WPA2_PSK = 1
    WPA3_SAE = 2
    WPA2_WPA3 = 3

    @property
    def label(self) -> str:
        return {0: "open", 1: "WPA2", 2: "WPA3", 3: "WPA2/WPA3"}[self.value]


_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_PRINTABLE = re.compile(r"[\x20-\x7e]{8,63}")


@dataclass(frozen=True, repr=False)
class WifiCredentials:
    """Validated credentials. ``repr`` hides the passphrase."""

    ssid: bytes
    security: Security
    passphrase: str

    def __repr__(self) -> str:
        return f"WifiCredentials(ssid={self.ssid!r}, security={self.security.label})"

    @property
    def ssid_text(self) -> str:
        return self.ssid.decode("utf-8", errors="replace")


def validate_wifi(ssid: bytes, security: int, passphrase: str) -> WifiCredentials:
    if not 1 <= len(ssid) <= 32:
        raise WifiParameterError("SSID must be 1–32 bytes", code="bad_ssid")
    try:
        sec = Security(security)
    except ValueError:
        raise UnsupportedSecurity(f"unknown security type {security}") from None
    if sec is Security.OPEN:
        ok = passphrase == ""
        rule = "an open network takes no passphrase"
    elif sec is Security.WPA3_SAE:
        ok = 1 <= len(passphrase.encode("utf-8")) <= 128
        rule = "a WPA3 passphrase must be 1–128 bytes"
    else:
        ok = bool(_PRINTABLE.fullmatch(passphrase) or _HEX64.fullmatch(passphrase))
        rule = "a WPA2 passphrase must be 8–63 printable ASCII characters or 64 hex digits"
    if not ok:
        raise WifiParameterError(rule, code="bad_passphrase")
    return WifiCredentials(ssid, sec, passphrase)
