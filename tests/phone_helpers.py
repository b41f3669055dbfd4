"""Helpers for the phone app's tests: a real device on an air, a local owner cloud, Pilot steps.

``DeviceRig`` runs a real ``DeviceRuntime`` (storage, Wi-Fi environment, its
user) on any ``Peripheral`` and hands out the matching ``Central``; the
in-memory air is the default, and a simulated-BlueZ variant only has to pass
its own peripheral and central. ``LocalOwnerCloud`` is ``LocalBindService``
(the cloud's computations in-process) plus a tiny registry for the owner views
(§6.5). The Pilot steps only use the app's screens, so they work with any
central.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import DataTable, Input

from ble.memory import MemoryAir
from ble.profile import AdvState, DeviceStatus
from ble.transport import Central, Peripheral
from device.runtime import DeviceRuntime
from device.storage import DeviceStore
from device.wifi import WifiEnvironment
from ds1_pair import LocalCloud, make_factory
from onboarding_helpers import LocalBindService, ScriptedDeviceUser
from phone.app import PhoneApp, create_app
from phone.config import PhoneConfig
from phone.history import History
from phone.screens import ChooseNetworkScreen, ConfirmCodeScreen

S = TypeVar("S", bound=Screen[Any])

#: The stages of a pairing as ``phone pair`` names them, in order.
STAGES = [
    "Connect",
    "Verify with cloud",
    "Secure session",
    "Confirm code",
    "Choose network",
    "Join Wi-Fi",
    "Device check-in",
    "Done",
]
#: The hint of a pairing whose device went away.
LINK_LOST = "Check that the device is still on and in range, then try again."

CONFIG = PhoneConfig("https://cloud.doorstep.test", "dst_test_token_0123456789abcdef")
DEVICE_ADDRESS = "C8:2B:96:1A:01:42"
DEVICE_NAME = "Doorstep-0142"
HOME_PASSPHRASE = "correct horse battery"


@dataclass(frozen=True)
class OwnedRecord:
    identifier: bytes
    dev_id: bytes
    model: str
    epoch: int
    state: str
    bound_at: float | None


class LocalOwnerCloud(LocalBindService):
    """``LocalBindService`` plus the owner views: what the user's account holds."""

    def __init__(self, cloud: LocalCloud, *, wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(cloud)
        self.wall_clock = wall_clock
        self.bound_at: dict[bytes, float] = {}
        self.unbound: list[bytes] = []
        self.extra: list[OwnedRecord] = []

    async def bind_complete(self, attempt: str, ack: bytes) -> Any:
        bound = await super().bind_complete(attempt, ack)
        self.bound_at[bound.identifier] = self.wall_clock()
        return bound

    async def list_devices(self) -> list[OwnedRecord]:
        rows = list(self.extra)
        for bound in self.completed:
            if bound.identifier in self.unbound:
                continue
            rows.append(
                OwnedRecord(
                    bound.identifier,
                    bound.dev_id,
                    self.cloud.factory.model,
                    bound.epoch,
                    "active" if bound.identifier in self.active else "pending",
                    self.bound_at.get(bound.identifier),
                )
            )
        return [r for r in rows if r.identifier not in self.unbound]

    async def unbind(self, identifier: bytes) -> None:
        self.unbound.append(identifier)


@dataclass
class DeviceRig:
    """One real device (runtime, storage, Wi-Fi) on ``peripheral``, found through ``central``."""

    state_dir: Path
    peripheral: Peripheral
    central: Central
    seed: int = 1
    model: str = "Doorstep Lamp L1"
    user: ScriptedDeviceUser = field(default_factory=ScriptedDeviceUser)
    cloud: LocalOwnerCloud = field(init=False)
    runtime: DeviceRuntime = field(init=False)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        factory = make_factory(self.seed, self.model)
        self.cloud = LocalOwnerCloud(LocalCloud(factory))
        wifi = WifiEnvironment.default()
        wifi.set_join_delay(0)
        self.runtime = DeviceRuntime(
            factory, DeviceStore(self.state_dir), self.peripheral, wifi, self.user, self.cloud
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self.runtime.run())
        await asyncio.wait_for(self.runtime.started.wait(), 5)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.runtime.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5)
        self._task = None

    async def __aenter__(self) -> DeviceRig:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def memory_rig(
    tmp_path: Path, *, user: ScriptedDeviceUser | None = None, air: MemoryAir | None = None
) -> DeviceRig:
    """The device on ``air`` (a new one by default: pass it to add other devices)."""
    air = air or MemoryAir()
    return DeviceRig(
        tmp_path / "device",
        air.peripheral(DEVICE_ADDRESS, rssi=-48),
        air.central(),
        user=user or ScriptedDeviceUser(),
    )


async def add_idle_device(
    air: MemoryAir, address: str, name: str, rssi: int, state: AdvState, flags: int
) -> None:
    """A device that only advertises (for the list: other states, signal levels)."""
    await air.peripheral(address, rssi=rssi).start(
        name=name, dev_id=bytes(16), status=DeviceStatus(state, flags)
    )


def app_for(
    central: Central,
    cloud: LocalOwnerCloud | None,
    *,
    history: History | None = None,
    config: PhoneConfig = CONFIG,
    **options: Any,
) -> PhoneApp:
    settings: dict[str, Any] = {
        "scan_window_s": 0.05,
        "wait_checkin_s": 5.0,
        "cursor_blink": False,
    }
    settings.update(options)
    return create_app(central, cloud, history or History.in_memory(), config, **settings)


# ---- a terminal for ``phone pair`` ----------------------------------------------------------


class WatchedOutput(io.StringIO):
    """An output stream a test can wait on until some text (a prompt) has been written."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[str, asyncio.Event]] = []

    def write(self, text: str) -> int:
        written = super().write(text)
        for wanted, event in self._waiting:
            if wanted in self.getvalue():
                event.set()
        return written

    async def wait_for(self, wanted: str) -> None:
        event = asyncio.Event()
        self._waiting.append((wanted, event))
        if wanted in self.getvalue():
            event.set()
        await asyncio.wait_for(event.wait(), 10)


@contextlib.contextmanager
def silent_stdin() -> Iterator[TextIO]:
    """A stdin nobody types on (an open pipe): a question asked on it is never answered."""
    read_end, write_end = os.pipe()
    with open(read_end, encoding="utf-8") as stdin:
        try:
            yield stdin
        finally:
            os.close(write_end)


# ---- Pilot steps -------------------------------------------------------------------------------


async def wait_until(
    pilot: Pilot[Any], predicate: Callable[[], bool], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting; screen is {pilot.app.screen!r}")
        await pilot.pause(0.02)


async def wait_screen(pilot: Pilot[Any], kind: type[S], timeout: float = 10.0) -> S:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, kind), timeout)
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, kind)
    return screen


async def wait_for_device(pilot: Pilot[Any], name: str = DEVICE_NAME) -> None:
    def listed() -> bool:
        table = pilot.app.screen.query_one("#devices", DataTable)
        return any(str(table.get_row_at(i)[0]) == name for i in range(table.row_count))

    await wait_until(pilot, listed)


async def to_network_choice(pilot: Pilot[Any]) -> ChooseNetworkScreen:
    """From the device list: pair the rig's device, confirm its code, reach the network choice."""
    await wait_for_device(pilot)
    await pilot.press("enter")
    await wait_screen(pilot, ConfirmCodeScreen)
    await pilot.press("y")
    return await wait_screen(pilot, ChooseNetworkScreen)


async def type_into(pilot: Pilot[Any], selector: str, text: str, *, keys: bool = False) -> None:
    """Focus the input and enter ``text``: pasted, or typed key by key (slower) with ``keys``."""
    widget = pilot.app.screen.query_one(selector, Input)
    widget.focus()
    widget.value = "" if keys else text
    await pilot.pause()
    if keys:
        await pilot.press(*text)
