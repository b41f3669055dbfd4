"""Snapshots of every phone screen (pytest-textual-snapshot), at 80×24 and 120×40.

Deterministic by construction: a fixed clock (elapsed times and fading),
UTC for wall times, fixed RSSI, no blinking cursor, no spinner, and screens
fed with fixed reports instead of a live session (whose codes and
identifiers are random). The live flow is covered by ``test_phone_app.py``.
Update with ``pytest tests/test_phone_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.screen import Screen

from ble.memory import MemoryAir
from ble.profile import FLAG_BUTTON_NEEDED, FLAG_WINDOW_OPEN, AdvState, DeviceStatus, Sighting
from device.wifi import WifiEnvironment
from ds1_pair import LocalCloud, make_factory
from phone.app import PairingOutcome, PhoneApp, StageBoard, create_app
from phone.commissioner import DeviceSummary, OnboardingReport, Stage, StageState
from phone.config import PhoneConfig
from phone.history import History, HistoryEntry
from phone.screens import (
    ChooseNetworkScreen,
    ConfirmCodeScreen,
    ConfirmScreen,
    MyDevicesScreen,
    PairingScreen,
    ResultScreen,
    SettingsScreen,
)
from phone_helpers import CONFIG, LocalOwnerCloud, OwnedRecord, type_into, wait_until
from protocol.commissioner_side import ProvisionFailed
from protocol.errors import Status

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
NOW = 1000.0
WALL = 1_760_000_000.0  # 2025-10-09 08:53 UTC

LAMP = Sighting(
    "C8:2B:96:1A:01:42",
    "Doorstep-0142",
    -48,
    DeviceStatus(AdvState.UNPROVISIONED, FLAG_WINDOW_OPEN),
)
LOCK = Sighting(
    "C8:2B:96:1A:02:42",
    "Doorstep-0242",
    -71,
    DeviceStatus(AdvState.UNPROVISIONED, FLAG_WINDOW_OPEN),
)
HALL = Sighting(
    "C8:2B:96:1A:07:10",
    "Doorstep-0710",
    -60,
    DeviceStatus(AdvState.PROVISIONED, FLAG_BUTTON_NEEDED),
)
PORCH = Sighting("C8:2B:96:1A:0B:33", "Doorstep-0B33", -83, DeviceStatus(AdvState.BUSY, 0))
LAMP_SUMMARY = DeviceSummary("Doorstep-0142", LAMP.address, "Doorstep Lamp L1", bytes(range(16)))
IDENTIFIER = bytes.fromhex("3f9a1c7e5b2d4e60a1b2c3d4e5f60718")

Step = Callable[[Pilot[Any]], Awaitable[None]]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def static_app(
    cloud: Any = None, config: PhoneConfig = CONFIG, history: History | None = None
) -> PhoneApp:
    return create_app(
        MemoryAir().central(),
        cloud,
        history or History(":memory:", wall_clock=lambda: WALL),
        config,
        clock=Clock(),
        localtime=time.gmtime,
        scan=False,
        cursor_blink=False,
        fade_after_s=5,
        drop_after_s=12,
    )


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.pause()
    await pilot.pause()


async def push(pilot: Pilot[Any], screen: Screen[Any]) -> None:
    await pilot.app.push_screen(screen)
    await settle(pilot)


def shows(screen_factory: Callable[[], Screen[Any]]) -> Step:
    async def step(pilot: Pilot[Any]) -> None:
        await push(pilot, screen_factory())

    return step


# ---- nearby devices ---------------------------------------------------------------------------


@SIZES
def test_devices_empty(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(static_app(), terminal_size=size, run_before=settle)


@SIZES
def test_devices_list(snap_compare: Any, size: tuple[int, int]) -> None:
    app = static_app()

    async def run_before(pilot: Pilot[Any]) -> None:
        assert isinstance(app.clock, Clock)
        app.nearby.seen(PORCH, NOW - 6)  # not seen for 6 s: faded
        for sighting in (LOCK, HALL, LAMP):
            app.nearby.seen(sighting, NOW)
        app.known_models[HALL.name] = "Doorstep Lock D1"
        app.screen_stack[0].refresh_devices()  # type: ignore[attr-defined]
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_devices_bluetooth_problem(snap_compare: Any, size: tuple[int, int]) -> None:
    app = static_app()

    async def run_before(pilot: Pilot[Any]) -> None:
        app.scan_problem = "cannot scan: No Bluetooth adapters found."
        app.screen_stack[0].refresh_devices()  # type: ignore[attr-defined]
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


# ---- pairing ----------------------------------------------------------------------------------


def board_until(stage: Stage, state: StageState, detail: str = "") -> StageBoard:
    """Stages before ``stage`` done with fixed durations; ``stage`` running for 1.7 s."""
    durations = {
        Stage.CONNECT: 0.4,
        Stage.VERIFY: 0.3,
        Stage.SECURE: 0.2,
        Stage.CONFIRM: 2.1,
        Stage.NETWORK: 6.5,
        Stage.JOIN: 1.2,
        Stage.CHECKIN: 0.8,
    }
    order = list(Stage)
    before = order[: order.index(stage)]
    board = StageBoard()
    t = NOW - 1.7 - sum(durations[s] for s in before)
    for s in before:
        board.update(s, StageState.RUNNING, "DoorstepHome" if s is Stage.JOIN else "", t)
        t += durations[s]
    board.update(stage, StageState.RUNNING, detail, t)
    if state is not StageState.RUNNING:
        board.update(stage, state, detail, NOW)
    return board


def pairing(board: StageBoard) -> Step:
    async def step(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, PhoneApp)
        app.board = board
        await push(pilot, PairingScreen(LAMP))

    return step


@SIZES
def test_pairing_in_progress(snap_compare: Any, size: tuple[int, int]) -> None:
    step = pairing(board_until(Stage.JOIN, StageState.RUNNING, "joining DoorstepHome"))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
def test_pairing_failed_stage(snap_compare: Any, size: tuple[int, int]) -> None:
    step = pairing(board_until(Stage.VERIFY, StageState.FAILED, "the device disconnected"))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
def test_confirm_code(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await pairing(board_until(Stage.CONFIRM, StageState.RUNNING, "482913"))(pilot)
        await push(pilot, ConfirmCodeScreen(LAMP_SUMMARY, "482913"))

    assert snap_compare(static_app(), terminal_size=size, run_before=run_before)


# ---- choose network ---------------------------------------------------------------------------


def networks() -> list[Any]:
    return WifiEnvironment.default().scan()


@SIZES
def test_choose_network(snap_compare: Any, size: tuple[int, int]) -> None:
    step = shows(lambda: ChooseNetworkScreen(networks()))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
def test_choose_network_invalid_passphrase(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await push(pilot, ChooseNetworkScreen(networks()))
        await type_into(pilot, "#passphrase", "short", keys=True)
        await pilot.press("enter")
        await settle(pilot)

    assert snap_compare(static_app(), terminal_size=size, run_before=run_before)


@SIZES
def test_choose_network_after_wifi_failure(snap_compare: Any, size: tuple[int, int]) -> None:
    step = shows(
        lambda: ChooseNetworkScreen(
            networks(),
            ProvisionFailed(Status.WIFI_AUTH_FAILED, "authentication failed"),
            previous_ssid=b"DoorstepHome",
            previous_security=1,
        )
    )
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
def test_choose_network_no_scan_results(snap_compare: Any, size: tuple[int, int]) -> None:
    step = shows(lambda: ChooseNetworkScreen([]))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


# ---- result -----------------------------------------------------------------------------------


def success() -> PairingOutcome:
    report = OnboardingReport(
        Status.OK,
        Stage.DONE,
        "Onboarded.",
        device=LAMP_SUMMARY,
        identifier=IDENTIFIER,
        epoch=1,
        checked_in=True,
        total_s=11.4,
    )
    return PairingOutcome(LAMP.name, LAMP.address, report)


def failure(status: Status, stage: Stage, message: str, error: str = "") -> PairingOutcome:
    from phone.commissioner import explain

    report = OnboardingReport(
        status, stage, message, explain(status)[1], device=LAMP_SUMMARY, total_s=3.2
    )
    return PairingOutcome(LAMP.name, LAMP.address, report, error=error)


@SIZES
def test_result_success(snap_compare: Any, size: tuple[int, int]) -> None:
    step = shows(lambda: ResultScreen(success()))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
@pytest.mark.parametrize(
    ("status", "stage", "message"),
    [
        (Status.REJECTED_BY_USER, Stage.CONFIRM, "You rejected the code."),
        (Status.PROTOCOL_ERROR, Stage.JOIN, "the device disconnected"),
        (Status.WINDOW_CLOSED, Stage.VERIFY, "pairing window closed"),
    ],
    ids=["rejected", "disconnected", "window-closed"],
)
def test_result_failure(
    snap_compare: Any, size: tuple[int, int], status: Status, stage: Stage, message: str
) -> None:
    step = shows(lambda: ResultScreen(failure(status, stage, message)))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


@SIZES
def test_result_cloud_error(snap_compare: Any, size: tuple[int, int]) -> None:
    outcome = failure(
        Status.PROTOCOL_ERROR, Stage.VERIFY, "", error="401 unauthorized: the token was refused"
    )
    step = shows(lambda: ResultScreen(outcome))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)


# ---- my devices -------------------------------------------------------------------------------


def owner_cloud() -> LocalOwnerCloud:
    cloud = LocalOwnerCloud(LocalCloud(make_factory()))
    cloud.extra = [
        OwnedRecord(IDENTIFIER, bytes(16), "Doorstep Lamp L1", 1, "active", WALL - 3600),
        OwnedRecord(bytes.fromhex("a0" * 16), bytes(16), "Doorstep Lock D1", 2, "pending", WALL),
    ]
    return cloud


async def seed_history(history: History) -> None:
    entries = [
        ("Doorstep-0142", "Doorstep Lamp L1", "3f9a1c7e", 0, "ok", 11.4, -3600),
        ("Doorstep-0242", "Doorstep Lock D1", "", 3, "wifi_auth_failed", 48.0, -1800),
        ("Doorstep-0242", "Doorstep Lock D1", "a0a0a0a0", 0, "ok", 9.8, -600),
        ("Doorstep-0B33", "", "", 1, "cancelled", 2.5, -60),
    ]
    for name, model, short, status, label, took, ago in entries:
        await history.add(HistoryEntry(WALL + ago, name, "", model, short, status, label, "", took))


def my_devices(cloud: Any) -> Step:
    async def step(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, PhoneApp)
        await seed_history(app.history)
        screen = MyDevicesScreen()
        await push(pilot, screen)
        await wait_until(pilot, lambda: screen.loaded)
        await settle(pilot)

    return step


@SIZES
def test_my_devices(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(
        static_app(owner_cloud()), terminal_size=size, run_before=my_devices(owner_cloud())
    )


class UnreachableCloud(LocalOwnerCloud):
    async def list_devices(self) -> list[OwnedRecord]:
        raise ConnectionError("cannot connect to https://cloud.doorstep.test")


@SIZES
def test_my_devices_cloud_unreachable(snap_compare: Any, size: tuple[int, int]) -> None:
    cloud = UnreachableCloud(LocalCloud(make_factory()))
    assert snap_compare(static_app(cloud), terminal_size=size, run_before=my_devices(cloud))


@SIZES
def test_my_devices_empty(snap_compare: Any, size: tuple[int, int]) -> None:
    app = static_app(LocalOwnerCloud(LocalCloud(make_factory())))

    async def run_before(pilot: Pilot[Any]) -> None:
        screen = MyDevicesScreen()
        await push(pilot, screen)
        await wait_until(pilot, lambda: screen.loaded)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_unbind_confirmation(snap_compare: Any, size: tuple[int, int]) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await my_devices(None)(pilot)
        await pilot.press("u")
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen))
        await settle(pilot)

    assert snap_compare(static_app(owner_cloud()), terminal_size=size, run_before=run_before)


# ---- settings ---------------------------------------------------------------------------------


@SIZES
def test_settings_first_run(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(static_app(config=PhoneConfig()), terminal_size=size, run_before=settle)


@SIZES
def test_settings_saved_token_masked(snap_compare: Any, size: tuple[int, int]) -> None:
    step = shows(lambda: SettingsScreen(first_run=False))
    assert snap_compare(static_app(), terminal_size=size, run_before=step)
