"""Radio faults between bleak and bless: the error each side sees, and a clean recovery.

One simulator process (MTU 23, supervision timeout 1.2 s) and one device
process (``DeviceRuntime`` on ``BlessPeripheral``) serve the whole module;
before each test the simulator's faults and links are reset and the device's
pairing button is pressed (which also clears the §5.6 back-off that failed
sessions earn). After each fault the device must advertise UNPROVISIONED
again and a fresh commissioner must onboard it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from ble.bleak_central import BleakCentral, BleakLink
from ble.errors import (
    ConnectFailed,
    DeviceNotFound,
    Disconnected,
    LinkError,
    LinkTimeout,
)
from ble.profile import FLAG_WINDOW_OPEN, AdvState, DeviceStatus
from ble_helpers import (
    GOOD,
    DeviceProcess,
    bus_environment,
    central_process,
    find,
    onboard,
    read_line,
    write_factory,
)
from bluezsim import SimProcess
from onboarding_helpers import ScriptedCommissioner
from phone.commissioner import Stage, StageState
from protocol.commissioner_side import CommissionerSession
from protocol.errors import Status
from protocol.factory import FactoryRecord

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]


@dataclass
class Air:
    sim: SimProcess
    device: DeviceProcess
    factory: FactoryRecord
    address: str


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def air(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Air]:
    tmp = tmp_path_factory.mktemp("ble_faults")
    async with SimProcess(mtu=23, extra_args=["--supervision-timeout-ms", "1200"]) as sim:
        with bus_environment(sim.env()):
            factory, path = write_factory(tmp)
            async with DeviceProcess(sim.env(), path, tmp / "state") as device:
                yield Air(sim, device, factory, device.address)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def clean(air: Air) -> None:
    await air.sim.control.reset()
    await air.device.command("button")
    await advertising_again(air)


async def advertising_again(air: Air) -> None:
    """Wait until the device advertises UNPROVISIONED with its pairing window open."""
    async with contextlib.aclosing(BleakCentral().scan(timeout=10)) as sightings:
        async for s in sightings:
            if s.name == air.device.name and s.status == DeviceStatus(
                AdvState.UNPROVISIONED, FLAG_WINDOW_OPEN
            ):
                return
    raise AssertionError("the device does not advertise UNPROVISIONED with its window open")


async def onboards(air: Air) -> None:
    report, _ = await onboard(BleakCentral(), air.factory, air.address)
    assert report.ok, report.message


class FaultAt(ScriptedCommissioner):
    """A scripted commissioner that arms a simulator fault when a stage starts."""

    def __init__(self, stage: Stage, arm: Callable[[], Awaitable[None]]) -> None:
        super().__init__(choices=[GOOD])
        self._stage, self._arm = stage, arm

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        await super().stage_changed(stage, state, detail)
        if stage is self._stage and state is StageState.RUNNING:
            await self._arm()


# ---- the adapter's own errors (exact type and code) ----------------------------------


async def _connect(air: Air) -> BleakLink:
    return await BleakCentral().connect(air.address, timeout=5)


async def _send_hello(link: BleakLink) -> None:
    session = CommissionerSession(
        rng=os.urandom, clock=asyncio.get_running_loop().time, max_fragment=link.max_fragment
    )
    session.start()
    for fragment in session.data_to_send():
        await link.write(fragment)


async def test_dropped_link_is_disconnected(air: Air) -> None:
    link = await _connect(air)
    await air.sim.control.drop_link(air.address, "before-write")
    with pytest.raises(Disconnected) as caught:
        await link.write(b"\x80\x00\x01\x01")
    assert caught.value.code == "disconnected" and caught.value.status is Status.PROTOCOL_ERROR
    with pytest.raises(Disconnected):
        await link.receive(timeout=1)
    await link.disconnect()

    link = await _connect(air)
    await air.sim.control.drop_link(air.address, "now")
    with pytest.raises(Disconnected):
        await link.receive(timeout=5)
    with pytest.raises(Disconnected):
        await link.read_info()


async def test_att_error_is_a_link_error_with_its_code(air: Air) -> None:
    link = await _connect(air)
    await air.sim.control.att_error_next(air.address, 0x0E)
    with pytest.raises(LinkError) as caught:
        await link.write(b"\x80\x00\x01\x01")
    assert type(caught.value) is LinkError
    assert caught.value.code == "att_error_0x0e" and caught.value.status is Status.PROTOCOL_ERROR
    assert (await link.read_info()).status.state is AdvState.BUSY  # the link survives
    await link.disconnect()


async def test_lost_notifications_time_out(air: Air) -> None:
    link = await _connect(air)
    await air.sim.control.lose_notifications(air.address, 50)  # all of M2
    await _send_hello(link)
    with pytest.raises(LinkTimeout) as caught:
        await link.receive(timeout=0.5)
    assert caught.value.code == "link_timeout" and caught.value.status is Status.TIMED_OUT
    await link.disconnect()


async def test_supervision_timeout_is_a_link_timeout(air: Air) -> None:
    link = await _connect(air)
    await air.sim.control.supervision_timeout(air.address)
    with pytest.raises(LinkTimeout) as caught:
        await link.write(b"\x80\x00\x01\x01")
    assert caught.value.code == "link_timeout" and caught.value.status is Status.TIMED_OUT
    with pytest.raises(LinkTimeout):
        await link.receive(timeout=1)


async def test_out_of_range(air: Air) -> None:
    with pytest.raises(DeviceNotFound) as not_found:
        await BleakCentral().connect("C0:DE:5A:00:0F:FF", timeout=0.5)  # nobody there
    assert not_found.value.code == "device_not_found"
    assert not_found.value.status is Status.TIMED_OUT
    knows_it = BleakCentral()
    await find(knows_it, air.device.name)
    await air.sim.control.set_in_range(air.address, False)
    try:
        # BlueZ still knows the device: the connect itself times out.
        with pytest.raises(ConnectFailed) as failed:
            await knows_it.connect(air.address, timeout=1.0)
        assert failed.value.code == "connect_failed" and failed.value.status is Status.TIMED_OUT
        # A commissioner that never saw it does not find it.
        stranger = await central_process(air.sim.env(), air.address, "hold", timeout=1.0)
        assert await read_line(stranger) == "FAILED DeviceNotFound"
        await stranger.wait()
    finally:
        await air.sim.control.set_in_range(air.address, True)


async def test_connect_retries_then_gives_up(air: Air) -> None:
    await air.sim.control.refuse_connect(air.address, 2)
    link = await _connect(air)  # third attempt
    assert (await link.read_info()).status.state is AdvState.BUSY
    await link.disconnect()
    await advertising_again(air)
    await air.sim.control.refuse_connect(air.address, 100)
    with pytest.raises(ConnectFailed) as caught:
        await _connect(air)
    assert caught.value.code == "connect_failed"
    assert "le-connection-abort-by-remote" in caught.value.message


# ---- the onboarding flow under faults, and the device's recovery ----------------------


@pytest.mark.parametrize(
    ("name", "stage", "status"),
    [
        ("drop-before-write", Stage.SECURE, Status.PROTOCOL_ERROR),
        ("drop-after-write", Stage.SECURE, Status.PROTOCOL_ERROR),
        ("att-error", Stage.SECURE, Status.PROTOCOL_ERROR),
        # at MTU 23, M2 is several fragments: losing its first is a §3 counter gap
        ("lose-notification", Stage.VERIFY, Status.PROTOCOL_ERROR),
        ("supervision-timeout", Stage.VERIFY, Status.TIMED_OUT),
        ("refused-twice", None, Status.OK),
        ("refused-always", Stage.CONNECT, Status.TIMED_OUT),
    ],
)
async def test_onboarding_under_fault(
    air: Air, name: str, stage: Stage | None, status: Status
) -> None:
    control = air.sim.control
    arms: dict[str, tuple[Stage, Callable[[], Awaitable[None]]]] = {
        "drop-before-write": (Stage.SECURE, lambda: control.drop_link(air.address, "before-write")),
        "drop-after-write": (Stage.SECURE, lambda: control.drop_link(air.address, "after-write")),
        "att-error": (Stage.SECURE, lambda: control.att_error_next(air.address, 0x0E)),
        "lose-notification": (Stage.VERIFY, lambda: control.lose_notifications(air.address, 1)),
        "supervision-timeout": (Stage.VERIFY, lambda: control.supervision_timeout(air.address)),
        "refused-twice": (Stage.CONNECT, lambda: control.refuse_connect(air.address, 2)),
        "refused-always": (Stage.CONNECT, lambda: control.refuse_connect(air.address, 100)),
    }
    at, arm = arms[name]
    delegate = FaultAt(at, arm)
    report, cloud = await onboard(BleakCentral(), air.factory, air.address, delegate=delegate)
    assert report.status is status, report.message
    if stage is not None:
        assert report.stage is stage
        assert cloud.completed == []
    # The device is clean and advertising; the next commissioner succeeds.
    await control.reset()
    await air.device.command("button")  # clears the back-off a session after M2 earns
    await advertising_again(air)
    await onboards(air)


async def test_commissioner_leaving_mid_message_leaves_device_clean(air: Air) -> None:
    """Half of M3's fragments, then the commissioner disconnects."""

    class HalfM3(BleakCentral):
        link: BleakLink | None = None

        async def connect(self, address: str, *, timeout: float = 20.0) -> BleakLink:
            self.link = await super().connect(address, timeout=timeout)
            return self.link

    central = HalfM3()
    sent: list[bytes] = []  # M3's fragments that reached the air

    class Leaver(ScriptedCommissioner):
        async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
            await super().stage_changed(stage, state, detail)
            if stage is not Stage.SECURE or state is not StageState.RUNNING:
                return
            link = central.link
            assert link is not None
            real_write, size = link.write, link.max_fragment
            half = [1 << 30]

            async def write(fragment: bytes) -> None:
                if fragment[0] & 0x80:  # FIRST carries M3's u16 length (§3)
                    length = int.from_bytes(fragment[1:3], "big")
                    half[0] = (1 + -(-(length - (size - 3)) // (size - 1))) // 2
                if len(sent) >= half[0]:
                    await link.disconnect()
                    raise Disconnected("the commissioner left")
                await real_write(fragment)
                sent.append(fragment)

            link.write = write  # type: ignore[method-assign]

    report, _ = await onboard(central, air.factory, air.address, delegate=Leaver(choices=[GOOD]))
    assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.SECURE
    assert len(sent) >= 5 and sent[0][0] & 0x80  # M3 is ≥ 10 fragments at MTU 23
    await advertising_again(air)
    await asyncio.sleep(1.1)  # the 1 s back-off of §5.6 (M2 sent, no M3 accepted)
    await onboards(air)


async def test_killed_client_mid_write_leaves_sim_and_device_usable(air: Air) -> None:
    env = air.sim.env()
    proc = await central_process(env, air.address, "write")
    assert await read_line(proc) == "CONNECTED"
    assert await read_line(proc) == "WRITING"
    await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await advertising_again(air)
    await onboards(air)
