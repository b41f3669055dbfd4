"""The device runtime's clocks, in-process: the 60 s user prompt and the §5.6 back-off.

A real ``DeviceRuntime`` (storage, Wi-Fi environment) on the in-memory air,
with injected clocks moved by hand: ``clock`` drives the session timers
(§5.3 step 3: 60 s for the device's user), ``wall_clock`` the pairing gate
(§5.6: ERROR 10 for ``min(2^(n−1), 64)`` s after ``n`` abandoned sessions).
After moving a clock the test calls ``runtime.wake()`` so the runtime looks
at its timers again. The commissioner is the phone flow or, for sessions that
are abandoned on purpose, the sans-I/O session driven by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ble.memory import MemoryAir
from ble.profile import AdvState, Sighting
from device.cloudlink import CloudCheckin
from device.runtime import CheckinService, DeviceRuntime
from device.storage import DeviceState, DeviceStore
from device.wifi import WifiEnvironment
from device_process_helpers import GOOD, hello_status
from ds1_pair import LocalCloud, make_factory
from onboarding_helpers import LocalBindService, ScriptedCommissioner, ScriptedDeviceUser
from phone.commissioner import NetworkChoice, Onboarding, Stage
from protocol.errors import Status
from protocol.factory import FactoryRecord

pytestmark = pytest.mark.timeout(60)

ADDRESS = "C8:2B:96:1A:01:42"


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def device(
    air: MemoryAir,
    factory: FactoryRecord,
    state_dir: Path,
    user: ScriptedDeviceUser,
    *,
    clock: Callable[[], float] | None = None,
    wall_clock: Callable[[], float] | None = None,
    checkin: CheckinService | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncIterator[DeviceRuntime]:
    wifi = WifiEnvironment.default()
    wifi.set_join_delay(0)
    kwargs: dict[str, Any] = {}
    if clock is not None:
        kwargs["clock"] = clock
    if wall_clock is not None:
        kwargs["wall_clock"] = wall_clock
    if sleep is not None:
        kwargs["sleep"] = sleep
    runtime = DeviceRuntime(
        factory, DeviceStore(state_dir), air.peripheral(ADDRESS), wifi, user, checkin, **kwargs
    )
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()
    try:
        yield runtime
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 5)


async def sighting(air: MemoryAir) -> Sighting:
    (seen,) = [s async for s in air.central().scan()]
    return seen


async def settle(until: Callable[[], bool]) -> None:
    """Let the runtime run (and its saves, which go through a thread) until ``until`` holds."""
    for i in range(2000):
        if until():
            return
        await asyncio.sleep(0 if i < 100 else 0.005)
    raise AssertionError("the runtime did not get there")


async def test_device_user_silent_for_60s_is_a_rejection(tmp_path: Path) -> None:
    clock = Clock(5_000.0)
    air = MemoryAir()
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    user = ScriptedDeviceUser(answer=None)  # never answers
    async with device(air, factory, tmp_path / "state", user, clock=clock) as runtime:
        delegate = ScriptedCommissioner(choices=[GOOD])
        flow = asyncio.create_task(Onboarding(air.central(), cloud, delegate).run(ADDRESS))
        await settle(lambda: bool(user.requests))
        (request,) = user.requests
        assert request.deadline_s == 60 and request.ssid == "DoorstepHome"
        assert (await sighting(air)).status.state is AdvState.BUSY

        clock.advance(59)
        runtime.wake()
        for _ in range(50):
            await asyncio.sleep(0)
        assert not flow.done()  # 59 s: still waiting for the user
        assert runtime.session is not None and not runtime.session.closed

        clock.advance(2)
        runtime.wake()
        report = await asyncio.wait_for(flow, 5)
        assert report.status is Status.REJECTED_BY_USER
        assert report.stage is Stage.JOIN
        assert cloud.completed == []

        stored = DeviceStore(tmp_path / "state").load()
        assert stored.pending is None and stored.active is None and stored.wifi is None
        await settle(lambda: runtime.session is None)
        seen = await sighting(air)
        assert seen.status.state is AdvState.UNPROVISIONED and seen.status.window_open
        assert stored.gate["failures"] == 0  # M3 was accepted: no back-off

        # The next commissioner, with a device user who answers, succeeds.
        user.answer = True
        again = await Onboarding(
            air.central(), cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=0
        ).run(ADDRESS)
        assert again.ok, again.message


async def test_backoff_follows_abandoned_sessions_on_the_wall_clock(tmp_path: Path) -> None:
    wall = Clock(1_700_000_000.0)
    air = MemoryAir()
    factory = make_factory()
    state_dir = tmp_path / "state"
    user = ScriptedDeviceUser()
    central = air.central()

    reader = DeviceStore(state_dir)  # one reader, made before the device runs (see below)

    def failures() -> int:
        return int(reader.load().gate["failures"])

    async with device(air, factory, state_dir, user, wall_clock=wall) as runtime:
        assert await hello_status(central, ADDRESS) is Status.OK  # M2, then no M3: n = 1
        for n in range(1, 9):
            await settle(lambda n=n: failures() == n)  # n is stored as soon as the session ends
            backoff = min(2 ** (n - 1), 64)
            assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED
            wall.advance(backoff - 0.25)
            assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED
            wall.advance(0.25)
            # Back-off over: M1 is answered with M2 — and abandoned again (n + 1).
            assert await hello_status(central, ADDRESS) is Status.OK
        await settle(lambda: failures() == 9)
        seen = await sighting(air)
        assert seen.status.state is AdvState.UNPROVISIONED and seen.status.window_open

    # n survives a power cycle: the restarted device still refuses (64 s cap).
    async with device(air, factory, state_dir, user, wall_clock=wall) as runtime:
        assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED
        wall.advance(63.5)
        assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED
        # The pairing button resets n: M1 is admitted at once.
        runtime.press_button()
        await settle(lambda: failures() == 0)
        cloud = LocalBindService(LocalCloud(factory))
        report = await Onboarding(
            central, cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=0
        ).run(ADDRESS)
        assert report.ok, report.message
        assert failures() == 0


async def test_device_show_while_the_device_saves_does_not_break_the_save(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    shown: list[DeviceState] = []
    armed = [False]  # the start-up save does not count: the device is not serving yet

    def show_meanwhile(step: str) -> None:
        # What `doorstep device show --state DIR` does, at the worst moment for the device.
        if step == "temp_written" and armed[0] and not shown:
            shown.append(DeviceStore(state_dir).load())

    air = MemoryAir()
    factory = make_factory()
    store = DeviceStore(state_dir, owner=True, crash_point=show_meanwhile)
    wifi = WifiEnvironment.default()
    runtime = DeviceRuntime(
        factory, store, air.peripheral(ADDRESS), wifi, ScriptedDeviceUser(), None
    )
    reader = DeviceStore(state_dir)
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()  # the first save (once the radio is up) is not the one
    armed[0] = True
    before = reader.load().gate["window_until"]
    try:
        runtime.press_button()  # a save the owner may well look at with `device show`
        await settle(lambda: task.done() or reader.load().gate["window_until"] != before)
        assert shown, "device show did not run during the save"
        assert not task.done(), f"the device stopped: {task.exception()!r}"
        assert reader.load().gate["window_until"] != before
    finally:
        if not task.done():
            runtime.stop()
            await asyncio.wait_for(task, 5)


# ---- what the device's user reads ----------------------------------------------------------

WAITING = "waiting for a commissioner (pairing window open)"
NEXT_CREDENTIALS = "nothing stored, waiting for the commissioner to send other credentials or leave"


async def test_each_failed_wifi_join_is_one_line_with_its_code_and_what_comes_next(
    tmp_path: Path,
) -> None:
    """The device used to say nothing when it could not join (wrong passphrase, no network)."""
    air = MemoryAir()
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    user = ScriptedDeviceUser()
    wrong = NetworkChoice(b"DoorstepHome", "hunter2-not-it", 1)
    missing = NetworkChoice(b"NoSuchNetwork", "hunter3-elsewhere", 1)
    async with device(air, factory, tmp_path / "state", user) as runtime:
        delegate = ScriptedCommissioner(choices=[wrong, missing])  # then it gives up
        report = await Onboarding(air.central(), cloud, delegate, wait_checkin_s=0).run(ADDRESS)
        assert report.status is Status.NETWORK_NOT_FOUND
        await settle(lambda: len(user.messages) == 4)  # the session's end is told, too
        assert runtime.state.pending is None and runtime.state.active is None
    assert user.messages == [
        f"{factory.ble_name}: {WAITING}",
        "Could not join Wi-Fi 'DoorstepHome': 3 wifi_auth_failed (the access point refused "
        f"the passphrase); {NEXT_CREDENTIALS}",
        "Could not join Wi-Fi 'NoSuchNetwork': 2 network_not_found (no network with that name "
        f"in range); {NEXT_CREDENTIALS}",
        # the commissioner gave up after the failed join: the session ended for its reason
        "Connection from a commissioner failed: 2 network_not_found (commissioner closed the "
        f"session); {WAITING}",
    ]
    shown = "\n".join(user.messages)
    assert "hunter2" not in shown and "hunter3" not in shown


async def test_refused_and_failed_connections_are_told_as_such_not_as_a_new_provisioning(
    tmp_path: Path,
) -> None:
    """Each refused or failed connection used to repeat the state line ("Provisioned as …")."""
    wall = Clock(1_700_000_000.0)
    air = MemoryAir()
    factory = make_factory()
    central = air.central()
    user = ScriptedDeviceUser()
    state_dir = tmp_path / "state"
    async with device(air, factory, state_dir, user, wall_clock=wall):
        assert await hello_status(central, ADDRESS) is Status.OK  # M2, then it leaves
        await settle(lambda: len(user.messages) == 2)
        assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED  # backing off
        await settle(lambda: len(user.messages) == 3)
        wall.advance(1)
        cloud = LocalBindService(LocalCloud(factory))
        report = await Onboarding(
            central, cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=0
        ).run(ADDRESS)
        assert report.ok, report.message
        assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED  # window closed
        assert await hello_status(central, ADDRESS) is Status.WINDOW_CLOSED
        await settle(lambda: len(user.messages) == 6)
    async with device(air, factory, state_dir, user, wall_clock=wall):
        pass  # a restart: its state, once

    short = report.short_id
    backoff = "back-off 1 s after 1 failed session"
    still = f"still provisioned as {short}, not checking in (no cloud URL)"
    assert user.messages == [
        f"{factory.ble_name}: {WAITING}",
        f"Connection from a commissioner failed: 11 protocol_error (disconnected); {backoff}; "
        f"{WAITING}",
        f"Refused a commissioner: 10 window_closed ({backoff}); {WAITING}",
        f"Provisioned: joined Wi-Fi 'DoorstepHome' as {short} (epoch 1); "
        "not checking in (no cloud URL)",
        f"Refused a commissioner: 10 window_closed; {still}",
        f"Refused a commissioner: 10 window_closed; {still}",
        f"{factory.ble_name}: provisioned as {short} (epoch 1), not checking in (no cloud URL)",
    ]


async def test_a_factory_reset_during_a_session_is_one_line_not_a_failure_first(
    tmp_path: Path,
) -> None:
    """It used to print "Connection … failed …; still provisioned as …" before the reset line."""
    air = MemoryAir()
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    user = ScriptedDeviceUser(answer=None)  # still deciding when the reset comes
    async with device(air, factory, tmp_path / "state", user) as runtime:
        flow = asyncio.create_task(
            Onboarding(air.central(), cloud, ScriptedCommissioner(choices=[GOOD])).run(ADDRESS)
        )
        await settle(lambda: bool(user.requests))
        runtime.factory_reset()
        report = await asyncio.wait_for(flow, 5)
        await settle(lambda: user.messages[-1].startswith("Factory reset"))
        assert not report.ok and cloud.completed == []
        stored = DeviceStore(tmp_path / "state").load()
        assert stored.reset_ctr == 1 and stored.pending is None and stored.wifi is None
    assert user.messages == [
        f"{factory.ble_name}: {WAITING}",
        "Factory reset: the commissioner was disconnected; identity and Wi-Fi erased, "
        "pairing window open",
    ]


class CloudComingBack:
    """The device's check-in: a real cloud client against a port where nothing listens
    for the first ``down`` tries (the cloud is unreachable), then the local cloud."""

    def __init__(self, cloud: LocalBindService, down: int) -> None:
        self.cloud = cloud
        self.down = down
        self.tries = 0
        # Bound, never listening, held until close(): connections are refused, and no
        # other process can take the port meanwhile (as one released at once could).
        self.port_holder = socket.socket()
        self.port_holder.bind(("127.0.0.1", 0))
        self.nowhere = CloudCheckin(f"http://127.0.0.1:{self.port_holder.getsockname()[1]}")

    async def close(self) -> None:
        await self.nowhere.close()
        self.port_holder.close()

    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> None:
        self.tries += 1
        if self.tries <= self.down:
            await self.nowhere.checkin(identifier, k_dev, ack)
            raise AssertionError("nothing should listen there")
        await self.cloud.checkin(identifier, k_dev, ack)


async def test_a_failing_checkin_is_told_once_and_its_success_after_it_once(
    tmp_path: Path,
) -> None:
    """A device that could not reach the cloud said "checking in" and nothing else, forever."""
    air = MemoryAir()
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    user = ScriptedDeviceUser()
    service = CloudComingBack(cloud, down=5)
    passphrase = GOOD.passphrase

    async def no_wait(_seconds: float) -> None:  # the back-off is not what is tested here
        await asyncio.sleep(0)

    async with device(
        air, factory, tmp_path / "state", user, checkin=service, sleep=no_wait
    ) as runtime:
        report = await Onboarding(
            air.central(), cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=0
        ).run(ADDRESS)
        assert report.ok, report.message
        await asyncio.wait_for(runtime.onboarded.wait(), 20)
        await settle(lambda: user.messages[-1].startswith("Checked in"))
    await service.close()
    assert service.tries == 6
    short = report.short_id
    assert user.messages == [
        f"{factory.ble_name}: {WAITING}",
        f"Provisioned: joined Wi-Fi 'DoorstepHome' as {short} (epoch 1); "
        "checking in with the cloud",
        "Could not check in with the cloud (the cloud is unreachable); retrying in the "
        "background until it answers",
        f"Checked in with the cloud after 5 failed attempts: onboarded as {short} (epoch 1)",
    ]
    assert passphrase not in "\n".join(user.messages)
