"""The phone app driven with Pilot against a real device runtime on the in-memory air.

No mocks: the device is ``DeviceRuntime`` with its storage and Wi-Fi
environment, the cloud is ``LocalBindService`` (the cloud's computations
in-process) with a small owner registry, and the app runs ``Onboarding``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from textual.widgets import DataTable, Digits, Input, Static

from ble.memory import MemoryAir
from ble.profile import AdvState, DeviceStatus, Sighting
from onboarding_helpers import ScriptedDeviceUser
from phone.app import NearbyDevices, StageBoard
from phone.cloudlink import CloudLink
from phone.commissioner import Stage, StageState
from phone.history import History, HistoryEntry
from phone.screens import (
    EMPTY_NEARBY,
    ChooseNetworkScreen,
    ConfirmCodeScreen,
    ConfirmScreen,
    DevicesScreen,
    MyDevicesScreen,
    PairingScreen,
    ResultScreen,
)
from phone_helpers import (
    DEVICE_NAME,
    HOME_PASSPHRASE,
    OwnedRecord,
    app_for,
    memory_rig,
    to_network_choice,
    type_into,
    wait_for_device,
    wait_screen,
    wait_until,
)
from protocol.errors import Status


def _text(screen: object, selector: str) -> str:
    from textual.screen import Screen

    assert isinstance(screen, Screen)
    return str(screen.query_one(selector, Static).render())


async def test_pair_from_list_to_success(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        history = History.in_memory()
        app = app_for(rig.central, rig.cloud, history=history)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_device(pilot)
            await pilot.press("enter")
            confirm = await wait_screen(pilot, ConfirmCodeScreen)
            assert confirm.device.model == "Doorstep Lamp L1"
            assert confirm.query_one(Digits).value == f"{confirm.sas[:3]} {confirm.sas[3:]}"
            await pilot.press("y")

            choose = await wait_screen(pilot, ChooseNetworkScreen)
            networks = choose.query_one("#networks", DataTable)
            assert networks.row_count == 7  # six from the device's scan + "Other network…"
            assert choose.query_one("#ssid", Input).value == "DoorstepHome"  # strongest first
            await pilot.press("enter")  # pick the highlighted network → passphrase
            assert choose.query_one("#passphrase", Input).has_focus
            await pilot.press(*HOME_PASSPHRASE)
            assert choose.query_one("#passphrase", Input).password  # masked
            await pilot.press("enter")

            result = await wait_screen(pilot, ResultScreen)
            report = result.outcome.report
            assert report.ok and report.checked_in
            assert report.short_id in _text(result, "#summary")
            # both ends showed the same code (§5.5)
            assert rig.user.requests[0].sas == confirm.sas
            assert rig.runtime.state.active is not None
            assert rig.runtime.state.active.identifier == report.identifier
            # the device's user saw the check-in once, in its own words (it was the
            # session's "Provisioned as …" line again)
            checked = f"Checked in with the cloud: onboarded as {report.short_id} (epoch 1)"
            await wait_until(pilot, lambda: checked in rig.user.messages)
            assert rig.user.messages.count(checked) == 1, rig.user.messages
            (entry,) = await history.recent()
            assert entry.ok and entry.identifier == report.short_id
            assert entry.model == "Doorstep Lamp L1" and entry.device_name == DEVICE_NAME

            await pilot.press("enter")
            await wait_screen(pilot, DevicesScreen)
            await wait_for_device(pilot)
            table = app.screen.query_one("#devices", DataTable)
            row = [str(c) for c in table.get_row_at(0)]
            assert row[1] == "Doorstep Lamp L1"  # model known now
            assert row[2].startswith("set up")


async def test_wrong_passphrase_then_corrected_in_same_session(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        app = app_for(rig.central, rig.cloud)
        async with app.run_test(size=(80, 24)) as pilot:
            first = await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", "not the passphrase")
            await pilot.press("enter")

            # the same flow asks again, with the failure shown
            await wait_until(
                pilot,
                lambda: app.screen is not first and isinstance(app.screen, ChooseNetworkScreen),
            )
            retry = await wait_screen(pilot, ChooseNetworkScreen)
            assert retry.failure is not None and retry.failure.status is Status.WIFI_AUTH_FAILED
            banner = _text(retry, "#failure")
            assert "passphrase was not accepted" in banner
            assert "Try another network/passphrase" in str(retry.query_one(".title").render())
            assert retry.query_one("#ssid", Input).value == "DoorstepHome"
            assert retry.query_one("#passphrase", Input).value == ""  # never kept
            await type_into(pilot, "#passphrase", HOME_PASSPHRASE)
            await pilot.press("enter")

            result = await wait_screen(pilot, ResultScreen)
            assert result.outcome.report.ok
            assert len(rig.cloud.cloud.answers) == 1  # one session, one bind/start
            assert len(rig.user.requests) == 1  # same SSID: the device asked once


async def test_invalid_passphrase_is_refused_inline_before_sending(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        app = app_for(rig.central, rig.cloud)
        async with app.run_test(size=(80, 24)) as pilot:
            choose = await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", "short")
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen is choose
            assert "8–63 printable ASCII" in _text(choose, "#error")
            assert rig.user.requests == []  # nothing reached the device
            # reveal toggle
            await pilot.press("ctrl+r")
            assert not choose.query_one("#passphrase", Input).password
            await pilot.press("escape")  # give up: back to the list
            await wait_screen(pilot, DevicesScreen)
            await wait_until(pilot, lambda: rig.runtime.session is None)
            assert rig.runtime.current_status().state is AdvState.UNPROVISIONED


async def test_rejecting_the_code(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        app = app_for(rig.central, rig.cloud)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_device(pilot)
            await pilot.press("enter")
            await wait_screen(pilot, ConfirmCodeScreen)
            await pilot.press("n")
            result = await wait_screen(pilot, ResultScreen)
            report = result.outcome.report
            assert report.status is Status.REJECTED_BY_USER and report.stage is Stage.CONFIRM
            summary = _text(result, "#summary")
            assert "The pairing was rejected." in summary
            assert "Start again if this was a mistake." in summary
            await wait_until(pilot, lambda: rig.runtime.session is None)
            assert rig.runtime.state.pending is None and rig.runtime.state.active is None
            await pilot.press("enter")
            await wait_screen(pilot, DevicesScreen)


async def test_device_disappears_mid_pairing(tmp_path: Path) -> None:
    # The device's user never answers, so the flow waits in "Join Wi-Fi" when the device goes.
    async with memory_rig(tmp_path, user=ScriptedDeviceUser(answer=None)) as rig:
        app = app_for(rig.central, rig.cloud, fade_after_s=0.2, drop_after_s=0.5)
        async with app.run_test(size=(80, 24)) as pilot:
            await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", HOME_PASSPHRASE)
            await pilot.press("enter")
            await wait_until(pilot, lambda: bool(rig.user.requests))
            await wait_screen(pilot, PairingScreen)
            assert app.board.rows[Stage.JOIN].state is StageState.RUNNING

            await rig.stop()  # power off: the peripheral stops and the link drops

            result = await wait_screen(pilot, ResultScreen)
            report = result.outcome.report
            assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.JOIN
            assert "The connection to the device failed." in _text(result, "#summary")
            await pilot.press("enter")
            devices = await wait_screen(pilot, DevicesScreen)
            await wait_until(pilot, lambda: not devices.query_one("#devices", DataTable).display)
            assert EMPTY_NEARBY in _text(devices, "#empty")


async def test_a_cloud_out_of_reach_is_said_as_such_not_blamed_on_the_device(
    tmp_path: Path,
) -> None:
    """The result led with "The device stopped answering." (the nearest DS1 status)."""
    async with memory_rig(tmp_path) as rig:
        link = CloudLink("http://127.0.0.1:9", "dst_token")  # nothing listens on port 9
        try:
            app = app_for(rig.central, link)
            async with app.run_test(size=(80, 24)) as pilot:
                await wait_for_device(pilot)
                await pilot.press("enter")
                result = await wait_screen(pilot, ResultScreen)
                summary = _text(result, "#summary")
                assert summary.startswith("Cannot reach the cloud.\n")
                assert "Stopped at: Verify with cloud · cloud_unavailable after " in summary
                assert "Next: Check this machine's network and the cloud URL" in summary
                assert "device" not in summary.split("\n")[0]
                await wait_until(pilot, lambda: rig.runtime.session is None)
        finally:
            await link.aclose()


async def test_device_gone_while_the_code_dialog_is_up(tmp_path: Path) -> None:
    """The dialog goes away by itself and the result says the device disconnected, in
    "Confirm code"; it used to wait for y/n, then blame the link at "Join Wi-Fi"."""
    async with memory_rig(tmp_path) as rig:
        history = History.in_memory()
        app = app_for(rig.central, rig.cloud, history=history)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_device(pilot)
            await pilot.press("enter")
            await wait_screen(pilot, ConfirmCodeScreen)

            await rig.stop()  # power off while the user compares the codes; nobody answers

            result = await wait_screen(pilot, ResultScreen)
            assert not any(isinstance(s, ConfirmCodeScreen) for s in app.screen_stack)
            report = result.outcome.report
            assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.CONFIRM
            assert report.message == "the device disconnected while the code was being confirmed"
            summary = _text(result, "#summary")
            assert "Stopped at: Confirm code · status 11 (protocol_error)" in summary
            assert "Details: the device disconnected while the code was being confirmed" in summary
            assert (
                "Next: Check that the device is still on and in range, then try again." in summary
            )
            assert app.board.rows[Stage.CONFIRM].state is StageState.FAILED
            assert app.board.rows[Stage.NETWORK].state is None  # never reached
            (entry,) = await history.recent()
            assert entry.status_name == "protocol_error"


async def test_device_gone_while_choosing_the_network(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        app = app_for(rig.central, rig.cloud)
        async with app.run_test(size=(80, 24)) as pilot:
            await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", HOME_PASSPHRASE)  # typed, not sent

            await rig.stop()

            result = await wait_screen(pilot, ResultScreen)
            assert not any(isinstance(s, ChooseNetworkScreen) for s in app.screen_stack)
            report = result.outcome.report
            assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.NETWORK
            assert report.message == "the device disconnected while the network was being chosen"
            assert rig.user.requests == []  # nothing was provisioned


async def test_escape_cancels_and_device_returns_to_advertising(tmp_path: Path) -> None:
    async with memory_rig(tmp_path, user=ScriptedDeviceUser(answer=None)) as rig:
        history = History.in_memory()
        app = app_for(rig.central, rig.cloud, history=history)
        async with app.run_test(size=(80, 24)) as pilot:
            await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", HOME_PASSPHRASE)
            await pilot.press("enter")
            await wait_until(pilot, lambda: bool(rig.user.requests))
            await wait_screen(pilot, PairingScreen)
            assert rig.runtime.current_status().state is AdvState.BUSY
            await pilot.press("escape")
            await wait_screen(pilot, DevicesScreen)
            await wait_until(pilot, lambda: rig.runtime.session is None)
            assert rig.runtime.current_status().state is AdvState.UNPROVISIONED
            assert rig.runtime.state.pending is None
            (entry,) = await history.recent()
            assert entry.status_name == "cancelled"
            await wait_for_device(pilot)  # scanning again, the device is back


async def test_my_devices_lists_and_unbinds(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        history = History.in_memory()
        app = app_for(rig.central, rig.cloud, history=history)
        async with app.run_test(size=(80, 24)) as pilot:
            await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", HOME_PASSPHRASE)
            await pilot.press("enter")
            result = await wait_screen(pilot, ResultScreen)
            short = result.outcome.report.short_id
            await pilot.press("m")
            mine = await wait_screen(pilot, MyDevicesScreen)
            owned = mine.query_one("#owned", DataTable)
            await wait_until(pilot, lambda: owned.row_count == 1)
            assert [str(c) for c in owned.get_row_at(0)][:3] == [
                short,
                "Doorstep Lamp L1",
                "active",
            ]
            hist = mine.query_one("#history", DataTable)
            assert str(hist.get_row_at(0)[3]) == short
            await pilot.press("u")
            await wait_screen(pilot, ConfirmScreen)
            await pilot.press("y")
            await wait_screen(pilot, MyDevicesScreen)
            await wait_until(pilot, lambda: rig.cloud.unbound != [])
            assert rig.cloud.unbound == [result.outcome.report.identifier]
            await wait_until(pilot, lambda: not owned.display)
            assert "No devices in your account yet." in _text(mine, "#owned-status")


async def test_my_devices_follows_the_account_while_shown(tmp_path: Path) -> None:
    """No `r` needed: devices bound elsewhere appear, a check-in shows, the cursor keeps its device."""
    async with memory_rig(tmp_path) as rig:
        history = History.in_memory()
        await history.add(_pairing(1_700_000_000, "Doorstep-00A1"))
        app = app_for(rig.central, rig.cloud, history=history, devices_refresh_s=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for_device(pilot)
            await pilot.press("m")
            mine = await wait_screen(pilot, MyDevicesScreen)
            owned = mine.query_one("#owned", DataTable)
            pairings = mine.query_one("#history", DataTable)
            await wait_until(pilot, lambda: "No devices" in _text(mine, "#owned-status"))
            assert pairings.has_focus  # the only list shown

            def rows() -> list[list[str]]:
                return [[str(c) for c in owned.get_row_at(i)][:3] for i in range(owned.row_count)]

            lock = OwnedRecord(
                bytes.fromhex("a0" * 16), bytes(16), "Doorstep Lock D1", 1, "pending", None
            )
            plug = OwnedRecord(
                bytes.fromhex("b0" * 16), bytes(16), "Doorstep Plug P1", 1, "active", None
            )
            rig.cloud.extra += [plug, lock]  # bound from another phone of the account
            await wait_until(pilot, lambda: owned.row_count == 2)
            assert owned.display and _text(mine, "#owned-status") == ""
            assert (
                owned.has_focus
            )  # the device list takes the keys when it appears (`u` acts on it)
            await pilot.press("down")
            assert owned.cursor_row == 1  # on the lock
            # the lock checks in, and a third device comes first in the list
            lamp = OwnedRecord(
                bytes.fromhex("c0" * 16), bytes(16), "Doorstep Lamp L1", 2, "active", None
            )
            rig.cloud.extra[:] = [lamp, plug, replace(lock, state="active")]
            await wait_until(pilot, lambda: owned.row_count == 3)
            assert rows() == [
                ["c0c0c0c0", "Doorstep Lamp L1", "active"],
                ["b0b0b0b0", "Doorstep Plug P1", "active"],
                ["a0a0a0a0", "Doorstep Lock D1", "active"],
            ]
            assert owned.cursor_row == 2  # still on the lock
            # a newer pairing on this phone: the pairings cursor stays on its entry
            await history.add(_pairing(1_700_000_600, "Doorstep-00B2"))
            await wait_until(pilot, lambda: pairings.row_count == 2)
            assert str(pairings.get_row_at(1)[1]) == "Doorstep-00A1" and pairings.cursor_row == 1
            # the lock leaves the account: the cursor stays where it was, on the row now there
            rig.cloud.extra[:] = [lamp, plug]
            await wait_until(pilot, lambda: owned.row_count == 2)
            assert owned.cursor_row == 1
            # a failed refresh keeps what was shown, and says why
            cloud, app.cloud = app.cloud, _Unreachable()
            await wait_until(pilot, lambda: "not reachable" in _text(mine, "#owned-status"))
            assert owned.display and owned.row_count == 2
            assert "showing the last list" in _text(mine, "#owned-status")
            app.cloud = cloud
            await wait_until(pilot, lambda: _text(mine, "#owned-status") == "")


def _pairing(at: float, name: str) -> HistoryEntry:
    return HistoryEntry(at, name, "C8:2B:96:1A:00:A1", "Doorstep Lamp L1", "", 0, "ok", "", 2.0)


class _Unreachable:
    async def list_devices(self) -> list[OwnedRecord]:
        raise ConnectionError("connection refused")

    async def unbind(self, identifier: bytes) -> None:
        raise ConnectionError("connection refused")


async def test_empty_state_then_device_appears(tmp_path: Path) -> None:
    air = MemoryAir()
    app = app_for(air.central(), None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        devices = app.screen_stack[0]
        assert isinstance(devices, DevicesScreen)
        assert EMPTY_NEARBY in _text(devices, "#empty")
        assert devices.query_one("#empty").display


def test_nearby_order_and_fading() -> None:
    def seen(address: str, rssi: int, state: AdvState) -> Sighting:
        return Sighting(
            address, f"Doorstep-{address[-5:].replace(':', '')}", rssi, DeviceStatus(state, 1)
        )

    nearby = NearbyDevices(fade_after_s=3, drop_after_s=6)
    nearby.seen(seen("AA:00:00:00:00:01", -40, AdvState.PROVISIONED), 0)
    nearby.seen(seen("AA:00:00:00:00:02", -80, AdvState.UNPROVISIONED), 0)
    nearby.seen(seen("AA:00:00:00:00:03", -60, AdvState.UNPROVISIONED), 2)
    order = [d.sighting.address[-2:] for d in nearby.rows(2)]
    assert order == ["03", "02", "01"]  # unprovisioned first, then by signal
    rows = nearby.rows(4)
    assert [(d.sighting.address[-2:], d.faded) for d in rows] == [
        ("03", False),
        ("02", True),
        ("01", True),
    ]
    assert [d.sighting.address[-2:] for d in nearby.rows(6.5)] == ["03"]  # the others dropped


def test_stage_board_retry_resets_later_stages() -> None:
    board = StageBoard()
    board.update(Stage.CONNECT, StageState.RUNNING, "", 0.0)
    board.update(Stage.VERIFY, StageState.RUNNING, "", 1.0)
    assert board.rows[Stage.CONNECT].state is StageState.DONE
    assert board.rows[Stage.CONNECT].elapsed == 1.0
    board.update(Stage.NETWORK, StageState.RUNNING, "", 2.0)
    board.update(Stage.JOIN, StageState.RUNNING, "DoorstepHome", 3.0)
    board.update(Stage.JOIN, StageState.FAILED, "The Wi-Fi passphrase was not accepted.", 4.0)
    board.update(Stage.JOIN, StageState.DONE, "", 4.0)
    assert board.rows[Stage.JOIN].state is StageState.FAILED
    board.update(Stage.NETWORK, StageState.RUNNING, "", 5.0)
    assert board.rows[Stage.JOIN].state is None


async def test_first_run_asks_for_settings(tmp_path: Path) -> None:
    from phone.config import ConfigStore, PhoneConfig
    from phone.screens import SettingsScreen

    store = ConfigStore(tmp_path / "cfg" / "phone.json")
    built: list[PhoneConfig] = []

    def factory(config: PhoneConfig) -> object:
        built.append(config)
        return object()

    air = MemoryAir()
    app = app_for(
        air.central(),
        None,
        config=PhoneConfig(),
        config_store=store,
        cloud_factory=factory,
    )
    async with app.run_test(size=(80, 24)) as pilot:
        settings = await wait_screen(pilot, SettingsScreen)
        assert settings.first_run
        await type_into(pilot, "#url", "https://cloud.example")
        await pilot.press("enter")
        await pilot.press(*"secret-token-123456")
        await pilot.press("enter")
        await wait_screen(pilot, DevicesScreen)
    assert store.load() == PhoneConfig("https://cloud.example", "secret-token-123456")
    assert (store.path.stat().st_mode & 0o777) == 0o600
    assert built == [PhoneConfig("https://cloud.example", "secret-token-123456")]


async def test_saved_token_is_masked_in_settings(tmp_path: Path) -> None:
    from phone.screens import SettingsScreen

    air = MemoryAir()
    app = app_for(air.central(), None)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("s")
        settings = await wait_screen(pilot, SettingsScreen)
        token = settings.query_one("#token", Input)
        assert token.value == ""
        assert "0123456789abcdef" not in token.placeholder
        assert token.placeholder.startswith("saved ••••••••cdef")


async def test_giving_up_after_a_wifi_failure_shows_that_failure(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        app = app_for(rig.central, rig.cloud)
        async with app.run_test(size=(80, 24)) as pilot:
            first = await to_network_choice(pilot)
            await type_into(pilot, "#passphrase", "not the passphrase")
            await pilot.press("enter")
            await wait_until(
                pilot,
                lambda: app.screen is not first and isinstance(app.screen, ChooseNetworkScreen),
            )
            await pilot.press("escape")
            result = await wait_screen(pilot, ResultScreen)
            assert result.outcome.report.status is Status.WIFI_AUTH_FAILED
            assert "Check the passphrase and try again." in _text(result, "#summary")


# ---- doorstep phone without a terminal ---------------------------------------------------------

NO_TERMINAL = (
    "doorstep phone: no terminal for the app ({which}): "
    "to pair without one, use `doorstep phone pair`"
)


def _drain(fd: int) -> bytes:
    """What a terminal's other end holds now (without waiting for more)."""
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: nobody holds the terminal open any more
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(
    ("stdin_tty", "stderr_tty", "which"),
    [
        (False, False, "stdin and stderr, where it draws, are not terminals"),
        (False, True, "stdin is not one"),
        (True, False, "stderr, where it draws, is not one"),
    ],
    ids=["no-terminal", "stdin-devnull", "stderr-pipe"],
)
def test_the_app_without_a_terminal_refuses_at_once(
    tmp_path: Path, stdin_tty: bool, stderr_tty: bool, which: str
) -> None:
    """It ran forever, writing escape codes to stderr (about 1 MB in 10 s): Textual reads
    keys from stdin and draws on stderr, so both must be terminals (stdout need not be)."""
    env = {k: v for k, v in os.environ.items() if k != "TEXTUAL_DRIVER"}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-such-bus",
    )
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "doorstep_cli", "phone", "--cloud", "http://127.0.0.1:9"],
            stdin=terminal if stdin_tty else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal if stderr_tty else subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
        try:
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
        if stderr_tty:
            err = _drain(controller).replace(b"\r\n", b"\n")
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 2  # like `device run` and `hub run` with nobody to answer
    assert out == b""
    assert err.decode() == NO_TERMINAL.format(which=which) + "\n"
