"""The whole DS1 onboarding over bleak ↔ simulated BlueZ ↔ bless, in separate processes.

The device is the real ``DeviceRuntime`` on ``BlessPeripheral`` in its own
process (``tests/ble_device_proc.py``); the commissioner is the real
``phone.commissioner.Onboarding`` on ``BleakCentral`` in the test process;
``doorstep sim`` is a third process. The cloud's computations run in-process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ble.bleak_central import BleakCentral
from ble.errors import DeviceBusy, Disconnected
from ble.memory import MemoryAir
from ble.profile import FLAG_WINDOW_OPEN, AdvState
from ble_helpers import (
    GOOD,
    DeviceProcess,
    RecordingCentral,
    bus_environment,
    central_process,
    find,
    onboard,
    read_line,
    write_factory,
)
from bluezsim import SimProcess
from device.runtime import DeviceRuntime
from device.storage import DeviceStore
from device.wifi import WifiEnvironment
from ds1_pair import LocalCloud
from onboarding_helpers import LocalBindService, ScriptedCommissioner, ScriptedDeviceUser
from phone.commissioner import Onboarding, OnboardingReport, Stage, StageState

pytestmark = pytest.mark.timeout(60)


def _running_stages(delegate: ScriptedCommissioner) -> list[Stage]:
    return [stage for stage, state, _ in delegate.stages if state is StageState.RUNNING]


@pytest.mark.parametrize("mtu", [23, 247])
async def test_discovery_info_and_onboarding_over_the_air(tmp_path: Path, mtu: int) -> None:
    async with SimProcess(mtu=mtu) as sim:
        with bus_environment(sim.env()):
            factory, factory_path = write_factory(tmp_path)
            async with DeviceProcess(sim.env(), factory_path, tmp_path / "state") as device:
                central = RecordingCentral()
                await sim.control.set_rssi(device.name, -71)
                sighting = await find(central, device.name, timeout=5)
                assert sighting.name == factory.ble_name == "Doorstep-0142"
                assert sighting.address == device.address
                assert sighting.status.state is AdvState.UNPROVISIONED
                assert sighting.status.flags == FLAG_WINDOW_OPEN
                assert sighting.rssi == -71 and sighting.bars == 2

                link = await central.connect(sighting.address, timeout=5)
                assert link.mtu == mtu and link.max_fragment == mtu - 3
                info = await link.read_info()
                assert info.dev_id == factory.dev_id
                assert info.status.state is AdvState.BUSY  # a commissioner is connected
                await link.disconnect()
                await link.disconnect()  # idempotent
                with pytest.raises(Disconnected):
                    await link.write(b"\x80\x00\x01\x01")
                await find(central, device.name, state=AdvState.UNPROVISIONED, timeout=5)

                mark = len(device.lines)
                delegate = ScriptedCommissioner(choices=[GOOD])
                report, cloud = await onboard(central, factory, sighting.address, delegate=delegate)
                assert report.ok, report.message
                assert report.handshake_round_trips == 3
                assert _running_stages(delegate)[:3] == [Stage.CONNECT, Stage.VERIFY, Stage.SECURE]
                assert delegate.codes and any(
                    n.ssid == b"DoorstepHome" for n in delegate.seen_networks
                )
                ota = central.links[-1]
                assert 0 < ota.largest_write <= mtu - 3
                assert 0 < ota.largest_notification <= mtu - 3
                if mtu > 23:  # the device learnt the MTU from BlueZ, not only 20
                    assert ota.largest_notification > 20
                # RESULT 0 closed the window; the device is free again, not provisioned yet
                await device.wait_line("STATUS 0 0", after=mark)
                stored = DeviceStore(tmp_path / "state").load()
                assert stored.pending is not None and stored.active is None
                assert stored.pending.identity.identifier == report.identifier
                assert report.identifier == cloud.completed[0].identifier
                assert stored.pending.wifi.ssid == b"DoorstepHome"


async def test_busy_device_is_refused_and_a_second_central_is_dropped(tmp_path: Path) -> None:
    async with SimProcess() as sim:
        with bus_environment(sim.env()):
            _factory, factory_path = write_factory(tmp_path)
            async with DeviceProcess(sim.env(), factory_path, tmp_path / "state") as device:
                first = BleakCentral()
                seen = await find(first, device.name)
                link = await first.connect(seen.address, timeout=5)
                # Another commissioner sees the device BUSY and does not even try.
                other = BleakCentral()
                busy = await find(other, device.name, state=AdvState.BUSY)
                with pytest.raises(DeviceBusy) as caught:
                    await other.connect(busy.address, timeout=5)
                assert caught.value.code == "busy" and int(caught.value.status) == 9
                # One that connects without looking (another process, another
                # adapter) is dropped by the device at once ...
                # (its connect fails, or its link drops right after it).
                intruder = await central_process(sim.env(), seen.address, "hold")
                first_line = await read_line(intruder)
                if first_line == "CONNECTED":
                    assert await read_line(intruder) == "ENDED Disconnected"
                else:
                    assert first_line == "FAILED ConnectFailed"
                await intruder.wait()
                # ... while the first link is untouched.
                assert (await link.read_info()).status.state is AdvState.BUSY
                await link.disconnect()
                await find(first, device.name, state=AdvState.UNPROVISIONED)


async def test_hub_onboards_two_devices_at_once(tmp_path: Path) -> None:
    async with SimProcess(mtu=185) as sim:
        with bus_environment(sim.env()):
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            fa, pa = write_factory(tmp_path / "a", seed=1)
            fb, pb = write_factory(tmp_path / "b", seed=2)
            async with (
                DeviceProcess(sim.env(), pa, tmp_path / "a" / "state") as da,
                DeviceProcess(sim.env(), pb, tmp_path / "b" / "state") as db,
            ):
                hub = RecordingCentral()  # one central, one BleakClient per link
                sa = await find(hub, da.name)
                sb = await find(hub, db.name)
                (ra, _), (rb, _) = await asyncio.gather(
                    onboard(hub, fa, sa.address), onboard(hub, fb, sb.address)
                )
                assert ra.ok and rb.ok, (ra.message, rb.message)
                assert {link.address for link in hub.links} == {sa.address, sb.address}
                for sub in ("a", "b"):
                    assert DeviceStore(tmp_path / sub / "state").load().pending is not None


async def test_a_peripheral_starting_beside_a_central_stays_out_of_its_view(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub is a bless peripheral and a bleak central on one bus; so is every simulation.

    bleak watches everything under ``/org/bluez/`` and takes a GATT service
    there for one of BlueZ's (which names its device); bless's own application
    objects must not be there, or every central on the bus logged a traceback
    for each of them (``KeyError: 'Device'``) and kept them as BlueZ objects.
    """
    from bleak.backends.bluezdbus.manager import get_global_bluez_manager

    async with SimProcess() as sim:
        with bus_environment(sim.env()):
            manager = await get_global_bluez_manager()  # the central listens from here on
            _factory, factory_path = write_factory(tmp_path)
            async with DeviceProcess(sim.env(), factory_path, tmp_path / "state") as device:
                central = BleakCentral()
                seen = await find(central, device.name)
                link = await central.connect(seen.address, timeout=5)
                assert (await link.read_info()).status.state is AdvState.BUSY
                await link.disconnect()
                kept = sorted(manager._properties)
    raised = [r.getMessage() for r in caplog.records if "handler raised" in r.getMessage()]
    assert raised == []
    # Only BlueZ's (simulated) objects: /org/bluez, the adapter and the device it found.
    assert any(path.startswith("/org/bluez/hci0/dev_") for path in kept), kept
    assert all(path == "/org/bluez" or path.startswith("/org/bluez/hci0") for path in kept), kept


def _summary(report: OnboardingReport, delegate: ScriptedCommissioner) -> tuple[object, ...]:
    s = report.stats
    return (
        report.status,
        report.handshake_round_trips,
        s.writes,
        s.notifications,
        s.bytes_to_device,
        s.bytes_from_device,
        _running_stages(delegate),
    )


async def test_same_flow_on_memory_and_over_bluez(tmp_path: Path) -> None:
    """Parity: the scripted flow gives the same outcome, stages and traffic on both transports."""
    factory, factory_path = write_factory(tmp_path)
    # in memory
    air = MemoryAir(mtu=23)
    wifi = WifiEnvironment.default()
    wifi.set_join_delay(0)
    (tmp_path / "mem").mkdir()
    runtime = DeviceRuntime(
        factory,
        DeviceStore(tmp_path / "mem" / "state"),
        air.peripheral("C8:2B:96:1A:01:42"),
        wifi,
        ScriptedDeviceUser(),
        None,
    )
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()
    mem_delegate = ScriptedCommissioner(choices=[GOOD])
    mem_report = await Onboarding(
        air.central(), LocalBindService(LocalCloud(factory)), mem_delegate, wait_checkin_s=0
    ).run("C8:2B:96:1A:01:42")
    runtime.stop()
    await asyncio.wait_for(task, 5)
    # over the (simulated) air
    async with SimProcess(mtu=23) as sim:
        with bus_environment(sim.env()):
            async with DeviceProcess(sim.env(), factory_path, tmp_path / "state") as device:
                central = BleakCentral()
                seen = await find(central, device.name)
                ota_delegate = ScriptedCommissioner(choices=[GOOD])
                ota_report, _ = await onboard(central, factory, seen.address, delegate=ota_delegate)
    assert mem_report.ok and ota_report.ok
    assert _summary(mem_report, mem_delegate) == _summary(ota_report, ota_delegate)
