"""bleak and bless in separate processes over ``doorstep sim`` (a third process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest
from bleak import BleakClient, BleakScanner

from bluezsim import SimProcess
from bluezsim.echo_peripheral import (
    COMPANY_ID,
    DS1_SERVICE,
    INFO_CHAR,
    INFO_VALUE,
    RX_CHAR,
    TX_CHAR,
    EchoPeripheralProcess,
)
from tests.bluezsim_helpers import CENTRAL_WRITER

pytestmark = pytest.mark.timeout(60)


async def _round_trips(client: BleakClient, payloads: list[bytes]) -> list[bytes]:
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    await client.start_notify(TX_CHAR, lambda _c, data: inbox.put_nowait(bytes(data)))
    received = []
    for payload in payloads:
        await client.write_gatt_char(RX_CHAR, payload, response=True)
        received.append(await asyncio.wait_for(inbox.get(), timeout=5))
    await client.stop_notify(TX_CHAR)
    return received


@pytest.mark.parametrize("mtu", [23, 247])
async def test_discover_connect_read_notify_write(
    mtu: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with SimProcess(mtu=mtu) as sim:
        for key, value in sim.env().items():
            monkeypatch.setenv(key, value)
        async with EchoPeripheralProcess(sim.env(), first=0x1A2B):
            found = await BleakScanner.discover(timeout=0.5, return_adv=True)
            matches = [(d, a) for d, a in found.values() if d.name == "Doorstep-1A2B"]
            assert len(matches) == 1
            device, adv = matches[0]
            assert adv.local_name == "Doorstep-1A2B"
            assert adv.manufacturer_data == {COMPANY_ID: b"\x01\x02\x03"}
            assert adv.service_uuids == [DS1_SERVICE]
            assert adv.rssi == -55

            async with BleakClient(device) as client:
                rx = client.services.get_characteristic(RX_CHAR)
                assert rx is not None
                assert rx.max_write_without_response_size == mtu - 3
                info = await client.read_gatt_char(INFO_CHAR)
                assert bytes(info) == INFO_VALUE and len(info) == 19
                # Values as large as one write without response carries.
                payloads = [bytes([i]) * (mtu - 3) for i in range(10)]
                assert await _round_trips(client, payloads) == payloads


async def test_central_killed_mid_write_leaves_peripheral_usable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with SimProcess() as sim:
        for key, value in sim.env().items():
            monkeypatch.setenv(key, value)
        async with EchoPeripheralProcess(sim.env()):
            central = await asyncio.create_subprocess_exec(
                sys.executable,
                CENTRAL_WRITER,
                "Doorstep-0001",
                env=sim.env(),
                stdout=asyncio.subprocess.PIPE,
            )
            assert central.stdout is not None
            line = await asyncio.wait_for(central.stdout.readline(), timeout=30)
            assert line.strip() == b"WRITING"
            await asyncio.sleep(0.1)
            central.send_signal(signal.SIGKILL)
            await central.wait()

            device = await BleakScanner.find_device_by_name("Doorstep-0001", timeout=5)
            assert device is not None
            async with BleakClient(device) as client:
                assert await _round_trips(client, [b"after", b"kill"]) == [b"after", b"kill"]


async def test_32_peripherals_in_one_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    async with SimProcess() as sim:
        for key, value in sim.env().items():
            monkeypatch.setenv(key, value)
        async with EchoPeripheralProcess(sim.env(), count=32) as peripherals:
            found = await BleakScanner.discover(timeout=1.0, return_adv=True)
            names = {a.local_name for _d, a in found.values()}
            assert set(peripherals.names) <= names
            assert len({d.address for d, _a in found.values()}) >= 32


def _state(pid: int) -> str:
    """A process's state letter (``Z`` a zombie), or "" once it is gone."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return ""


def _bus_daemons_of(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and b"dbus-daemon" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


async def test_a_simulator_killed_with_sigkill_takes_its_bus_daemon_with_it() -> None:
    """The private dbus-daemon runs in its own session; a ``doorstep sim`` that was
    killed (no clean stop) left it running for good."""
    sim = SimProcess()
    await sim.start()
    (daemon,) = _bus_daemons_of(sim.pid)
    try:
        os.kill(sim.pid, signal.SIGKILL)
        for _ in range(200):
            if _state(daemon) in ("", "Z"):
                break
            await asyncio.sleep(0.05)
        assert _state(daemon) in ("", "Z"), "the bus daemon is still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)
        await sim.stop()
