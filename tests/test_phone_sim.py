"""The phone app over the simulated BLE and a real cloud (issue 6).

The same Pilot steps as ``test_phone_app.py``, but every peer is real and
separate: ``doorstep sim``, ``doorstep cloud serve`` and a ``doorstep device run``
process per device; the app scans with bleak and talks to the cloud over HTTP.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ble.bleak_central import BleakCentral
from ble_helpers import bus_environment
from cloud.client import CloudClient
from demo.stack import DeviceHandle, Stack
from device_process_helpers import quick_wifi
from phone.cloudlink import CloudLink
from phone.commissioner import Stage
from phone.screens import ChooseNetworkScreen, ConfirmCodeScreen, DevicesScreen, ResultScreen
from phone_helpers import (
    HOME_PASSPHRASE,
    app_for,
    type_into,
    wait_for_device,
    wait_screen,
    wait_until,
)
from protocol.errors import Status

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    workdir = tmp_path_factory.mktemp("phone-sim")
    async with Stack(workdir, timing=False, wifi_file=quick_wifi(workdir, 50)) as running:
        with bus_environment(running.env):
            yield running


async def fresh_device(stack: Stack) -> DeviceHandle:
    (handle,) = await stack.add_devices(1)
    return handle


def phone(stack: Stack):  # type: ignore[no-untyped-def]
    cloud = CloudLink(stack.cloud_url, stack.token)
    return app_for(BleakCentral(), cloud, scan_window_s=0.5, wait_checkin_s=15.0), cloud


async def test_scan_select_confirm_network_success(stack: Stack) -> None:
    handle = await fresh_device(stack)
    app, _cloud = phone(stack)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for_device(pilot, handle.name)
        row = _select(app, handle.name)
        assert "ready to pair" in str(row[2])
        await pilot.press("enter")
        confirm = await wait_screen(pilot, ConfirmCodeScreen, 20)
        assert confirm.device.model == "Doorstep Lamp L1"  # as registered in the cloud
        await pilot.press("y")
        choose = await wait_screen(pilot, ChooseNetworkScreen, 20)
        assert choose.query_one("#ssid").value == "DoorstepHome"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.press(*HOME_PASSPHRASE)
        await pilot.press("enter")
        result = await wait_screen(pilot, ResultScreen, 30)
        report = result.outcome.report
        assert report.ok and report.checked_in, report.message
    async with CloudClient(stack.cloud_url, token=stack.token) as cloud:
        views = {d["identifier"]: d for d in await cloud.devices()}
    assert views[report.identifier.hex()]["state"] == "active"


async def test_wrong_passphrase_then_corrected(stack: Stack) -> None:
    handle = await fresh_device(stack)
    app, _cloud = phone(stack)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_pairing(pilot, app, handle.name)
        await pilot.press("y")
        first = await wait_screen(pilot, ChooseNetworkScreen, 20)
        await type_into(pilot, "#passphrase", "not the passphrase")
        await pilot.press("enter")
        await wait_until(
            pilot,
            lambda: app.screen is not first and isinstance(app.screen, ChooseNetworkScreen),
            30,
        )
        retry = await wait_screen(pilot, ChooseNetworkScreen)
        assert retry.failure is not None and retry.failure.status is Status.WIFI_AUTH_FAILED
        await type_into(pilot, "#passphrase", HOME_PASSPHRASE)
        await pilot.press("enter")
        result = await wait_screen(pilot, ResultScreen, 30)
        assert result.outcome.report.ok


async def test_rejecting_the_code_leaves_the_device_untouched(stack: Stack) -> None:
    handle = await fresh_device(stack)
    app, _cloud = phone(stack)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_pairing(pilot, app, handle.name)
        await pilot.press("n")
        result = await wait_screen(pilot, ResultScreen, 20)
        assert result.outcome.report.status is Status.REJECTED_BY_USER
        await pilot.press("enter")
        await wait_screen(pilot, DevicesScreen)
        await wait_for_device(pilot, handle.name)  # still there, ready to pair again


async def test_device_that_disappears_mid_pairing(stack: Stack) -> None:
    """Killed while its code is on the phone: the dialog goes, nobody has to answer it."""
    handle = await fresh_device(stack)
    app, _cloud = phone(stack)
    async with app.run_test(size=(80, 24)) as pilot:
        await open_pairing(pilot, app, handle.name)
        await stack.stop_device(handle, signal.SIGKILL)  # the device loses power
        result = await wait_screen(pilot, ResultScreen, 60)
        assert not any(isinstance(s, ConfirmCodeScreen) for s in app.screen_stack)
        report = result.outcome.report
        assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.CONFIRM
        assert report.message == "the device disconnected while the code was being confirmed"
        assert report.hint == "Check that the device is still on and in range, then try again."
        await pilot.press("enter")
        await wait_screen(pilot, DevicesScreen)


async def open_pairing(pilot, app, name: str) -> ConfirmCodeScreen:  # type: ignore[no-untyped-def]
    """Wait for ``name`` in the list, pair it, and wait for the code to compare."""
    await wait_for_device(pilot, name)
    _select(app, name)
    await pilot.press("enter")
    return await wait_screen(pilot, ConfirmCodeScreen, 20)


def _select(app, name: str) -> list[object]:  # type: ignore[no-untyped-def]
    """Put the list's cursor on ``name``; its row."""
    table = app.screen.query_one("#devices")
    names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
    table.move_cursor(row=names.index(name))
    return list(table.get_row_at(names.index(name)))
