"""Tests for device.wifi: SCAN answers and join outcomes (PROTOCOL.md §4, §5.3 step 4).

What a user would notice: the wrong network list, a join that reports the
wrong reason (a wrong passphrase shown as "network not found"), or an error
message that prints their Wi-Fi passphrase.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from device.wifi import (
    AccessPoint,
    JoinFailed,
    WifiConfigError,
    WifiEnvironment,
    WifiFaults,
)
from protocol.errors import WIFI_JOIN_FAILURES, Status
from protocol.messages import MAX_SCAN_RESULTS, Network, ScanResult
from protocol.wifi import Security, WifiCredentials, validate_wifi

HOME_PASS = "correct horse battery"
NEIGHBOUR_PASS = "blue-teapot-7781"


class Recorder:
    """The session's side of a join: PROGRESS stages sent and sleeps taken (no real waiting)."""

    def __init__(self) -> None:
        self.stages: list[int] = []
        self.slept: list[float] = []

    async def progress(self, stage: int) -> None:
        self.stages.append(stage)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def creds(ssid: str | bytes, security: int, passphrase: str) -> WifiCredentials:
    raw = ssid.encode() if isinstance(ssid, str) else ssid
    return validate_wifi(raw, security, passphrase)


def env(*networks: dict[str, Any], **faults: Any) -> WifiEnvironment:
    return WifiEnvironment.from_json({"networks": list(networks), "faults": faults})


def net(
    ssid: str, security: str | int, passphrase: Any, rssi: Any = -50, **more: Any
) -> dict[str, Any]:
    """One network entry; ``passphrase`` None leaves it out (bad-file tests pass wrong types)."""
    entry: dict[str, Any] = {"ssid": ssid, "security": security, "rssi": rssi, "channel": 6, **more}
    if passphrase is not None:
        entry["passphrase"] = passphrase
    return entry


async def join(
    environment: WifiEnvironment, credentials: WifiCredentials
) -> tuple[Recorder, JoinFailed | None]:
    recorder = Recorder()
    try:
        await environment.join(credentials, recorder.progress, recorder.sleep)
    except JoinFailed as failure:
        return recorder, failure
    return recorder, None


# --- the default environment -------------------------------------------------------


def test_default_environment_is_a_realistic_home() -> None:
    environment = WifiEnvironment.default()
    networks = environment.scan()
    assert 5 <= len(networks) <= 8
    assert networks[0] == Network(b"DoorstepHome", -42, Security.WPA2_PSK, 6)
    assert [n.rssi for n in networks] == sorted((n.rssi for n in networks), reverse=True)
    assert {n.security for n in networks} == {0, 1, 2, 3}
    assert any(n.channel > 14 for n in networks)  # a 5 GHz network
    assert any(n.ssid == b"" for n in networks)  # a hidden one beacons no name
    assert environment.faults.join_delay_s == pytest.approx(0.8)
    # Every entry survives the SCAN_RESULT codec.
    result = ScanResult(tuple(networks))
    assert ScanResult.decode_body(result.encode()[1:]) == result


async def test_default_home_network_joins_with_the_demo_passphrase() -> None:
    recorder, failure = await join(WifiEnvironment.default(), creds("DoorstepHome", 1, HOME_PASS))
    assert failure is None
    assert recorder.stages == [3]
    assert recorder.slept == [pytest.approx(0.8)]


def test_default_file_is_the_one_next_to_the_module() -> None:
    import device.wifi

    path = Path(device.wifi.__file__).with_name("default_wifi.json")
    assert WifiEnvironment.load(path).scan() == WifiEnvironment.default().scan()


# --- SCAN ------------------------------------------------------------------------------


def test_scan_sorts_strongest_first_and_caps_at_20() -> None:
    networks = [net(f"net-{i:02}", "open", None, rssi=-30 - (i * 7) % 60) for i in range(30)]
    environment = env(*networks)
    scanned = environment.scan()
    assert len(scanned) == MAX_SCAN_RESULTS == 20
    assert [n.rssi for n in scanned] == sorted((n.rssi for n in scanned), reverse=True)
    strongest_30 = sorted((e["rssi"] for e in networks), reverse=True)
    assert [n.rssi for n in scanned] == strongest_30[:20]
    assert environment.scan() == scanned  # repeatable


def test_scan_leaves_out_gone_access_points() -> None:
    environment = env(
        net("Kept", "open", None), net("Gone", "open", None, rssi=-20), ap_gone=["Gone"]
    )
    assert [n.ssid for n in environment.scan()] == [b"Kept"]


# --- join outcomes -------------------------------------------------------------------


async def test_success_reports_obtaining_an_address() -> None:
    recorder, failure = await join(env(net("Home", "wpa2", HOME_PASS)), creds("Home", 1, HOME_PASS))
    assert failure is None
    assert recorder.stages == [3]
    assert recorder.slept == []  # no delay configured, no sleep


@pytest.mark.parametrize(
    ("ap_security", "requested", "passphrase", "joins"),
    [
        ("open", 0, "", True),
        ("open", 1, HOME_PASS, False),
        ("wpa2", 1, HOME_PASS, True),
        ("wpa2", 2, HOME_PASS, False),
        ("wpa2", 3, HOME_PASS, True),
        ("wpa3", 2, HOME_PASS, True),
        ("wpa3", 1, HOME_PASS, False),
        ("wpa3", 0, "", False),
        ("wpa2/wpa3", 1, HOME_PASS, True),
        ("wpa2/wpa3", 2, HOME_PASS, True),
        ("wpa2/wpa3", 3, HOME_PASS, True),
        ("wpa2/wpa3", 0, "", False),
        (3, 2, HOME_PASS, True),
    ],
)
async def test_security_types_an_ap_accepts(
    ap_security: str | int, requested: int, passphrase: str, joins: bool
) -> None:
    stored = "" if ap_security == "open" else HOME_PASS
    environment = env(net("Home", ap_security, stored))
    recorder, failure = await join(environment, creds("Home", requested, passphrase))
    if joins:
        assert failure is None and recorder.stages == [3]
    else:
        assert failure is not None and failure.status is Status.UNSUPPORTED_SECURITY
        assert recorder.stages == []


async def test_unknown_ssid_is_network_not_found() -> None:
    _, failure = await join(env(net("Home", "wpa2", HOME_PASS)), creds("Elsewhere", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.NETWORK_NOT_FOUND


async def test_an_ap_that_is_gone_is_network_not_found() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS), ap_gone=["Home"])
    _, failure = await join(environment, creds("Home", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.NETWORK_NOT_FOUND


async def test_a_hidden_network_joins_by_name() -> None:
    environment = env(net("Secret", "wpa2", HOME_PASS, hidden=True))
    assert environment.scan() == [Network(b"", -50, 1, 6)]
    _, failure = await join(environment, creds("Secret", 1, HOME_PASS))
    assert failure is None


async def test_wrong_passphrase_is_auth_failed_without_the_passphrase() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS))
    recorder, failure = await join(environment, creds("Home", 1, "incorrect horse battery"))
    assert failure is not None and failure.status is Status.WIFI_AUTH_FAILED
    assert recorder.stages == []
    assert "horse" not in str(failure) + failure.detail + repr(failure)


async def test_wpa2_accepts_the_64_hex_psk_derived_from_the_passphrase() -> None:
    psk = hashlib.pbkdf2_hmac("sha1", HOME_PASS.encode(), b"Home", 4096, 32).hex()
    environment = env(net("Home", "wpa2", HOME_PASS))
    assert (await join(environment, creds("Home", 1, psk)))[1] is None
    _, failure = await join(environment, creds("Home", 1, "0" * 64))
    assert failure is not None and failure.status is Status.WIFI_AUTH_FAILED


async def test_slow_association_waits_then_times_out() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS), join_delay_ms=20_000, join_timeout_ms=15_000)
    recorder, failure = await join(environment, creds("Home", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.JOIN_TIMEOUT
    assert recorder.slept == [15.0]
    assert recorder.stages == []


async def test_per_network_delay_overrides_the_global_one() -> None:
    environment = env(
        net("Slow", "wpa2", HOME_PASS, join_delay_ms=16_000),
        net("Quick", "wpa2", HOME_PASS, join_delay_ms=100),
        join_delay_ms=800,
    )
    recorder, failure = await join(environment, creds("Quick", 1, HOME_PASS))
    assert failure is None and recorder.slept == [pytest.approx(0.1)]
    recorder, failure = await join(environment, creds("Slow", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.JOIN_TIMEOUT
    assert recorder.slept == [15.0]


async def test_set_join_delay_zero_removes_every_delay() -> None:
    environment = env(net("Slow", "wpa2", HOME_PASS, join_delay_ms=16_000), join_delay_ms=800)
    environment.set_join_delay(0)
    recorder, failure = await join(environment, creds("Slow", 1, HOME_PASS))
    assert failure is None and recorder.slept == []


async def test_dhcp_failure_after_association_is_no_ip_address() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS), dhcp_failure=True)
    recorder, failure = await join(environment, creds("Home", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.NO_IP_ADDRESS
    assert recorder.stages == [3]  # it did associate and ask for an address


async def test_set_faults_changes_a_running_environment() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS))
    environment.set_faults(WifiFaults(ap_gone=frozenset({"Home"})))
    _, failure = await join(environment, creds("Home", 1, HOME_PASS))
    assert failure is not None and failure.status is Status.NETWORK_NOT_FOUND
    assert environment.scan() == []


async def test_join_uses_asyncio_sleep_by_default() -> None:
    environment = env(net("Home", "wpa2", HOME_PASS), join_delay_ms=1)
    stages: list[int] = []

    async def progress(stage: int) -> None:
        stages.append(stage)

    await environment.join(creds("Home", 1, HOME_PASS), progress)
    assert stages == [3]


async def test_every_failure_is_a_join_status_with_a_short_detail() -> None:
    long_name = "N" * 32
    environment = env(net(long_name, "wpa3", HOME_PASS), net("Home", "wpa2", HOME_PASS))
    attempts = [
        creds("Missing", 1, HOME_PASS),
        creds(long_name, 1, HOME_PASS),
        creds(long_name, 2, "wrong"),
    ]
    for attempt in attempts:
        _, failure = await join(environment, attempt)
        assert failure is not None
        assert failure.status in WIFI_JOIN_FAILURES
        assert len(failure.detail.encode()) <= 64
        assert HOME_PASS not in failure.detail
    assert len(JoinFailed(Status.NO_IP_ADDRESS, "é" * 80).detail.encode()) <= 64


def test_access_point_repr_hides_the_passphrase() -> None:
    ap = AccessPoint("Home", 1, HOME_PASS, -40, 6)
    assert "Home" in repr(ap)
    assert HOME_PASS not in repr(ap) + str(ap)
    assert HOME_PASS not in repr(WifiEnvironment([ap]))


# --- bad files -----------------------------------------------------------------------


def write(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "wifi.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def good_networks() -> list[dict[str, Any]]:
    return [net("Home", "wpa2", HOME_PASS), net("Neighbour", "wpa3", NEIGHBOUR_PASS)]


BAD_FILES: list[tuple[str, Any, str]] = [
    ("bad JSON", '{"networks": [', "not valid JSON"),
    ("NaN", '{"networks": [], "faults": {"join_delay_ms": NaN}}', "not valid JSON"),
    ("top level list", [], "top level must be a JSON object"),
    ("no networks", {"faults": {}}, 'missing field "networks"'),
    ("networks not list", {"networks": {"ssid": "x"}}, '"networks" must be a list'),
    (
        "missing ssid",
        {"networks": [{"security": "open", "rssi": -40, "channel": 1}]},
        'networks[0]: missing field "ssid"',
    ),
    (
        "missing rssi",
        {"networks": [net("A", "open", None) | {"rssi": None}]},
        "networks[0].rssi: expected an integer, got null",
    ),
    (
        "rssi positive",
        {"networks": [net("A", "open", None, rssi=5)]},
        "networks[0].rssi: 5 is outside -128..0",
    ),
    (
        "rssi string",
        {"networks": [net("A", "open", None, rssi="-40")]},
        "networks[0].rssi: expected an integer, got a string",
    ),
    (
        "channel bool",
        {"networks": [net("A", "open", None) | {"channel": True}]},
        "networks[0].channel: expected an integer, got a boolean",
    ),
    (
        "unknown security name",
        {"networks": [*good_networks(), net("W", "wep", HOME_PASS)]},
        'networks[2].security: unknown security "wep"',
    ),
    (
        "security 4",
        {"networks": [net("W", 4, HOME_PASS)]},
        "networks[0].security: unknown security 4",
    ),
    (
        "missing passphrase",
        {"networks": [net("W", "wpa2", None)]},
        'networks[0]: missing field "passphrase" (required for WPA2)',
    ),
    (
        "short WPA2 passphrase",
        {"networks": [*good_networks(), net("W", "wpa2", "short")]},
        "networks[2].passphrase: a WPA2 passphrase must be",
    ),
    (
        "passphrase on open",
        {"networks": [net("W", "open", HOME_PASS)]},
        "networks[0].passphrase: an open network takes no passphrase",
    ),
    (
        "passphrase number",
        {"networks": [net("W", "wpa2", 12345678)]},
        "networks[0].passphrase: expected a string, got a number",
    ),
    (
        "ssid too long",
        {"networks": [net("x" * 33, "open", None)]},
        "networks[0].ssid: SSID must be 1–32 bytes",
    ),
    (
        "typo in a field",
        {"networks": [*good_networks()[:1], net("A", "open", None) | {"pasphrase": HOME_PASS}]},
        'networks[1]: unknown field(s) "pasphrase"',
    ),
    (
        "typo in faults",
        {"networks": good_networks(), "faults": {"dhcp_fail": True}},
        'faults: unknown field(s) "dhcp_fail"',
    ),
    (
        "negative delay",
        {"networks": good_networks(), "faults": {"join_delay_ms": -1}},
        "faults.join_delay_ms: must be a finite number ≥ 0",
    ),
    (
        "dhcp string",
        {"networks": good_networks(), "faults": {"dhcp_failure": "yes"}},
        "faults.dhcp_failure: expected true or false, got a string",
    ),
    (
        "ap_gone string",
        {"networks": good_networks(), "faults": {"ap_gone": "Home"}},
        "faults.ap_gone: expected a list of SSID strings",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_refused_clearly_without_passphrases(
    tmp_path: Path, name: str, content: Any, expected: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(WifiConfigError) as info:
        WifiEnvironment.load(path)
    message = str(info.value)
    assert info.value.code == "bad_wifi_file"
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    for secret in (HOME_PASS, NEIGHBOUR_PASS, "12345678"):
        assert secret not in message


def test_a_passphrase_in_a_wrong_place_is_redacted() -> None:
    data = {"networks": [net("Home", "wpa2", HOME_PASS)], "faults": {HOME_PASS: 1}}
    with pytest.raises(WifiConfigError) as info:
        WifiEnvironment.from_json(data)
    assert "unknown field" in str(info.value)
    assert HOME_PASS not in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(WifiConfigError, match="cannot read"):
        WifiEnvironment.load(tmp_path / "absent.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(WifiConfigError, match="not UTF-8"):
        WifiEnvironment.load(tmp_path / "binary.json")


def test_names_and_numbers_for_security_are_equivalent() -> None:
    by_name = env(
        *(
            net(f"n{i}", name, HOME_PASS if name != "open" else None)
            for i, name in enumerate(["open", "wpa2", "WPA3", "wpa2/wpa3"])
        )
    )
    by_number = env(*(net(f"n{i}", i, HOME_PASS if i else None) for i in range(4)))
    assert by_name.scan() == by_number.scan()
