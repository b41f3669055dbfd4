"""The whole onboarding flow over the in-memory air: device runtime ↔ commissioner flow.

Real peers on both ends (DeviceRuntime with its storage and Wi-Fi environment,
the phone's Onboarding flow) and the cloud's computations between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from ble.memory import MemoryAir
from ble.profile import AdvState
from device.runtime import DeviceRuntime
from device.storage import DeviceStore
from device.wifi import WifiEnvironment
from ds1_pair import LocalCloud, make_factory
from onboarding_helpers import (
    LocalBindService,
    ScriptedCommissioner,
    ScriptedDeviceUser,
)
from phone.commissioner import NetworkChoice, Onboarding, Stage, StageState
from protocol.errors import Status

GOOD = NetworkChoice(b"DoorstepHome", "correct horse battery", 1)
BAD = NetworkChoice(b"DoorstepHome", "wrong passphrase!", 1)


@contextlib.asynccontextmanager
async def running_device(tmp_path: Path, mtu: int = 247, user=None, checkin=True):
    air = MemoryAir(mtu=mtu)
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    wifi = WifiEnvironment.default()
    wifi.set_join_delay(0)
    user = user or ScriptedDeviceUser()
    runtime = DeviceRuntime(
        factory,
        DeviceStore(tmp_path / "state"),
        air.peripheral("C8:2B:96:1A:01:42"),
        wifi,
        user,
        cloud if checkin else None,
    )
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()
    try:
        yield air, runtime, cloud, user
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("mtu", [23, 247])
async def test_onboarding_happy_path(tmp_path: Path, mtu: int) -> None:
    async with running_device(tmp_path, mtu) as (air, runtime, cloud, user):
        (sighting,) = [s async for s in air.central().scan()]
        assert sighting.name == "Doorstep-0142" and sighting.status.state is AdvState.UNPROVISIONED
        assert sighting.status.window_open
        delegate = ScriptedCommissioner(choices=[GOOD])
        report = await Onboarding(air.central(), cloud, delegate, wait_checkin_s=5).run(
            sighting.address, sighting.name
        )
        assert report.ok, report.message
        assert report.checked_in
        assert report.identifier == cloud.completed[0].identifier
        assert delegate.codes == [user.requests[0].sas]  # same code on both ends
        assert user.requests[0].ssid == "DoorstepHome"
        assert any(n.ssid == b"DoorstepHome" for n in delegate.seen_networks)
        assert report.handshake_round_trips == 3
        assert [s for s, _st, _d in delegate.stages if _st.value == "running"][:3] == [
            Stage.CONNECT,
            Stage.VERIFY,
            Stage.SECURE,
        ]
        await asyncio.wait_for(runtime.onboarded.wait(), 5)
        assert runtime.state.active is not None
        assert runtime.state.active.identifier == report.identifier
        assert runtime.state.pending is None
        assert runtime.current_status().state is AdvState.PROVISIONED
        assert not runtime.current_status().window_open
        # the stored state survives a restart
        reloaded = DeviceStore(tmp_path / "state").load()
        assert reloaded.active == runtime.state.active


async def test_wrong_passphrase_then_right_in_same_session(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, _runtime, cloud, user):
        delegate = ScriptedCommissioner(choices=[BAD, GOOD])
        report = await Onboarding(air.central(), cloud, delegate, wait_checkin_s=5).run(
            "C8:2B:96:1A:01:42"
        )
        assert report.ok
        assert [f.status for f in delegate.failures] == [Status.WIFI_AUTH_FAILED]
        assert len(user.requests) == 1  # same SSID: the device asked its user once
        assert len(cloud.completed) == 1


async def test_commissioner_rejects_code(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, runtime, cloud, _user):
        delegate = ScriptedCommissioner(accept_code=False)
        report = await Onboarding(air.central(), cloud, delegate).run("C8:2B:96:1A:01:42")
        assert report.status is Status.REJECTED_BY_USER and report.stage is Stage.CONFIRM
        await asyncio.sleep(0.05)
        assert runtime.session is None
        assert runtime.state.pending is None and runtime.state.active is None
        assert runtime.current_status().state is AdvState.UNPROVISIONED
        assert runtime.gate.failures == 0  # M3 was accepted: no back-off


async def test_device_user_rejects(tmp_path: Path) -> None:
    async with running_device(tmp_path, user=ScriptedDeviceUser(answer=False)) as (
        air,
        runtime,
        cloud,
        _user,
    ):
        delegate = ScriptedCommissioner(choices=[GOOD])
        report = await Onboarding(air.central(), cloud, delegate).run("C8:2B:96:1A:01:42")
        assert report.status is Status.REJECTED_BY_USER and report.stage is Stage.JOIN
        assert "rejected" in report.message.lower()
        assert runtime.state.pending is None
        assert cloud.completed == []


async def test_window_closed_after_provisioning(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, runtime, cloud, _user):
        first = await Onboarding(
            air.central(), cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=5
        ).run("C8:2B:96:1A:01:42")
        assert first.ok
        second = await Onboarding(air.central(), cloud, ScriptedCommissioner(choices=[GOOD])).run(
            "C8:2B:96:1A:01:42"
        )
        assert second.status is Status.WINDOW_CLOSED
        assert "pairing" in second.message.lower() or "button" in second.hint.lower()
        runtime.press_button()
        await asyncio.sleep(0.01)
        third = await Onboarding(
            air.central(), cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=5
        ).run("C8:2B:96:1A:01:42")
        assert third.ok and third.epoch == 2


async def test_cancel_mid_pairing_returns_device_to_advertising(tmp_path: Path) -> None:
    async with running_device(tmp_path, user=ScriptedDeviceUser(answer=None)) as (
        air,
        runtime,
        cloud,
        user,
    ):
        flow = Onboarding(air.central(), cloud, ScriptedCommissioner(choices=[GOOD]))
        task = asyncio.create_task(flow.run("C8:2B:96:1A:01:42"))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if user.requests:
                break
        assert user.requests, "device never asked its user"
        assert runtime.current_status().state is AdvState.BUSY
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(100):
            await asyncio.sleep(0.005)
            if runtime.session is None:
                break
        assert runtime.session is None
        assert runtime.current_status().state is AdvState.UNPROVISIONED
        assert runtime.state.pending is None


def test_os_urandom_is_default_rng() -> None:
    assert Onboarding.__init__.__kwdefaults__["rng"] is os.urandom


async def test_giving_up_after_failed_join_reports_the_wifi_status(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, runtime, cloud, _user):
        delegate = ScriptedCommissioner(choices=[BAD])  # no second choice: give up
        report = await Onboarding(air.central(), cloud, delegate).run("C8:2B:96:1A:01:42")
        assert report.status is Status.WIFI_AUTH_FAILED
        assert "passphrase" in report.message.lower()
        assert runtime.state.pending is None and cloud.completed == []


class GoneWhileChoosingAgain(ScriptedCommissioner):
    """Picks BAD; when asked again after the failed join, the device loses power."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        super().__init__(choices=[BAD])
        self.runtime = runtime

    async def choose_network(self, networks, failure):  # type: ignore[no-untyped-def]
        if failure is None:
            return await super().choose_network(networks, failure)
        self.failures.append(failure)
        self.runtime.stop()
        await asyncio.Event().wait()  # the user is still choosing
        raise AssertionError("not reached")


async def test_device_lost_while_choosing_again_fails_in_choose_network(tmp_path: Path) -> None:
    """It used to be told as a failure of "Join Wi-Fi", the stage before the question."""
    async with running_device(tmp_path) as (air, runtime, cloud, _user):
        delegate = GoneWhileChoosingAgain(runtime)
        report = await Onboarding(air.central(), cloud, delegate).run("C8:2B:96:1A:01:42")
    assert [f.status for f in delegate.failures] == [Status.WIFI_AUTH_FAILED]
    assert report.status is Status.PROTOCOL_ERROR and report.stage is Stage.NETWORK
    assert report.message == "the device disconnected while the network was being chosen"
    assert Stage.JOIN not in report.timings  # the failed try's timing went with it
    assert report.timings[Stage.NETWORK] >= 0
    *_, before, last = delegate.stages
    assert before == (Stage.NETWORK, StageState.RUNNING, "")
    assert last == (Stage.NETWORK, StageState.FAILED, report.message)
    assert cloud.completed == []


async def test_device_user_silent_for_60s_with_injected_clock(tmp_path: Path) -> None:
    clock = [1000.0]
    air = MemoryAir()
    factory = make_factory()
    cloud = LocalBindService(LocalCloud(factory))
    wifi = WifiEnvironment.default()
    user = ScriptedDeviceUser(answer=None)  # never answers
    runtime = DeviceRuntime(
        factory,
        DeviceStore(tmp_path / "state"),
        air.peripheral("C8:2B:96:1A:01:42"),
        wifi,
        user,
        None,
        clock=lambda: clock[0],
    )
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()
    flow = asyncio.create_task(
        Onboarding(air.central(), cloud, ScriptedCommissioner(choices=[GOOD])).run(
            "C8:2B:96:1A:01:42"
        )
    )
    for _ in range(200):
        await asyncio.sleep(0.005)
        if user.requests:
            break
    assert user.requests and user.requests[0].deadline_s == 60
    clock[0] += 59
    runtime.wake()
    await asyncio.sleep(0.02)
    assert not flow.done()
    clock[0] += 2
    runtime.wake()
    report = await asyncio.wait_for(flow, 5)
    assert report.status is Status.REJECTED_BY_USER
    assert runtime.state.pending is None and runtime.state.active is None
    assert runtime.current_status().state is AdvState.UNPROVISIONED
    runtime.stop()
    await task


async def test_stage_timings_add_up(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, _runtime, cloud, _user):
        report = await Onboarding(
            air.central(), cloud, ScriptedCommissioner(choices=[GOOD]), wait_checkin_s=5
        ).run("C8:2B:96:1A:01:42")
        assert report.ok
        assert set(report.timings) == set(Stage)
        assert all(t >= 0 for t in report.timings.values())
        assert sum(report.timings.values()) <= report.total_s + 1e-6


async def test_retry_after_failed_join_times_the_successful_attempt(tmp_path: Path) -> None:
    async with running_device(tmp_path) as (air, _runtime, cloud, _user):
        delegate = ScriptedCommissioner(choices=[BAD, GOOD])
        report = await Onboarding(air.central(), cloud, delegate, wait_checkin_s=5).run(
            "C8:2B:96:1A:01:42"
        )
        assert report.ok
        join_events = [st.value for s, st, _d in delegate.stages if s is Stage.JOIN]
        assert join_events.count("failed") == 1 and join_events[-1] == "done"
        assert set(report.timings) == set(Stage)


class _FailingEntropy:
    """The cloud's entropy source has failed (it then answers 503, fail closed)."""

    def read(self, n: int) -> bytes:
        raise OSError("the entropy source is gone")


@pytest.mark.parametrize("failure", ["cloud error", "cloud unreachable"])
async def test_a_cloud_failure_is_reported_as_the_clouds_not_the_network_or_device(
    tmp_path: Path, failure: str
) -> None:
    """A cloud that answers 5xx is not "cannot reach the cloud"; neither says "move closer"."""
    import httpx

    from cloud_helpers import add_user, in_process_cloud, register
    from phone.cloudlink import CloudLink

    async with (
        running_device(tmp_path) as (air, runtime, _local, _user),
        in_process_cloud("sqlite:///:memory:", entropy=_FailingEntropy()) as c,
    ):
        await register(c.registry, c.kek, [runtime.factory])
        token = await add_user(c.registry, "alice")
        if failure == "cloud error":
            link = CloudLink("http://cloud.test", token, transport=httpx.ASGITransport(app=c.app))
        else:
            link = CloudLink("http://127.0.0.1:9", token)  # nothing listens on the discard port
        (sighting,) = [s async for s in air.central().scan()]
        delegate = ScriptedCommissioner(choices=[GOOD])
        try:
            report = await Onboarding(air.central(), link, delegate).run(sighting.address)
        finally:
            await link.aclose()
    assert not report.ok and report.stage is Stage.VERIFY
    if failure == "cloud error":
        assert report.status is Status.BUSY
        assert report.message == (
            "The cloud could not answer (its error: entropy_unavailable, HTTP 503)."
        )
        assert report.hint.startswith("Try again in a moment; if it keeps failing, tell whoever")
    else:
        assert report.status is Status.TIMED_OUT
        assert report.message.startswith("Cannot reach the cloud")
        assert report.hint.startswith("Check this machine's network and the cloud URL")


async def test_a_device_that_never_checks_in_is_not_reported_as_checked_in(
    tmp_path: Path,
) -> None:
    """Onboarded (RESULT 0, bind completed), but no check-in within the wait: said so."""
    async with running_device(tmp_path, checkin=False) as (air, _runtime, cloud, _user):
        (sighting,) = [s async for s in air.central().scan()]
        delegate = ScriptedCommissioner(choices=[GOOD])
        report = await Onboarding(air.central(), cloud, delegate, wait_checkin_s=0.3).run(
            sighting.address
        )
    assert report.ok and not report.checked_in
    assert report.message == (
        "Onboarded, but the device has not checked in with the cloud within 0.3 s: "
        "it stays pending until it does."
    )
    assert report.hint.startswith("It checks in once it reaches the cloud")
    states = [(stage, state.value) for stage, state, _ in delegate.stages]
    assert (Stage.CHECKIN, "failed") in states and (Stage.CHECKIN, "done") not in states


class _CompleteUnreachable:
    """A cloud that answers bind/start, and is gone before bind/complete."""

    def __init__(self, reachable: object, gone: object) -> None:
        self.reachable, self.gone = reachable, gone

    async def bind_start(self, request: object) -> object:
        return await self.reachable.bind_start(request)  # type: ignore[attr-defined]

    async def bind_complete(self, attempt: str, ack: bytes) -> object:
        return await self.gone.bind_complete(attempt, ack)  # type: ignore[attr-defined]

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        return await self.gone.wait_active(identifier, timeout)  # type: ignore[attr-defined]


async def test_a_bind_complete_that_cannot_reach_the_cloud_says_the_device_finishes_it(
    tmp_path: Path,
) -> None:
    """The device has joined with its identity: the user is told it completes on its own
    (its check-in does, §6.4), not to "try again" into a closed pairing window."""
    import httpx

    from cloud_helpers import add_user, in_process_cloud, register
    from phone.cloudlink import CloudLink

    async with (
        running_device(tmp_path, checkin=False) as (air, runtime, _local, _user),
        in_process_cloud("sqlite:///:memory:") as c,
    ):
        await register(c.registry, c.kek, [runtime.factory])
        token = await add_user(c.registry, "alice")
        up = CloudLink("http://cloud.test", token, transport=httpx.ASGITransport(app=c.app))
        down = CloudLink("http://127.0.0.1:9", token)  # nothing listens on the discard port
        (sighting,) = [s async for s in air.central().scan()]
        try:
            report = await Onboarding(
                air.central(), _CompleteUnreachable(up, down), ScriptedCommissioner(choices=[GOOD])
            ).run(sighting.address)
        finally:
            await up.aclose()
            await down.aclose()
        state = runtime.store.load()
    assert not report.ok and report.stage is Stage.JOIN
    assert report.message.startswith("The device joined the network with its new identity")
    assert report.hint == (
        "Check your devices in a minute; pair it again only if it does not appear."
    )
    assert state.pending is not None  # it holds the identity its check-in will activate
