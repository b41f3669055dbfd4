"""The hub's commissioner over the in-memory air: many devices, bounded parallelism, outcomes.

Real device runtimes (one per simulated device) and the hub's real flow;
the cloud's computations in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from ble.memory import MemoryAir
from ble.profile import AdvState
from device.runtime import DeviceRuntime
from device.storage import DeviceStore
from device.wifi import WifiEnvironment, WifiFaults
from ds1_pair import LocalCloud, make_factory
from hub.cli import stopped_line
from hub.registry import HubRegistry, OnboardingRecord
from hub.runtime import DeviceOutcome, DeviceProgress, HubCommissioner, ScriptedOperator
from onboarding_helpers import LocalFleetBindService, ScriptedDeviceUser
from phone.cloudlink import CloudLink
from phone.commissioner import NetworkChoice
from protocol.errors import Status

HOME = NetworkChoice(b"DoorstepHome", "correct horse battery", 1)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, count: int, wifi_faults: dict[int, WifiFaults] | None = None):
    air = MemoryAir()
    cloud = LocalFleetBindService()
    runtimes: list[DeviceRuntime] = []
    tasks = []
    for i in range(count):
        factory = make_factory(seed=i + 1, model=f"Doorstep Plug P{i}")
        cloud.add(LocalCloud(factory))
        wifi = WifiEnvironment.default()
        wifi.set_join_delay(0)
        if wifi_faults and i in wifi_faults:
            wifi.set_faults(wifi_faults[i])
        rt = DeviceRuntime(
            factory,
            DeviceStore(tmp_path / f"dev{i}"),
            air.peripheral(factory.mac_text, rssi=-40 - i),
            wifi,
            ScriptedDeviceUser(),
            cloud,
        )
        runtimes.append(rt)
        tasks.append(asyncio.create_task(rt.run()))
        await rt.started.wait()
    try:
        yield air, cloud, runtimes
    finally:
        for rt in runtimes:
            rt.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def run_hub(
    air: MemoryAir,
    cloud: LocalFleetBindService | CloudLink,
    tmp_path: Path,
    operator: ScriptedOperator,
    expected: int,
    max_parallel: int = 4,
    max_attempts: int = 3,
) -> tuple[HubCommissioner, list[OnboardingRecord], int, list[str]]:
    """Run the hub until ``expected`` devices are settled: (hub, registry rows, peak
    parallel onboardings, the lines the unattended hub prints)."""
    async with HubRegistry(tmp_path / "hub.db") as registry:
        hub = HubCommissioner(
            air.central(),
            cloud,
            operator,
            HOME,
            registry,
            max_parallel=max_parallel,
            max_attempts=max_attempts,
            scan_period_s=0.01,
            retry_base_s=0.01,
        )
        stop = asyncio.Event()
        peak = 0
        lines: list[str] = []  # what the unattended hub prints, one line per outcome

        def watch() -> None:
            nonlocal peak
            active = sum(
                d.progress
                in (
                    DeviceProgress.CONNECTING,
                    DeviceProgress.AWAITING_OPERATOR,
                    DeviceProgress.PROVISIONING,
                )
                for d in hub.devices.values()
            )
            peak = max(peak, active)

        hub.on_change = watch
        hub.on_outcome = lambda outcome: lines.append(outcome.line())
        task = asyncio.create_task(hub.run(stop))
        for _ in range(1000):
            await asyncio.sleep(0.01)
            done = [
                d
                for d in hub.devices.values()
                if d.progress
                in (DeviceProgress.ONBOARDED, DeviceProgress.FAILED, DeviceProgress.REJECTED)
            ]
            if len(done) >= expected and not hub._tasks:
                break
        stop.set()
        await asyncio.wait_for(task, 10)
        return hub, await registry.all(), peak, lines


async def test_hub_onboards_20_devices_4_at_a_time(tmp_path: Path) -> None:
    async with fleet(tmp_path, 20) as (air, cloud, runtimes):
        hub, rows, peak, lines = await run_hub(air, cloud, tmp_path, ScriptedOperator(True), 20)
        assert hub.stats.onboarded == 20, [r.message for r in rows if r.status]
        assert 1 < peak <= 4
        assert sorted(lines) == sorted(
            f"{r.name} ({r.address}): onboarded as {r.identifier[:8]}" for r in rows if r.identifier
        )
        assert len(lines) == 20
        assert len(cloud.completed) == 20
        assert all(r.final and r.status == 0 for r in rows) and len(rows) == 20
        for rt in runtimes:
            await asyncio.wait_for(rt.onboarded.wait(), 5)
            assert rt.current_status().state is AdvState.PROVISIONED
            assert rt.state.wifi is not None and rt.state.wifi.ssid == b"DoorstepHome"


async def test_a_settled_device_stops_waiting(tmp_path: Path) -> None:
    """The console's "Waiting" column went on counting after a device was onboarded."""
    async with fleet(tmp_path, 2, {0: WifiFaults(dhcp_failure=True)}) as (air, cloud, _rt):
        hub, _, _, _ = await run_hub(air, cloud, tmp_path, ScriptedOperator(True), 2)
        for device in hub.devices.values():
            assert device.progress in (DeviceProgress.ONBOARDED, DeviceProgress.FAILED)
            assert device.settled_at is not None
            waited = device.waiting_s(device.settled_at)
            assert device.waiting_s(device.settled_at + 3600) == waited >= 0


async def test_failed_join_reported_and_not_retried(tmp_path: Path) -> None:
    faults = {0: WifiFaults(dhcp_failure=True)}
    async with fleet(tmp_path, 2, faults) as (air, cloud, runtimes):
        hub, rows, _, lines = await run_hub(air, cloud, tmp_path, ScriptedOperator(True), 2)
        failed = [d for d in hub.devices.values() if d.progress is DeviceProgress.FAILED]
        assert len(failed) == 1 and failed[0].attempts == 1
        row = next(r for r in rows if r.address == failed[0].address)
        assert row.status == Status.NO_IP_ADDRESS and row.final
        assert hub.stats.onboarded == 1
        assert runtimes[0].state.pending is None and runtimes[0].state.active is None
        broken, healthy = (rt.factory for rt in runtimes)
        onboarded = next(r for r in rows if r.status == 0)
        # The log used to give counts only: which device, and why not, is one line each,
        # with the reason `doorstep hub devices` records.
        assert row.message
        assert sorted(lines) == sorted(
            [
                f"{broken.ble_name} ({broken.mac_text}): failed: 6 no_ip_address ({row.message})",
                f"{healthy.ble_name} ({healthy.mac_text}): onboarded as "
                f"{(onboarded.identifier or '')[:8]}",
            ]
        )


async def test_a_device_failed_only_because_the_cloud_was_down_is_tried_again_later(
    tmp_path: Path,
) -> None:
    """Its last failed try was final: the hub, restarts included, never tried it again."""
    async with fleet(tmp_path, 1) as (air, _cloud, _runtimes):
        with socket.socket() as unreachable:
            unreachable.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
            link = CloudLink(f"http://127.0.0.1:{unreachable.getsockname()[1]}", "dst_token")
            # One try: after it the device backs off (§5.6), and a retry meets that instead.
            operator = ScriptedOperator(True)
            try:
                _hub, rows, _, lines = await run_hub(
                    air, link, tmp_path, operator, 1, max_attempts=1
                )
            finally:
                await link.aclose()
        assert len(rows) == 1
        assert not rows[0].final  # tried again when its window is next open
        assert lines == [
            "Doorstep-0142 (C8:2B:96:1A:01:42): failed: cloud_unavailable (Cannot reach the "
            "cloud.); will try again once its pairing window is open"
        ]
        # Its row says so too (``hub devices``), not the nearest DS1 status ("timed_out").
        assert (rows[0].status, rows[0].status_name) == (13, "cloud_unavailable")
        async with HubRegistry(tmp_path / "hub.db") as registry:
            assert await registry.finished_addresses() == set()  # a restarted hub tries it


async def test_a_hub_stopped_mid_onboarding_says_how_many_it_cut_short(tmp_path: Path) -> None:
    """A hub stopped while accepting devices said nothing; now its counts, and the
    onboardings it cut short (here one waiting for its operator)."""

    class Undecided:
        asked = asyncio.Event()

        async def confirm(self, device: object) -> bool:
            self.asked.set()
            await asyncio.Event().wait()  # the operator never answers
            return False

    async with fleet(tmp_path, 1) as (air, cloud, _runtimes):
        async with HubRegistry(tmp_path / "hub.db") as registry:
            operator = Undecided()
            hub = HubCommissioner(
                air.central(), cloud, operator, HOME, registry, scan_period_s=0.01
            )
            stop = asyncio.Event()
            task = asyncio.create_task(hub.run(stop))
            await asyncio.wait_for(operator.asked.wait(), 10)
            stop.set()
            await asyncio.wait_for(task, 10)
            (row,) = await registry.all()
    assert (hub.stats.onboarded, hub.stats.cut_short) == (0, 1)
    assert stopped_line(hub.stats) == (
        "stopped: onboarded 0, failed 0, rejected 0; 1 onboarding in progress cut short "
        "(a restarted hub picks it up)"
    )
    hub.stats.cut_short = 2
    assert stopped_line(hub.stats).endswith(
        "; 2 onboardings in progress cut short (a restarted hub picks them up)"
    )
    assert not row.final  # unfinished: a restarted hub settles it


async def test_rejected_device_stays_untouched_and_advertising(tmp_path: Path) -> None:
    async with fleet(tmp_path, 1) as (air, cloud, runtimes):
        operator = ScriptedOperator(False)
        hub, rows, _, lines = await run_hub(air, cloud, tmp_path, operator, 1)
        assert hub.stats.rejected == 1 and operator.asked == [runtimes[0].factory.mac_text]
        factory = runtimes[0].factory
        assert rows[0].message
        assert lines == [
            f"{factory.ble_name} ({factory.mac_text}): rejected: 1 rejected_by_user "
            f"({rows[0].message})"
        ]
        assert rows[0].status == Status.REJECTED_BY_USER and rows[0].final
        rt = runtimes[0]
        await asyncio.sleep(0.02)
        assert rt.state.pending is None and rt.state.active is None
        assert rt.current_status().state is AdvState.UNPROVISIONED
        assert rt.current_status().window_open
        assert cloud.completed == []


async def test_a_device_reset_after_the_hub_onboarded_it_is_onboarded_again(
    tmp_path: Path,
) -> None:
    """The hub used to remember the address for good and never look at the device again."""
    async with fleet(tmp_path, 1) as (air, cloud, runtimes):
        rt = runtimes[0]
        async with HubRegistry(tmp_path / "hub.db") as registry:
            hub = HubCommissioner(
                air.central(), cloud, ScriptedOperator(True), HOME, registry, scan_period_s=0.01
            )
            stop = asyncio.Event()
            task = asyncio.create_task(hub.run(stop))
            try:
                for expected in (1, 2):
                    for _ in range(1000):
                        if hub.stats.onboarded >= expected and not hub._tasks:
                            break
                        await asyncio.sleep(0.01)
                    assert hub.stats.onboarded == expected
                    await asyncio.wait_for(rt.onboarded.wait(), 5)
                    if expected == 1:
                        first = rt.state.active
                        address = rt.factory.mac_text
                        for _ in range(500):  # until the hub has seen it provisioned
                            if address in hub._provisioned_since:
                                break
                            await asyncio.sleep(0.01)
                        rt.factory_reset()
                        rt.press_button()  # the user opens the pairing window again
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)
            rows = await registry.all()
    assert first is not None and rt.state.active is not None
    assert rt.state.active.identifier != first.identifier  # a new identity, a new bind
    assert [r.status for r in rows] == [0, 0] and len(cloud.completed) == 2


def test_outcome_lines_for_a_retry_a_later_try_and_a_hostile_name() -> None:
    """What the unattended hub prints for the outcomes the fleets above do not produce."""
    retry = DeviceOutcome(
        "Doorstep-01A2", "C8:2B:96:1A:01:A2", DeviceProgress.RETRYING, Status.TIMED_OUT,
        "The device did not answer in time.", attempt=1, max_attempts=3, retry_in_s=2.0,
    )  # fmt: skip
    assert retry.line() == (
        "Doorstep-01A2 (C8:2B:96:1A:01:A2): attempt 1/3 failed: 13 timed_out "
        "(The device did not answer in time.); retrying in 2 s"
    )
    later = DeviceOutcome(
        "Doorstep-01A3", "C8:2B:96:1A:01:A3", DeviceProgress.FAILED, Status.WINDOW_CLOSED,
        "The device is not in pairing mode.", final=False,
    )  # fmt: skip
    assert later.line() == (
        "Doorstep-01A3 (C8:2B:96:1A:01:A3): failed: 10 window_closed (The device is not in "
        "pairing mode.); will try again once its pairing window is open"
    )
    hostile = DeviceOutcome(
        "Doorstep-\x1b[2J", "C8:2B:96:1A:01:A4", DeviceProgress.FAILED, Status.PROTOCOL_ERROR,
        "bad\nline",
    )  # fmt: skip
    assert hostile.line() == (
        "Doorstep-?[2J (C8:2B:96:1A:01:A4): failed: 11 protocol_error (bad?line)"
    )
