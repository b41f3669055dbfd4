"""The device in its own process over the simulated BLE, with a real cloud (issue 5).

Every device is a ``doorstep device run`` process of a ``demo.stack.Stack``
(``doorstep sim`` without the timing model, ``doorstep cloud serve`` on
SQLite); one stack serves the whole module and each test adds its own
factory-fresh devices. The commissioner is the phone's ``Onboarding`` flow on
``BleakCentral`` with ``CloudLink`` in this process, or the sans-I/O
``CommissionerSession`` driven by hand (``RawSession``) for sessions that
misbehave on purpose. The device is judged from outside, as its owner would:
its advertisement, ``doorstep device show --json``, its state directory and
the cloud's owner views.

PROTOCOL.md §5.1 (M3 checks), §5.3 (PROVISION order, atomic store), §5.6
(window, back-off, one commissioner at a time), §6.4 (check-in).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ble.bleak_central import BleakCentral
from ble.errors import DeviceBusy
from ble.profile import FLAG_BUTTON_NEEDED, AdvState
from ble_helpers import bus_environment, central_process, read_line
from cloud.client import CloudClient, CloudError
from demo.stack import DeviceHandle, Stack
from device.storage import SLOT_NAMES
from device_process_helpers import (
    GOOD,
    WRONG,
    RawSession,
    RecordingCloudLink,
    add_user,
    device_lines,
    device_log,
    doorstep,
    find,
    hello_status,
    onboard,
    onboard_after_backoff,
    quick_wifi,
    run_at_terminal,
    show,
    start_device,
    store_of,
    wait_show,
)
from onboarding_helpers import ScriptedCommissioner
from phone.cloudlink import CloudLink
from phone.commissioner import DeviceSummary, Onboarding, OnboardingReport, Stage, StageState
from protocol.commissioner_side import Authenticated, BindStartNeeded, SessionEnded
from protocol.errors import Status

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    async with Stack(workdir, timing=False, wifi_file=quick_wifi(workdir)) as running:
        with bus_environment(running.env):  # bleak reaches the simulator through it
            yield running


async def new_device(stack: Stack, confirm: str | None = None, **kw: str) -> DeviceHandle:
    (handle,) = await stack.add_devices(1, start=False)
    await start_device(stack, handle, confirm=confirm, **kw)
    await find(BleakCentral(), handle.name)
    return handle


async def restart(stack: Stack, handle: DeviceHandle, sig: int = signal.SIGTERM, **kw: str) -> None:
    await stack.stop_device(handle, sig)
    await start_device(stack, handle, **kw)
    await find(BleakCentral(), handle.name)


async def owned(token: str, url: str) -> list[dict[str, object]]:
    async with CloudClient(url, token=token) as client:
        return await client.devices()


# ---- 1. happy path, then a second onboarding with a new identity -------------------


async def test_onboarded_device_checks_in_and_a_reonboarding_retires_its_old_identity(
    stack: Stack,
) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    sighting = await find(central, handle.name)
    assert sighting.status.state is AdvState.UNPROVISIONED and sighting.status.window_open

    cloud = RecordingCloudLink(stack.cloud_url, stack.token)
    try:
        first = await onboard(stack, central, handle, cloud=cloud)
        assert first.ok, first.message
        assert first.epoch == 1 and first.checked_in
        info = await wait_show(stack, handle, lambda i: i["state"] == "active")
        assert info["identifier"] == first.short_id
        assert info["epoch"] == 1 and info["network"] == "DoorstepHome"
        assert info["pairing_window_open"] is False and info["running"] is True
        rows = rows_for(await owned(stack.token, stack.cloud_url), handle)
        assert [(r["identifier"], r["state"], r["epoch"]) for r in rows] == [
            (first.identifier.hex(), "active", 1)  # type: ignore[union-attr]
        ]
        # What the device holds is what a later check-in would be signed with.
        old = store_of(handle).load().active
        assert old is not None and old.identifier == first.identifier
        (old_ack,) = cloud.acks
        async with CloudClient(stack.cloud_url) as device_side:
            # Control: while it is the active identity, its check-in is accepted again.
            answer = await device_side.checkin(old.identifier, old.k_dev, old_ack)
            assert answer["identifier"] == old.identifier.hex()

        # Provisioned: the window is closed until the button is pressed.
        provisioned = await find(central, handle.name, state=AdvState.PROVISIONED)
        assert provisioned.status.flags == FLAG_BUTTON_NEEDED  # window closed, button needed
        rc, out, err = await doorstep(stack, "device", "button", "--state", str(handle.state_dir))
        assert rc == 0, err
        assert "pairing button pressed" in out
        await find(central, handle.name, state=AdvState.PROVISIONED, window_open=True)

        second = await onboard(stack, central, handle, cloud=cloud)
        assert second.ok, second.message
        assert second.epoch == 2 and second.identifier != first.identifier
        info = await wait_show(stack, handle, lambda i: i["identifier"] == second.short_id)
        assert info["state"] == "active" and info["epoch"] == 2
        rows = rows_for(await owned(stack.token, stack.cloud_url), handle)
        assert [(r["identifier"], r["state"], r["epoch"]) for r in rows] == [
            (second.identifier.hex(), "active", 2)  # type: ignore[union-attr]
        ]
    finally:
        await cloud.aclose()

    # The old identity is retired: the same check-in, freshly signed, is refused.
    async with CloudClient(stack.cloud_url) as device_side:
        with pytest.raises(CloudError) as refused:
            await device_side.checkin(old.identifier, old.k_dev, old_ack)
    assert (refused.value.status, refused.value.code) == (401, "bad_signature")


# ---- 2. a wrong passphrase, then the right one in the same session -------------------


async def test_wrong_passphrase_then_right_one_joins_without_a_reset(stack: Stack) -> None:
    handle = await new_device(stack)
    delegate = ScriptedCommissioner(choices=[WRONG, GOOD])
    report = await onboard(stack, BleakCentral(), handle, delegate=delegate)
    assert report.ok, report.message
    assert report.checked_in
    assert [f.status for f in delegate.failures] == [Status.WIFI_AUTH_FAILED]
    assert len(delegate.codes) == 1  # one session, one code
    info = await wait_show(stack, handle, lambda i: i["state"] == "active")
    assert info["identifier"] == report.short_id and info["network"] == "DoorstepHome"
    assert info["reset_ctr"] == 0


# ---- 2b. what the device's log says -------------------------------------------------------


async def test_device_log_tells_each_failed_join_refusal_and_failure_once(stack: Stack) -> None:
    """It used to say nothing on a failed join and "Provisioned as …" after every refusal."""
    handle = await new_device(stack)
    central = BleakCentral()
    address = (await find(central, handle.name)).address
    assert await hello_status(central, address) is Status.OK  # M2, then the phone left
    await wait_show(stack, handle, lambda i: i["failed_sessions"] == 1)
    delegate = ScriptedCommissioner(choices=[WRONG, GOOD])
    report = await onboard_after_backoff(stack, central, handle, delegate=delegate)
    assert report.ok and report.checked_in, report.message
    await wait_show(stack, handle, lambda i: i["state"] == "active")
    await find(central, handle.name, state=AdvState.PROVISIONED)
    for _ in range(2):
        assert await hello_status(central, address) is Status.WINDOW_CLOSED
    await restart(stack, handle)
    await stack.stop_device(handle)  # its log is complete once it has exited

    short, (sas,) = report.short_id, delegate.codes
    waiting = "waiting for a commissioner (pairing window open)"
    closed = "pairing window closed; press the pairing button to open it"
    assert device_lines(handle) == [
        f"[device] {handle.name}: {waiting}",
        "[device] Connection from a commissioner failed: 11 protocol_error (disconnected); "
        f"back-off 1 s after 1 failed session; {waiting}",
        f"[device] join 'DoorstepHome'? code {sas} — accepting (scripted)",
        "[device] Could not join Wi-Fi 'DoorstepHome': 3 wifi_auth_failed (the access point "
        "refused the passphrase); nothing stored, waiting for the commissioner to send other "
        "credentials or leave",
        f"[device] Provisioned: joined Wi-Fi 'DoorstepHome' as {short} (epoch 1); "
        "checking in with the cloud",
        f"[device] Checked in with the cloud: onboarded as {short} (epoch 1)",
        f"[device] Refused a commissioner: 10 window_closed; still provisioned as {short} "
        f"({closed})",
        f"[device] Refused a commissioner: 10 window_closed; still provisioned as {short} "
        f"({closed})",
        f"[device] {handle.name}: provisioned as {short} (epoch 1; {closed})",
    ]
    log = device_log(handle)
    assert GOOD.passphrase not in log and WRONG.passphrase not in log


# ---- 3. the device's user rejects -------------------------------------------------------


async def test_device_user_rejects_nothing_is_stored_and_the_device_stays_available(
    stack: Stack,
) -> None:
    handle = await new_device(stack, confirm="reject")
    central = BleakCentral()
    report = await onboard(stack, central, handle)
    assert report.status is Status.REJECTED_BY_USER, report.message
    assert report.stage is Stage.JOIN
    stored = store_of(handle).load()
    assert stored.pending is None and stored.active is None and stored.wifi is None
    info = await show(stack, handle)
    assert info["state"] == "unprovisioned" and info["failed_sessions"] == 0
    assert rows_for(await owned(stack.token, stack.cloud_url), handle) == []
    again = await find(central, handle.name, state=AdvState.UNPROVISIONED, window_open=True)
    assert again.status.window_open

    await restart(stack, handle, confirm="accept")
    report = await onboard(stack, central, handle)
    assert report.ok, report.message
    await wait_show(stack, handle, lambda i: i["state"] == "active")


def rows_for(rows: list[dict[str, object]], handle: DeviceHandle) -> list[dict[str, object]]:
    return [r for r in rows if r["dev_id"] == handle.factory.dev_id.hex()]


# ---- 4. an M3 recorded in an earlier session is refused -------------------------------


async def test_replayed_m3_from_an_earlier_session_is_refused(stack: Stack) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    address = (await find(central, handle.name)).address
    cloud = CloudLink(stack.cloud_url, stack.token)
    try:
        first = await RawSession.connect(central, address)
        need = await first.hello()
        assert isinstance(need, BindStartNeeded)
        answer = await cloud.bind_start(need.request)
        first.session.cloud_answer(
            ticket=answer.ticket,
            seal=answer.seal,
            session_secret=answer.session_secret,
            wrapped_identity=answer.wrapped_identity,
        )
        recorded_m3 = await first.flush()
        (m4,) = await first.events()
        assert isinstance(m4, Authenticated)  # the device accepted this M3 in its session
        await first.close()

        await find(central, handle.name, state=AdvState.UNPROVISIONED)
        second = await RawSession.connect(central, address)
        need = await second.hello()
        assert isinstance(need, BindStartNeeded)  # a fresh M2, with a fresh N_D
        await second.write_raw(recorded_m3)
        (ended,) = await second.events()
        assert ended == SessionEnded(Status.AUTHENTICATION_FAILED, ended.reason, by_device=True)
        assert second.session.closed
        await second.close()
    finally:
        await cloud.aclose()

    info = await wait_show(stack, handle, lambda i: i["failed_sessions"] == 1)
    assert info["state"] == "unprovisioned"
    # After its back-off (§5.6: 1 s after one failed session) the device onboards normally.
    report = await onboard_after_backoff(stack, central, handle)
    assert report.ok, report.message
    await wait_show(stack, handle, lambda i: i["state"] == "active")


# ---- 5. abandoned sessions and the §5.6 back-off --------------------------------------


async def test_abandoned_sessions_back_off_then_an_onboarding_resets_the_count(
    stack: Stack,
) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    address = (await find(central, handle.name)).address

    async def hello_until_admitted() -> None:
        """Poll with M1 (each refusal is ERROR 10) until the device answers M2 again."""
        for _ in range(200):
            status = await hello_status(central, address)
            if status is Status.OK:
                return
            assert status is Status.WINDOW_CLOSED
            await asyncio.sleep(0.1)
        raise AssertionError("the device never admitted M1 again")

    # n = 1: M2 sent, the commissioner left without M3.
    assert await hello_status(central, address) is Status.OK
    assert await hello_status(central, address) is Status.WINDOW_CLOSED
    await wait_show(stack, handle, lambda i: i["failed_sessions"] == 1)
    # After the back-off M1 is answered again — and left unanswered: n = 2.
    await hello_until_admitted()
    assert await hello_status(central, address) is Status.WINDOW_CLOSED
    await wait_show(stack, handle, lambda i: i["failed_sessions"] == 2)
    sighting = await find(central, handle.name, state=AdvState.UNPROVISIONED)
    assert sighting.status.window_open  # the window itself stays open

    report = await onboard_after_backoff(stack, central, handle)
    assert report.ok, report.message
    info = await wait_show(stack, handle, lambda i: i["state"] == "active")
    assert info["failed_sessions"] == 0


# ---- 6. one commissioner at a time ---------------------------------------------------------


class HoldAtConfirm(ScriptedCommissioner):
    """A commissioner's user who looks at the code until told to accept it."""

    def __init__(self) -> None:
        super().__init__(choices=[GOOD])
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        self.asked.set()
        await self.release.wait()
        return await super().confirm_code(device, sas)


async def test_second_commissioner_is_refused_while_one_holds_the_session(stack: Stack) -> None:
    handle = await new_device(stack)
    a = BleakCentral()
    holder = HoldAtConfirm()
    first = asyncio.create_task(onboard(stack, a, handle, delegate=holder))
    try:
        await asyncio.wait_for(holder.asked.wait(), 30)
        # B scans, sees the device BUSY, and its flow tells its user so.
        b = BleakCentral()
        busy = await find(b, handle.name, state=AdvState.BUSY)
        b_cloud = CloudLink(stack.cloud_url, stack.token)
        try:
            report = await Onboarding(b, b_cloud, ScriptedCommissioner(choices=[GOOD])).run(
                busy.address, handle.name
            )
        finally:
            await b_cloud.aclose()
        assert report.status is Status.BUSY and report.stage is Stage.CONNECT
        with pytest.raises(DeviceBusy) as caught:
            await b.connect(busy.address, timeout=5)
        assert caught.value.status is Status.BUSY
        assert not first.done()
    finally:
        holder.release.set()
    report = await asyncio.wait_for(first, 60)
    assert report.ok, report.message
    assert report.checked_in
    info = await wait_show(stack, handle, lambda i: i["state"] == "active")
    assert info["identifier"] == report.short_id


async def test_commissioner_connecting_without_looking_is_dropped(stack: Stack) -> None:
    handle = await new_device(stack)
    a = BleakCentral()
    holder = HoldAtConfirm()
    first = asyncio.create_task(onboard(stack, a, handle, delegate=holder))
    outcomes = []
    try:
        await asyncio.wait_for(holder.asked.wait(), 30)
        address = (await find(BleakCentral(), handle.name, state=AdvState.BUSY)).address
        for _ in range(3):
            # Another process (another adapter) that connects without scanning first.
            intruder = await central_process(stack.env, address, "hold")
            line = await read_line(intruder)
            if line == "CONNECTED":
                line += " " + await read_line(intruder)
            outcomes.append(line)
            await intruder.wait()
        assert not first.done()
    finally:
        holder.release.set()
    report = await asyncio.wait_for(first, 60)
    assert report.ok, report.message  # the holder's session was untouched
    assert all(o in ("CONNECTED ENDED Disconnected", "FAILED ConnectFailed") for o in outcomes), (
        outcomes
    )


# ---- 7. power loss --------------------------------------------------------------------------


async def test_power_loss_between_result_and_checkin_resumes_the_checkin(stack: Stack) -> None:
    holder = socket.socket()  # bound, never listening: check-in cannot happen, and the
    holder.bind(("127.0.0.1", 0))  # port cannot be taken by another process meanwhile
    nowhere = f"http://127.0.0.1:{holder.getsockname()[1]}"
    handle = await new_device(stack, cloud_url=nowhere)
    report = await onboard(stack, BleakCentral(), handle, wait_checkin_s=1.0)
    assert report.ok, report.message
    assert report.checked_in is False
    info = await wait_show(stack, handle, lambda i: i["state"] == "pending")
    assert info["pending_identifier"] == report.short_id and info["identifier"] is None
    (row,) = rows_for(await owned(stack.token, stack.cloud_url), handle)
    assert (row["identifier"], row["state"]) == (report.identifier.hex(), "pending")  # type: ignore[union-attr]
    # Its user is told once that the cloud cannot be reached (it used to be told nothing).
    failing = (
        "[device] Could not check in with the cloud (the cloud is unreachable); retrying in "
        "the background until it answers"
    )
    for _ in range(200):
        if failing in device_lines(handle):
            break
        await asyncio.sleep(0.05)
    # Told once however many tries follow (counted in test_device_runtime_memory).
    assert device_lines(handle).count(failing) == 1, device_lines(handle)

    await stack.stop_device(handle, signal.SIGKILL)  # power loss
    assert store_of(handle).load().pending is not None
    await start_device(stack, handle)  # back on, with the real cloud reachable
    info = await wait_show(stack, handle, lambda i: i["state"] == "active")
    assert info["identifier"] == report.short_id and info["pending_identifier"] is None
    (row,) = rows_for(await owned(stack.token, stack.cloud_url), handle)
    assert (row["identifier"], row["state"]) == (report.identifier.hex(), "active")  # type: ignore[union-attr]
    holder.close()


class KillOnFirstProgress(ScriptedCommissioner):
    """Pulls the device's plug when the first PROGRESS after PROVISION arrives."""

    def __init__(self, stack: Stack, handle: DeviceHandle) -> None:
        super().__init__(choices=[GOOD])
        self.stack, self.handle = stack, handle
        self.join_running = 0
        self.killed = False

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        await super().stage_changed(stage, state, detail)
        if stage is Stage.JOIN and state is StageState.RUNNING:
            self.join_running += 1  # 1: PROVISION sent; 2: the first PROGRESS
            if self.join_running == 2 and not self.killed:
                self.killed = True
                await self.stack.stop_device(self.handle, signal.SIGKILL)


async def test_power_loss_during_provisioning_leaves_a_valid_state(stack: Stack) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    delegate = KillOnFirstProgress(stack, handle)
    report = await onboard(stack, central, handle, delegate=delegate)
    assert delegate.killed
    assert not report.ok and report.stage is Stage.JOIN
    stored = store_of(handle).load()  # never torn
    assert stored.active is None
    assert stored.pending is None or stored.pending.identity.identifier == report.identifier

    await start_device(stack, handle)
    if stored.pending is not None:  # the new state won: it checks in, then needs the button
        await wait_show(stack, handle, lambda i: i["state"] == "active")
        rc, _, err = await doorstep(stack, "device", "button", "--state", str(handle.state_dir))
        assert rc == 0, err
    else:
        sighting = await find(central, handle.name, state=AdvState.UNPROVISIONED)
        assert sighting.status.window_open
    again = await onboard(stack, central, handle)
    assert again.ok, again.message
    info = await wait_show(stack, handle, lambda i: i["state"] == "active")
    assert info["identifier"] == again.short_id


# ---- 8. a corrupt slot ------------------------------------------------------------------------


async def test_corrupt_newest_slot_falls_back_to_the_older_one(stack: Stack) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    report = await onboard(stack, central, handle)
    assert report.ok, report.message
    await wait_show(stack, handle, lambda i: i["state"] == "active")
    # One more save that a user can tell apart: the button opens the window.
    rc, _, err = await doorstep(stack, "device", "button", "--state", str(handle.state_dir))
    assert rc == 0, err
    await wait_show(stack, handle, lambda i: i["pairing_window_open"] is True)
    await stack.stop_device(handle)

    slots = {name: handle.state_dir / name for name in SLOT_NAMES}
    generation = {n: json.loads(p.read_text())["generation"] for n, p in slots.items()}
    newest = slots[max(generation, key=generation.__getitem__)]
    raw = bytearray(newest.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4] = bytes(b ^ 0x5A for b in raw[middle : middle + 4])
    newest.write_bytes(bytes(raw))

    info = await show(stack, handle)  # the older slot: active, window closed again
    assert info["state"] == "active" and info["identifier"] == report.short_id
    assert info["pairing_window_open"] is False and info["running"] is False
    assert store_of(handle).load().active is not None

    await start_device(stack, handle)
    sighting = await find(central, handle.name, state=AdvState.PROVISIONED)
    assert not sighting.status.window_open
    info = await show(stack, handle)
    assert info["state"] == "active" and info["identifier"] == report.short_id
    assert info["running"] is True


# ---- 9. factory reset and a new owner ------------------------------------------------------


async def test_factory_reset_lets_another_user_bind_and_drops_the_first_binding(
    stack: Stack,
) -> None:
    handle = await new_device(stack)
    central = BleakCentral()
    alice = stack.token
    first = await onboard(stack, central, handle, token=alice)
    assert first.ok and first.checked_in, first.message
    assert [r["state"] for r in rows_for(await owned(alice, stack.cloud_url), handle)] == ["active"]

    bob = await add_user(stack, "bob")
    rc, out, err = await doorstep(stack, "device", "reset", "--state", str(handle.state_dir))
    assert rc == 0, err
    assert "factory reset sent" in out
    info = await wait_show(stack, handle, lambda i: i["state"] == "unprovisioned")
    assert info["reset_ctr"] == 1 and info["pairing_window_open"] is True
    assert info["identifier"] is None and info["network"] is None
    await find(central, handle.name, state=AdvState.UNPROVISIONED, window_open=True)

    second = await onboard(stack, central, handle, token=bob)
    assert second.ok, second.message
    assert second.checked_in
    (row,) = rows_for(await owned(bob, stack.cloud_url), handle)
    assert (row["identifier"], row["state"]) == (second.identifier.hex(), "active")  # type: ignore[union-attr]
    assert rows_for(await owned(alice, stack.cloud_url), handle) == []
    async with CloudClient(stack.cloud_url, token=alice) as client:
        with pytest.raises(CloudError) as gone:
            await client.device(first.identifier)  # type: ignore[arg-type]
    assert (gone.value.status, gone.value.code) == (404, "unknown_device")


# ---- 10. start-up errors a user sees -------------------------------------------------------


async def test_an_adapter_that_does_not_exist_is_one_line(stack: Stack) -> None:
    (handle,) = await stack.add_devices(1, start=False)
    rc, _out, err = await doorstep(
        stack, "device", "run", "--factory", str(handle.factory_file),
        "--state", str(handle.state_dir), "--confirm", "accept", "--adapter", "hci7",
        "--cloud", stack.cloud_url,
    )  # fmt: skip
    assert rc == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("doorstep device: no usable Bluetooth adapter: ")
    assert "hci7" in err
    assert err.endswith(
        "(is bluetoothd running? for the simulator, start `doorstep sim` and export the "
        "DBUS_SYSTEM_BUS_ADDRESS it prints)\n"
    )
    assert not (handle.state_dir / "device.pid").exists()
    assert not handle.state_dir.exists()  # no first-boot state saved before the radio


# ---- 11. Ctrl-C at a terminal ---------------------------------------------------------------


async def test_ctrl_c_at_a_terminal_stops_an_idle_device_with_130(stack: Stack) -> None:
    """``--confirm prompt`` reads the terminal; Ctrl-C used to wait for Enter, then exit 0."""
    (handle,) = await stack.add_devices(1, start=False)
    device = await run_at_terminal(stack, handle)
    try:
        await device.expect("waiting for a commissioner")
        device.type(b"\x03")  # Ctrl-C
        assert await device.wait() == 130
    finally:
        await device.close()
    assert "Traceback" not in device.text(), device.text()
    assert not (handle.state_dir / "device.pid").exists()


async def test_ctrl_c_at_the_accept_prompt_stops_the_device_with_130(stack: Stack) -> None:
    (handle,) = await stack.add_devices(1, start=False)
    device = await run_at_terminal(stack, handle)
    phone: asyncio.Task[OnboardingReport] | None = None
    try:
        await device.expect("waiting for a commissioner")
        # The phone's user confirms the code; PROVISION makes the device ask its own user.
        phone = asyncio.create_task(onboard(stack, BleakCentral(), handle))
        await device.expect("Accept? [y/n]")
        device.type(b"\x03")
        assert await device.wait() == 130
    finally:
        await device.close()
        if phone is not None:
            report = await asyncio.wait_for(phone, 60)
            assert not report.ok  # the device went away before its user answered
    assert "Traceback" not in device.text(), device.text()
    info = await show(stack, handle)
    assert info["state"] == "unprovisioned" and not info["running"]


async def test_the_device_user_answers_at_the_terminal_then_ctrl_c_keeps_what_was_saved(
    stack: Stack,
) -> None:
    (handle,) = await stack.add_devices(1, start=False)
    device = await run_at_terminal(stack, handle)
    try:
        await device.expect("waiting for a commissioner")
        phone = asyncio.create_task(onboard(stack, BleakCentral(), handle))
        await device.expect("Accept? [y/n]")
        device.type(b"maybe\n")
        await device.expect("type y (accept), n (reject) or b (pairing button)")
        device.type(b"y\n")
        report = await asyncio.wait_for(phone, 60)
        assert report.ok, report.message
        await device.expect("Checked in with the cloud")
        device.type(b"\x03")
        assert await device.wait() == 130
    finally:
        await device.close()
    info = await show(stack, handle)
    assert info["state"] == "active" and info["identifier"] == report.short_id


# ---- 12. one state directory, one device ---------------------------------------------------


async def test_another_devices_factory_record_on_a_state_directory_is_refused(
    stack: Stack,
) -> None:
    """It used to start as "provisioned as <the first device's identifier>"."""
    first = await new_device(stack)
    report = await onboard(stack, BleakCentral(), first)
    assert report.ok, report.message
    await wait_show(stack, first, lambda i: i["state"] == "active")
    await stack.stop_device(first)
    (second,) = await stack.add_devices(1, start=False)
    before = {p.name: p.read_bytes() for p in first.state_dir.iterdir()}
    rc, out, err = await doorstep(
        stack, "device", "run", "--factory", str(second.factory_file),
        "--state", str(first.state_dir), "--confirm", "accept", "--cloud", stack.cloud_url,
        timeout=30,
    )  # fmt: skip
    assert rc == 2
    assert err == (
        f"doorstep device: state directory {first.state_dir} belongs to device "
        f"{first.factory.dev_id.hex()}, not to this factory record's "
        f"{second.factory.dev_id.hex()}: pass that device's factory record, or another "
        "state directory\n"
    )
    assert out == ""
    assert {p.name: p.read_bytes() for p in first.state_dir.iterdir()} == before
    # Its own factory record still starts it, as the device it was.
    await restart(stack, first)  # it advertises again
    info = await show(stack, first)
    assert info["running"] and info["state"] == "active"
    assert info["identifier"] == report.short_id


# ---- 13. Bluetooth goes away under a running device -----------------------------------------


@pytest.mark.parametrize("how", ["sim stopped", "bus daemon killed"])
async def test_a_device_whose_bluetooth_goes_away_says_so_and_exits(
    tmp_path: Path, how: str
) -> None:
    """It used to say "waiting for a commissioner" on, and on Ctrl-C printed dbus-next's
    "Future exception was never retrieved … EOFError / BrokenPipeError" tracebacks.

    "sim stopped" is bluetoothd going away (``org.bluez`` leaves the bus); "bus daemon
    killed" the system bus itself closing under the device.
    """
    async with Stack(tmp_path, timing=False, wifi_file=quick_wifi(tmp_path)) as own:
        (handle,) = await own.add_devices(1)  # started, and its first line is out
        assert handle.proc is not None
        (sim,) = [p for p in own._procs if p.name == "sim"]
        sim.expected_exit = handle.proc.expected_exit = True
        if how == "sim stopped":
            os.killpg(sim.process.pid, signal.SIGTERM)
        else:
            out = subprocess.run(
                ["pgrep", "-P", str(sim.process.pid), "dbus-daemon"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            os.kill(int(out.split()[0]), signal.SIGKILL)
        try:  # the bound is for a device that does not notice; it is no timing claim
            code = await asyncio.wait_for(handle.proc.process.wait(), 20)
        except TimeoutError:
            raise AssertionError(f"the device ran on:\n{device_log(handle)}") from None
    assert code == 1
    lines = device_log(handle).splitlines()
    assert lines[:-1] == [
        f"[device] {handle.name}: waiting for a commissioner (pairing window open)"
    ]
    reason = (
        "bluetoothd (org.bluez) left the D-Bus system bus"
        if how == "sim stopped"
        else "the D-Bus system bus went away (EOFError)"
    )
    assert lines[-1] == (
        f"doorstep device: Bluetooth went away: {reason} (is bluetoothd running? for the "
        "simulator, start `doorstep sim` and export the DBUS_SYSTEM_BUS_ADDRESS it prints)"
    )
    assert not (handle.state_dir / "device.pid").exists()
