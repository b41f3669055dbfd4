"""Faults: each one gives the documented error on the bleak side, and the
peripheral serves the next connection. Simulator and bless peripheral run in
this process (the peripheral has its own bus connection, hence its own adapter).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.exc import BleakDBusError, BleakGATTProtocolError
from dbus_next.errors import DBusError  # type: ignore[import-untyped]

from bluezsim import Simulator, TimingModel
from bluezsim.echo_peripheral import LONG_CHAR, LONG_VALUE, RX_CHAR, TX_CHAR, EchoPeripheral

pytestmark = pytest.mark.timeout(60)
NAME = "Doorstep-0001"


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(timing=TimingModel(supervision_timeout_ms=300)) as simulator:
        yield simulator


@pytest.fixture
async def peripheral(sim: Simulator) -> AsyncIterator[EchoPeripheral]:
    echo = EchoPeripheral(NAME)
    await echo.start()
    yield echo
    await echo.stop()


async def find() -> BLEDevice:
    device = await BleakScanner.find_device_by_name(NAME, timeout=3)
    assert device is not None
    return device


async def test_an_echo_peripheral_started_beside_a_central_stays_out_of_its_view(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """As ``BlessPeripheral`` (tests/test_ble_onboarding.py): no bless object under /org/bluez."""
    from bleak.backends.bluezdbus.manager import get_global_bluez_manager

    manager = await get_global_bluez_manager()  # listening before the peripheral starts
    echo = EchoPeripheral(NAME)
    await echo.start()
    try:
        async with BleakClient(await find()) as client:
            assert await echo_once(client, b"hello") == b"hello"
        kept = sorted(manager._properties)
    finally:
        await echo.stop()
    assert [r.getMessage() for r in caplog.records if "handler raised" in r.getMessage()] == []
    assert all(path == "/org/bluez" or path.startswith("/org/bluez/hci0") for path in kept), kept


async def echo_once(client: BleakClient, payload: bytes) -> bytes:
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    await client.start_notify(TX_CHAR, lambda _c, data: inbox.put_nowait(bytes(data)))
    await client.write_gatt_char(RX_CHAR, payload, response=True)
    value = await asyncio.wait_for(inbox.get(), timeout=3)
    await client.stop_notify(TX_CHAR)
    return value


async def assert_serves_next_connection() -> None:
    async with BleakClient(await find()) as client:
        assert await echo_once(client, b"next") == b"next"


async def test_refused_twice_then_accepted_with_retry(sim: Simulator, peripheral: EchoPeripheral) -> None:
    sim.refuse_connect(NAME, times=2)
    device = await find()
    errors = []
    for _attempt in range(3):
        client = BleakClient(device)
        try:
            await client.connect()
        except BleakDBusError as exc:
            errors.append((exc.dbus_error, exc.dbus_error_details))
            continue
        assert await echo_once(client, b"hi") == b"hi"
        await client.disconnect()
        break
    assert errors == [("org.bluez.Error.Failed", "le-connection-abort-by-remote")] * 2


async def test_delayed_connect_times_out_then_succeeds(sim: Simulator, peripheral: EchoPeripheral) -> None:
    sim.delay_connect(NAME, 1.0)
    device = await find()
    with pytest.raises(TimeoutError):
        await BleakClient(device, timeout=0.3).connect()
    sim.delay_connect(NAME, 0.0)
    await assert_serves_next_connection()


@pytest.mark.parametrize("when", ["before-write", "after-write"])
async def test_link_dropped_around_write(
    sim: Simulator, peripheral: EchoPeripheral, when: str
) -> None:
    disconnected = asyncio.Event()
    async with BleakClient(await find(), disconnected_callback=lambda _c: disconnected.set()) as c:
        await sim.drop_link(NAME, when)
        with pytest.raises(BleakDBusError) as info:
            await c.write_gatt_char(RX_CHAR, b"payload", response=True)
        assert info.value.dbus_error == "org.bluez.Error.Failed"
        assert info.value.dbus_error_details == "Not connected"
        await asyncio.wait_for(disconnected.wait(), timeout=3)
    assert peripheral.writes == ([] if when == "before-write" else [b"payload"])
    await assert_serves_next_connection()


async def test_att_error_on_next_operation(sim: Simulator, peripheral: EchoPeripheral) -> None:
    async with BleakClient(await find()) as client:
        sim.att_error_next(NAME, 0x0E)
        with pytest.raises(BleakGATTProtocolError) as info:
            await client.read_gatt_char(TX_CHAR)
        assert info.value.code == 0x0E
        sim.att_error_next(NAME, 0x03)
        with pytest.raises(BleakGATTProtocolError) as info:
            await client.write_gatt_char(RX_CHAR, b"x", response=True)
        assert info.value.code == 0x03
        assert await echo_once(client, b"ok") == b"ok"


async def test_lost_notification(sim: Simulator, peripheral: EchoPeripheral) -> None:
    async with BleakClient(await find()) as client:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        await client.start_notify(TX_CHAR, lambda _c, data: inbox.put_nowait(bytes(data)))
        sim.lose_notifications(NAME, 1)
        await client.write_gatt_char(RX_CHAR, b"lost", response=True)
        await client.write_gatt_char(RX_CHAR, b"kept", response=True)
        assert await asyncio.wait_for(inbox.get(), timeout=3) == b"kept"
        assert inbox.empty()


async def test_rssi_change_is_seen_by_scanner(sim: Simulator, peripheral: EchoPeripheral) -> None:
    sim.set_rssi(NAME, -80)
    found = await BleakScanner.discover(timeout=0.3, return_adv=True)
    assert [a.rssi for d, a in found.values() if d.name == NAME] == [-80]


async def test_out_of_range(sim: Simulator, peripheral: EchoPeripheral) -> None:
    device = await find()
    sim.set_in_range(NAME, False)
    found = await BleakScanner.discover(timeout=0.3, return_adv=True)
    assert NAME not in {a.local_name for _d, a in found.values()}
    with pytest.raises(TimeoutError):
        await BleakClient(device, timeout=0.5).connect()
    sim.set_in_range(NAME, True)
    await assert_serves_next_connection()


async def test_supervision_timeout(sim: Simulator, peripheral: EchoPeripheral) -> None:
    disconnected = asyncio.Event()
    async with BleakClient(await find(), disconnected_callback=lambda _c: disconnected.set()) as c:
        sim.supervision_timeout(NAME)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BleakDBusError) as info:
            await c.write_gatt_char(RX_CHAR, b"void", response=True)
        assert info.value.dbus_error_details == "Not connected"
        assert loop.time() - started >= 0.25  # silent until the 300 ms timeout
        await asyncio.wait_for(disconnected.wait(), timeout=3)
    assert peripheral.writes == []
    await assert_serves_next_connection()


async def test_long_read_exposes_bless_offset_quirk() -> None:
    async with Simulator(mtu=23):
        echo = EchoPeripheral(NAME)
        await echo.start()
        try:
            async with BleakClient(await find()) as client:
                value = bytes(await client.read_gatt_char(LONG_CHAR))
        finally:
            await echo.stop()
    # bless ignores ReadValue's offset, so every Read Blob returns the first
    # MTU-1 bytes again; BlueZ keeps reading until 512 bytes.
    assert value == (LONG_VALUE[:22] * 24)[:512]


async def test_reset_disconnects_everyone(sim: Simulator, peripheral: EchoPeripheral) -> None:
    disconnected = asyncio.Event()
    client = BleakClient(await find(), disconnected_callback=lambda _c: disconnected.set())
    await client.connect()
    await sim.reset()
    await asyncio.wait_for(disconnected.wait(), timeout=3)
    await assert_serves_next_connection()


@pytest.mark.parametrize(
    ("mfr_len", "text"),
    [(7, "Failed to register advertisement"), (10, "Failed to parse advertisement.")],
)
async def test_advertisement_over_31_bytes_rejected(sim: Simulator, mfr_len: int, text: str) -> None:
    echo = EchoPeripheral("Doorstep-BIG0", manufacturer_data=b"\x00" * mfr_len)
    with pytest.raises(DBusError) as info:
        await echo.start()
    assert info.value.type == "org.bluez.Error.Failed"
    assert info.value.text == text
    await echo.stop()
    assert sim.peripherals() == []
