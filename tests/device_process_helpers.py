"""Helpers for the tests that run each device as its own ``doorstep device run`` process.

The system under test is ``demo.stack.Stack``: ``doorstep sim``, ``doorstep
cloud serve`` on SQLite and device processes. The commissioner is the real
phone flow (``Onboarding`` on ``BleakCentral`` with ``CloudLink``) in the test
process, or the sans-I/O ``CommissionerSession`` driven by hand over a link
(``RawSession``) when a test needs to misbehave on purpose. The device is
observed only from outside, as a user would: its advertisement, ``doorstep
device show --json`` and its state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import signal
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ble.bleak_central import BleakCentral
from ble.errors import Disconnected, LinkTimeout
from ble.profile import AdvState, Sighting
from ble.transport import Central, CentralLink
from demo.stack import DeviceHandle, Stack, doorstep_cmd
from device.storage import DeviceState, DeviceStore
from onboarding_helpers import ScriptedCommissioner
from phone.cloudlink import CloudLink
from phone.commissioner import BoundDevice, NetworkChoice, Onboarding, OnboardingReport
from protocol.commissioner_side import (
    BindStartNeeded,
    CommissionerEvent,
    CommissionerSession,
    SessionEnded,
)
from protocol.errors import Status
from protocol.pairing import PairingGate

GOOD = NetworkChoice(b"DoorstepHome", "correct horse battery", 1)
WRONG = NetworkChoice(b"DoorstepHome", "not the passphrase", 1)


# ---- the stack -----------------------------------------------------------------------


def quick_wifi(workdir: Path, join_delay_ms: int = 150) -> Path:
    """The default simulated home with short joins (the devices' ``--wifi`` file)."""
    source = Path(__file__).resolve().parent.parent / "device" / "default_wifi.json"
    data = json.loads(source.read_text())
    data["faults"]["join_delay_ms"] = join_delay_ms
    path = workdir / "wifi.json"
    path.write_text(json.dumps(data))
    return path


async def doorstep(stack: Stack, *args: str, timeout: float | None = None) -> tuple[int, str, str]:
    """Run a one-shot ``doorstep`` command with the stack's environment.

    ``timeout`` is for a command that should end by itself but might not (a ``device
    run`` expected to refuse to start): past it, the command is killed and the test fails.
    """
    process = await asyncio.create_subprocess_exec(
        *doorstep_cmd(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=stack.base_env(),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(
            f"`doorstep {' '.join(args[:2])}` did not end within {timeout:g} s: "
            f"{out.decode()}{err.decode()}"
        ) from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def show(stack: Stack, handle: DeviceHandle) -> dict[str, Any]:
    """``doorstep device show --json``: what the device's owner can see on the device."""
    rc, out, err = await doorstep(
        stack, "device", "show", "--json", "--state", str(handle.state_dir)
    )
    assert rc == 0, err
    info: dict[str, Any] = json.loads(out)
    return info


_stores: dict[Path, DeviceStore] = {}


def store_of(handle: DeviceHandle) -> DeviceStore:
    """One reader of the device's state directory for the whole test.

    Made before the device first runs, and kept: a ``DeviceStore`` deletes
    the directory's temporary files when it is created, which breaks a save
    the running device has in flight (see ``test_device_runtime_memory``), so
    the tests do not create one per poll.
    """
    store = _stores.get(handle.state_dir)
    if store is None:
        store = _stores[handle.state_dir] = DeviceStore(handle.state_dir)
    return store


def _glance(state: DeviceState) -> dict[str, Any]:
    """The fields of ``device show`` that the tests wait for, read from the slots."""
    gate = PairingGate.from_json(dict(state.gate), time.time)
    return {
        "state": "active" if state.active else ("pending" if state.pending else "unprovisioned"),
        "identifier": state.active.identifier.hex()[:8] if state.active else None,
        "pending_identifier": state.pending.identity.identifier.hex()[:8]
        if state.pending
        else None,
        "pairing_window_open": gate.window_open,
        "failed_sessions": gate.failures,
    }


async def wait_show(
    stack: Stack,
    handle: DeviceHandle,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Wait until ``doorstep device show --json`` satisfies ``until``; its output.

    Polls the slots through ``store_of`` (cheap, and harmless to the running
    device), then asks the CLI. The timeout bounds the wait; it is no timing claim.
    """
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while True:
        if until(_glance(store_of(handle).load())):
            info = await show(stack, handle)
            if until(info):
                return info
        if time.monotonic() > deadline:
            raise AssertionError(f"device show never reached the expected state; last: {info}")
        await asyncio.sleep(0.05)


async def start_device(
    stack: Stack, handle: DeviceHandle, *, confirm: str | None = None, cloud_url: str | None = None
) -> None:
    """(Re)start a device process; ``cloud_url`` overrides where it checks in."""
    store_of(handle)  # before the device runs: see store_of
    saved = stack.cloud_url
    if cloud_url is not None:
        stack.cloud_url = cloud_url
    try:
        await stack.start_device(handle, confirm=confirm)
    finally:
        stack.cloud_url = saved


async def add_user(stack: Stack, name: str) -> str:
    """``doorstep cloud user add NAME``: the new user's bearer token."""
    rc, out, err = await doorstep(stack, "cloud", "user", "add", name, "--db", stack.db_url)
    assert rc == 0, err
    return out.strip().splitlines()[-1].strip()


# ---- what a device process said ----------------------------------------------------------


def device_log(handle: DeviceHandle) -> str:
    """Everything the device process wrote (stdout and stderr of every run of it)."""
    assert handle.proc is not None
    return handle.proc.log.read_text(errors="replace")


def device_lines(handle: DeviceHandle) -> list[str]:
    """What the device told its user: its ``[device]`` lines, of every run, in order."""
    return [line for line in device_log(handle).splitlines() if line.startswith("[device]")]


# ---- the air ---------------------------------------------------------------------------


async def find(
    central: Central,
    name: str,
    *,
    state: AdvState | None = None,
    window_open: bool | None = None,
    free: bool = False,
    timeout: float = 20.0,
) -> Sighting:
    """Scan until ``name`` advertises (in ``state``, with the window as given; not BUSY if ``free``)."""
    deadline = time.monotonic() + timeout
    last: Sighting | None = None
    while time.monotonic() < deadline:
        async with contextlib.aclosing(
            central.scan(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
        ) as sightings:
            async for sighting in sightings:
                if sighting.name != name:
                    continue
                last = sighting
                if state is not None and sighting.status.state is not state:
                    continue
                if free and sighting.status.state is AdvState.BUSY:
                    continue
                if window_open is not None and sighting.status.window_open != window_open:
                    continue
                return sighting
    raise AssertionError(f"{name} not seen as state={state} window_open={window_open}; last {last}")


# ---- the commissioner ------------------------------------------------------------------


class RecordingCloudLink(CloudLink):
    """The real ``CloudLink``; keeps the device's Acks it relayed (for check-in replays)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acks: list[bytes] = []

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice:
        self.acks.append(ack)
        return await super().bind_complete(attempt, ack)


async def onboard(
    stack: Stack,
    central: BleakCentral,
    handle: DeviceHandle,
    *,
    token: str | None = None,
    delegate: ScriptedCommissioner | None = None,
    cloud: CloudLink | None = None,
    wait_checkin_s: float = 20.0,
) -> OnboardingReport:
    """Find the device and run the phone's onboarding flow against the stack's cloud."""
    sighting = await find(central, handle.name, free=True)
    own = cloud is None
    link = cloud or CloudLink(stack.cloud_url, token or stack.token)
    try:
        flow = Onboarding(
            central,
            link,
            delegate or ScriptedCommissioner(choices=[GOOD]),
            wait_checkin_s=wait_checkin_s,
        )
        return await flow.run(sighting.address, handle.name)
    finally:
        if own:
            await link.aclose()


async def onboard_after_backoff(
    stack: Stack, central: BleakCentral, handle: DeviceHandle, **kw: Any
) -> OnboardingReport:
    """Onboard once the device's §5.6 back-off (as it stored it) is over.

    Waiting on the device's own ``backoff_until`` instead of retrying through
    ERROR 10 keeps these tests clear of the phone flow's ERROR-vs-write race
    (see the report of issue 5).
    """
    for _ in range(1300):  # at most the 64 s cap, plus slack
        if time.time() >= float(store_of(handle).load().gate.get("backoff_until", 0.0)):
            break
        await asyncio.sleep(0.05)
    return await onboard(stack, central, handle, **kw)


@dataclass
class RawSession:
    """One DS1 connection driven by hand: ``CommissionerSession`` over a ``CentralLink``.

    ``written`` keeps every fragment written, so a test can replay them later.
    """

    link: CentralLink
    session: CommissionerSession = field(init=False)
    written: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = CommissionerSession(rng=os.urandom, max_fragment=self.link.max_fragment)

    @classmethod
    async def connect(cls, central: Central, address: str, timeout: float = 10.0) -> RawSession:
        return cls(await central.connect(address, timeout=timeout))

    async def flush(self) -> list[bytes]:
        """Write what the session has to send; returns those fragments."""
        fragments = self.session.data_to_send()
        for fragment in fragments:
            await self.link.write(fragment)
        self.written.extend(fragments)
        return fragments

    async def write_raw(self, fragments: list[bytes]) -> None:
        """Write ``fragments`` as they are; a drop is left for ``events`` to report."""
        with contextlib.suppress(Disconnected):  # the device may answer and leave at once
            for fragment in fragments:
                await self.link.write(fragment)

    async def events(self, timeout: float = 15.0) -> list[CommissionerEvent]:
        """The next events from the device; a dropped link is ``SessionEnded``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = await self.link.receive(max(0.01, deadline - time.monotonic()))
            except Disconnected:
                return self.session.connection_lost()
            except LinkTimeout:
                raise AssertionError("the device did not answer") from None
            events = self.session.receive_fragment(data)
            if events:
                return events

    async def hello(self) -> CommissionerEvent:
        """Send M1; the device's answer: ``BindStartNeeded`` (M2) or ``SessionEnded`` (ERROR).

        A device refusing M1 notifies ERROR and drops the link at once, which
        can beat the ATT write response: the write then fails, but the ERROR
        was notified before the drop and is read here all the same.
        """
        self.session.start()
        with contextlib.suppress(Disconnected):
            await self.flush()
        (event,) = await self.events()
        assert isinstance(event, BindStartNeeded | SessionEnded), event
        return event

    async def close(self) -> None:
        await self.link.disconnect()


async def hello_status(central: Central, address: str) -> Status:
    """Connect, send M1, disconnect: OK when the device answered M2, else its ERROR status.

    An answered M2 is left without M3, so it counts as an abandoned session (§5.6).
    """
    raw = await RawSession.connect(central, address)
    try:
        event = await raw.hello()
    finally:
        await raw.close()
    if isinstance(event, SessionEnded):
        assert event.by_device, event
        return event.status
    return Status.OK


# ---- a device run at a terminal ----------------------------------------------------------


@dataclass
class TerminalDevice:
    """``doorstep device run`` on a pseudo-terminal that is its controlling terminal.

    As a user runs it: stdin, stdout and stderr are the terminal, so Ctrl-C is the
    character typed (``\\x03``), which the terminal turns into SIGINT for the device.
    """

    process: asyncio.subprocess.Process
    master: int
    output: bytearray = field(default_factory=bytearray)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except (BlockingIOError, OSError):  # nothing yet, or the device is gone (EIO)
                return
            if not chunk:
                return
            self.output += chunk

    async def expect(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the terminal shows ``text`` (the timeout bounds the wait)."""
        deadline = time.monotonic() + timeout
        while text not in self.text():
            self._drain()
            if text in self.text():
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the terminal never showed {text!r}; it shows:\n{self.text()}"
                )
            await asyncio.sleep(0.05)

    async def wait(self, timeout: float = 20.0) -> int:
        """The exit status (the timeout bounds the wait: a device that hangs fails here)."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"the device did not exit within {timeout:g} s; its terminal:\n{self.text()}"
            ) from None
        self._drain()
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        os.close(self.master)


def _become_terminal_session() -> None:
    """In the child: a session of its own whose controlling terminal is its stdin."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # even if the tests run with it ignored


async def run_at_terminal(stack: Stack, handle: DeviceHandle, *extra: str) -> TerminalDevice:
    """Start ``doorstep device run`` (``--confirm prompt``, the default) at a terminal."""
    store_of(handle)  # before the device runs: see store_of
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    args = [
        "device", "run", "--factory", str(handle.factory_file), "--state",
        str(handle.state_dir), "--cloud", stack.cloud_url, *extra,
    ]  # fmt: skip
    if stack.wifi_file is not None:
        args += ["--wifi", str(stack.wifi_file)]
    try:
        process = await asyncio.create_subprocess_exec(
            *doorstep_cmd(*args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=stack.base_env(),
            preexec_fn=_become_terminal_session,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return TerminalDevice(process, master)
