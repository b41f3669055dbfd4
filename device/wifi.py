"""The simulated Wi-Fi environment a device sees (PROTOCOL.md §4 SCAN/PROGRESS, §5.3 step 4).

A JSON file lists the access points in range and optional faults::

    {"networks": [{"ssid": "DoorstepHome", "security": "wpa2",
                   "passphrase": "correct horse battery", "rssi": -42, "channel": 6}],
     "faults": {"join_delay_ms": 800, "dhcp_failure": false, "ap_gone": []}}

Per network, ``security`` is a name (``open``, ``wpa2``, ``wpa3``,
``wpa2/wpa3``) or the §4 number 0–3; ``passphrase`` follows the §4 rules for
that type (``""`` or absent for open); optional ``join_delay_ms`` overrides the
global delay and ``hidden: true`` makes the AP answer scans with an empty SSID
(it can still be joined by name). ``faults`` may also set ``join_timeout_ms``
(default 15 000). Unknown keys are refused, so a typo does not silently mean
"no fault". A realistic default environment ships as ``default_wifi.json``.

SCAN answers strongest first, at most 20 entries, without APs in ``ap_gone``.
A join maps its outcome to the §4 status codes::

    JoinFailed.status
    ├── 2 NETWORK_NOT_FOUND     no AP with that SSID in range (or gone)
    ├── 4 UNSUPPORTED_SECURITY  the AP does not offer the requested security
    ├── 5 JOIN_TIMEOUT          association takes longer than join_timeout_s
    ├── 3 WIFI_AUTH_FAILED      wrong passphrase
    └── 6 NO_IP_ADDRESS         associated (PROGRESS 3 sent) but DHCP failed
    WifiConfigError (code "bad_wifi_file")  the environment file is wrong

Passphrases never appear in a ``repr``, an error message or a log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from protocol.errors import Status, UnsupportedSecurity, WifiParameterError
from protocol.messages import MAX_SCAN_RESULTS, Network
from protocol.wifi import Security, WifiCredentials, validate_wifi

DEFAULT_FILE = "default_wifi.json"
DEFAULT_JOIN_TIMEOUT_S = 15.0
MAX_DETAIL_BYTES = 64

SECURITY_NAMES: dict[str, Security] = {
    "open": Security.OPEN,
    "wpa2": Security.WPA2_PSK,
    "wpa3": Security.WPA3_SAE,
    "wpa2/wpa3": Security.WPA2_WPA3,
}

# Which requested security types an AP of each kind accepts. A client set to
# WPA2/WPA3 (3) tries SAE, then PSK, so it joins WPA2-only and WPA3-only APs too.
ACCEPTED_SECURITY: dict[Security, frozenset[Security]] = {
    Security.OPEN: frozenset({Security.OPEN}),
    Security.WPA2_PSK: frozenset({Security.WPA2_PSK, Security.WPA2_WPA3}),
    Security.WPA3_SAE: frozenset({Security.WPA3_SAE, Security.WPA2_WPA3}),
    Security.WPA2_WPA3: frozenset({Security.WPA2_PSK, Security.WPA3_SAE, Security.WPA2_WPA3}),
}

_NETWORK_KEYS = {"ssid", "security", "passphrase", "rssi", "channel", "join_delay_ms", "hidden"}
_FAULT_KEYS = {"join_delay_ms", "join_timeout_ms", "dhcp_failure", "ap_gone"}
_TOP_KEYS = {"networks", "faults", "description"}


class WifiConfigError(Exception):
    """The Wi-Fi environment file is unreadable or invalid; the message says where and why."""

    code = "bad_wifi_file"


class JoinFailed(Exception):
    """A join ended with a §4 status 2–6; ``detail`` fits RESULT (≤ 64 bytes, no secrets)."""

    def __init__(self, status: Status, detail: str) -> None:
        self.status = status
        self.detail = _fit(detail)
        self.code = status.name.lower()
        super().__init__(f"{status.value} {status.describe}: {self.detail}")


def _fit(text: str) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= MAX_DETAIL_BYTES:
        return text
    return raw[: MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore") + "..."


@dataclass(frozen=True, repr=False)
class AccessPoint:
    """One access point in range. ``join_delay_s`` None means the environment's delay."""

    ssid: str
    security: int
    passphrase: str
    rssi: int
    channel: int
    join_delay_s: float | None = None
    hidden: bool = False

    def __repr__(self) -> str:
        label = Security(self.security).label
        return (
            f"AccessPoint(ssid={self.ssid!r}, security={label}, rssi={self.rssi}, "
            f"channel={self.channel}{', hidden' if self.hidden else ''})"
        )

    @property
    def ssid_bytes(self) -> bytes:
        return self.ssid.encode("utf-8")

    def as_network(self) -> Network:
        """This AP as a SCAN_RESULT entry (a hidden AP beacons an empty SSID)."""
        ssid = b"" if self.hidden else self.ssid_bytes
        return Network(ssid=ssid, rssi=self.rssi, security=self.security, channel=self.channel)


@dataclass(frozen=True)
class WifiFaults:
    """Faults injected into joins; ``ap_gone`` names SSIDs that vanished from the air."""

    join_delay_s: float = 0.0
    dhcp_failure: bool = False
    ap_gone: frozenset[str] = field(default_factory=frozenset)
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("join_delay_s", "join_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number ≥ 0")


def _passphrase_matches(ap: AccessPoint, credentials: WifiCredentials) -> bool:
    """Constant-time comparison; a 64-hex WPA2 passphrase is the PSK itself."""
    given = credentials.passphrase.encode("utf-8")
    expected = ap.passphrase.encode("utf-8")
    psk_types = (Security.WPA2_PSK, Security.WPA2_WPA3)
    psk_capable = credentials.security in psk_types and ap.security in psk_types
    if psk_capable and len(given) == 64 and len(expected) != 64:
        try:
            psk = bytes.fromhex(credentials.passphrase)
        except ValueError:
            return False
        # IEEE 802.11i: PSK = PBKDF2-HMAC-SHA1(passphrase, ssid, 4096, 32).
        derived = hashlib.pbkdf2_hmac("sha1", expected, ap.ssid_bytes, 4096, 32)
        return hmac.compare_digest(psk, derived)
    return hmac.compare_digest(given, expected)


class WifiEnvironment:
    """The networks in range and the faults; SCAN answers and joins come from here."""

    def __init__(
        self, access_points: Iterable[AccessPoint], faults: WifiFaults | None = None
    ) -> None:
        self._access_points = tuple(access_points)
        self._faults = faults if faults is not None else WifiFaults()

    def __repr__(self) -> str:
        return f"WifiEnvironment({len(self._access_points)} access points, {self._faults!r})"

    # -- construction --------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> WifiEnvironment:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise WifiConfigError(f"{path}: not UTF-8 text") from None
        except OSError as exc:
            raise WifiConfigError(f"{path}: cannot read ({exc.strerror})") from None
        return cls._from_text(text, str(path))

    @classmethod
    def default(cls) -> WifiEnvironment:
        """The realistic home shipped with the package (``device/default_wifi.json``)."""
        try:
            text = resources.files("device").joinpath(DEFAULT_FILE).read_text("utf-8")
        except (OSError, TypeError, ValueError):
            # An editable install made before device/__init__.py existed maps
            # ``device`` as a namespace package, which 3.11's importlib.resources
            # cannot read; the file sits next to this module either way.
            text = Path(__file__).with_name(DEFAULT_FILE).read_text("utf-8")
        return cls._from_text(text, f"<package device>/{DEFAULT_FILE}")

    @classmethod
    def from_json(
        cls, data: dict[str, Any], *, source: str = "<wifi environment>"
    ) -> WifiEnvironment:
        secrets = _passphrases_in(data)
        try:
            return cls._parse(data)
        except _Invalid as exc:
            raise WifiConfigError(_redact(f"{source}: {exc}", secrets)) from None

    @classmethod
    def _from_text(cls, text: str, source: str) -> WifiEnvironment:
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            # The decoder's message has a position, never the document's text.
            raise WifiConfigError(
                f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        except (ValueError, RecursionError):
            raise WifiConfigError(
                f"{source}: not valid JSON (non-finite number or too deep)"
            ) from None
        return cls.from_json(data, source=source)

    @classmethod
    def _parse(cls, data: Any) -> WifiEnvironment:
        if not isinstance(data, dict):
            raise _Invalid("the top level must be a JSON object")
        _no_unknown_keys(data, _TOP_KEYS, "the top level")
        if "networks" not in data:
            raise _Invalid('missing field "networks"')
        networks = data["networks"]
        if not isinstance(networks, list):
            raise _Invalid('"networks" must be a list')
        access_points = [
            _parse_network(entry, f"networks[{i}]") for i, entry in enumerate(networks)
        ]
        faults = _parse_faults(data.get("faults", {}))
        return cls(access_points, faults)

    # -- state ---------------------------------------------------------------

    @property
    def access_points(self) -> tuple[AccessPoint, ...]:
        return self._access_points

    @property
    def faults(self) -> WifiFaults:
        return self._faults

    def set_faults(self, faults: WifiFaults) -> None:
        self._faults = faults

    def set_join_delay(self, seconds: float) -> None:
        """Every join takes ``seconds`` (per-network delays included); benchmarks set 0."""
        self._faults = dataclasses.replace(self._faults, join_delay_s=seconds)
        self._access_points = tuple(
            dataclasses.replace(ap, join_delay_s=None) for ap in self._access_points
        )

    # -- SCAN and join -------------------------------------------------------

    def visible(self) -> list[AccessPoint]:
        """APs in range, strongest first (ties by SSID, so scans are repeatable)."""
        present = [ap for ap in self._access_points if ap.ssid not in self._faults.ap_gone]
        return sorted(present, key=lambda ap: (-ap.rssi, ap.ssid_bytes, ap.channel))

    def scan(self) -> list[Network]:
        """SCAN_RESULT entries: strongest first, at most 20, gone APs left out."""
        return [ap.as_network() for ap in self.visible()[:MAX_SCAN_RESULTS]]

    async def join(
        self,
        credentials: WifiCredentials,
        progress: Callable[[int], Awaitable[None]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Join the network; returns on success, raises ``JoinFailed`` otherwise.

        The session has sent PROGRESS 2 before calling; this sends PROGRESS 3
        once associated, while obtaining an address.
        """
        candidates = [ap for ap in self.visible() if ap.ssid_bytes == credentials.ssid]
        if not candidates:
            raise JoinFailed(Status.NETWORK_NOT_FOUND, "no network with that name in range")
        matching = [
            ap
            for ap in candidates
            if credentials.security in ACCEPTED_SECURITY[Security(ap.security)]
        ]
        if not matching:
            offered = "/".join(sorted({Security(ap.security).label for ap in candidates}))
            raise JoinFailed(
                Status.UNSUPPORTED_SECURITY,
                f"network offers {offered}, not {credentials.security.label}",
            )
        ap = matching[0]  # the strongest
        delay = self._faults.join_delay_s if ap.join_delay_s is None else ap.join_delay_s
        timeout = self._faults.join_timeout_s
        if delay > timeout:
            await sleep(timeout)
            raise JoinFailed(Status.JOIN_TIMEOUT, f"no association within {timeout:g} s")
        if delay > 0:
            await sleep(delay)
        if not _passphrase_matches(ap, credentials):
            raise JoinFailed(Status.WIFI_AUTH_FAILED, "the access point refused the passphrase")
        await progress(3)
        if self._faults.dhcp_failure:
            raise JoinFailed(Status.NO_IP_ADDRESS, "no DHCP answer")


# ---------------------------------------------------------------------------
# Strict parsing of the environment file.


class _Invalid(Exception):
    """One problem in the file; the message names the field, never a passphrase."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _no_unknown_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        names = ", ".join(json.dumps(k)[:40] for k in unknown)
        raise _Invalid(f"{where}: unknown field(s) {names} (allowed: {', '.join(sorted(allowed))})")


def _int_field(obj: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    if key not in obj:
        raise _Invalid(f'{where}: missing field "{key}"')
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{where}.{key}: expected an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise _Invalid(f"{where}.{key}: {value} is outside {low}..{high}")
    return value


def _millis_field(obj: dict[str, Any], key: str, where: str) -> float | None:
    if key not in obj:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"{where}.{key}: expected a number of milliseconds, got {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Invalid(f"{where}.{key}: must be a finite number ≥ 0")
    return float(value) / 1000.0


def _bool_field(obj: dict[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise _Invalid(f"{where}.{key}: expected true or false, got {_kind(value)}")
    return value


def _security(value: Any, where: str) -> Security:
    choices = 'expected "open", "wpa2", "wpa3", "wpa2/wpa3" or 0–3'
    if isinstance(value, str):
        try:
            return SECURITY_NAMES[value.strip().lower()]
        except KeyError:
            shown = json.dumps(value)[:40]
            raise _Invalid(f"{where}.security: unknown security {shown} ({choices})") from None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Security(value)
        except ValueError:
            raise _Invalid(f"{where}.security: unknown security {value} ({choices})") from None
    raise _Invalid(f"{where}.security: {choices}, got {_kind(value)}")


def _parse_network(entry: Any, where: str) -> AccessPoint:
    if not isinstance(entry, dict):
        raise _Invalid(f"{where}: expected an object, got {_kind(entry)}")
    _no_unknown_keys(entry, _NETWORK_KEYS, where)
    if "ssid" not in entry:
        raise _Invalid(f'{where}: missing field "ssid"')
    ssid = entry["ssid"]
    if not isinstance(ssid, str):
        raise _Invalid(f"{where}.ssid: expected a string, got {_kind(ssid)}")
    if "security" not in entry:
        raise _Invalid(f'{where}: missing field "security"')
    security = _security(entry["security"], where)
    passphrase = entry.get("passphrase", "" if security is Security.OPEN else None)
    if passphrase is None:
        raise _Invalid(f'{where}: missing field "passphrase" (required for {security.label})')
    if not isinstance(passphrase, str):
        raise _Invalid(f"{where}.passphrase: expected a string, got {_kind(passphrase)}")
    try:
        validate_wifi(ssid.encode("utf-8", "surrogatepass"), security, passphrase)
    except WifiParameterError as exc:
        field_name = "ssid" if exc.code == "bad_ssid" else "passphrase"
        raise _Invalid(f"{where}.{field_name}: {exc.message}") from None
    except UnsupportedSecurity as exc:  # pragma: no cover - _security already checked
        raise _Invalid(f"{where}.security: {exc.message}") from None
    try:
        ssid.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{where}.ssid: not valid Unicode text") from None
    return AccessPoint(
        ssid=ssid,
        security=int(security),
        passphrase=passphrase,
        rssi=_int_field(entry, "rssi", where, -128, 0),
        channel=_int_field(entry, "channel", where, 1, 255),
        join_delay_s=_millis_field(entry, "join_delay_ms", where),
        hidden=_bool_field(entry, "hidden", where),
    )


def _parse_faults(value: Any) -> WifiFaults:
    where = "faults"
    if not isinstance(value, dict):
        raise _Invalid(f"faults: expected an object, got {_kind(value)}")
    _no_unknown_keys(value, _FAULT_KEYS, where)
    gone = value.get("ap_gone", [])
    if not isinstance(gone, list) or not all(isinstance(s, str) for s in gone):
        raise _Invalid("faults.ap_gone: expected a list of SSID strings")
    delay = _millis_field(value, "join_delay_ms", where)
    timeout = _millis_field(value, "join_timeout_ms", where)
    return WifiFaults(
        join_delay_s=0.0 if delay is None else delay,
        dhcp_failure=_bool_field(value, "dhcp_failure", where),
        ap_gone=frozenset(gone),
        join_timeout_s=DEFAULT_JOIN_TIMEOUT_S if timeout is None else timeout,
    )


def _passphrases_in(data: Any) -> list[str]:
    """Every non-empty string stored under a "passphrase" key, for redaction."""
    found: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "passphrase" and isinstance(value, str) and value:
                    found.append(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _redact(message: str, secrets: list[str]) -> str:
    """Belt and braces: no passphrase text survives into an error message."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter ones would garble the message and reveal little
            message = message.replace(secret, "<redacted>")
    return message
