"""``doorstep phone``: the Textual phone app that onboards Doorstep devices (issue 6, §5.5).

The app only orchestrates (STYLE.md §8): a scanning worker feeds the nearby
list, a pairing worker runs ``phone.commissioner.Onboarding`` and the
``PhoneDelegate`` turns its user decisions (confirm the code, choose a network)
into screens; progress comes back as messages. Every dependency comes in
through ``create_app`` so tests drive the app with Pilot and snapshots over the
in-memory air, a real device runtime and an in-process cloud.

Screens (``phone.screens``): nearby devices → pairing (stage list) → confirm
code (modal) → choose network → result; my devices (history + the cloud's
owner view, unbind); settings (cloud URL and token, first run).

Never shown or logged: the Wi-Fi passphrase, the cloud token (masked).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.screen import Screen
from textual.worker import Worker

from ble.errors import LinkError
from ble.profile import AdvState, Sighting
from ble.transport import Central
from phone.commissioner import (
    BindService,
    DeviceSummary,
    NetworkChoice,
    Onboarding,
    OnboardingReport,
    Stage,
    StageState,
)
from phone.config import ConfigError, ConfigStore, PhoneConfig
from phone.history import History
from protocol.commissioner_side import ProvisionFailed
from protocol.crypto import RandomSource
from protocol.display import printable
from protocol.messages import Network

# ---- what the app needs from the cloud (phone.cloudlink implements it) ---------------------


class OwnedDevice(Protocol):
    """One row of ``GET /v1/devices`` (§6.5) as the app reads it."""

    @property
    def identifier(self) -> bytes: ...

    @property
    def dev_id(self) -> bytes: ...

    @property
    def model(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def state(self) -> str:
        """``"pending"`` or ``"active"``."""
        ...

    @property
    def bound_at(self) -> float | None:
        """Unix seconds."""
        ...


class OwnerCloud(BindService, Protocol):
    """The bind flow (§6.1, §6.2) plus the owner views (§6.5)."""

    async def list_devices(self) -> Sequence[OwnedDevice]: ...

    async def unbind(self, identifier: bytes) -> None: ...


CloudFactory = Callable[[PhoneConfig], OwnerCloud]


# ---- nearby devices (pure model: the list screen renders it) ---------------------------------


def signal_bars(bars: int) -> str:
    return "".join("▂▄▆█"[i] if i < bars else "·" for i in range(4))


def wifi_bars(rssi: int) -> int:
    for bars, floor in ((4, -55), (3, -65), (2, -75), (1, -85)):
        if rssi >= floor:
            return bars
    return 0


def state_label(sighting: Sighting) -> str:
    status = sighting.status
    if status.state is AdvState.BUSY:
        return "busy"
    if status.state is AdvState.PROVISIONED:
        return "set up · pairing open" if status.window_open else "set up"
    return "ready to pair" if status.window_open else "pairing closed"


@dataclass
class NearbyDevice:
    sighting: Sighting
    last_seen: float
    faded: bool = False


class NearbyDevices:
    """Devices seen recently: unprovisioned first, then strongest; unseen ones fade, then drop."""

    def __init__(self, fade_after_s: float, drop_after_s: float) -> None:
        self.fade_after_s = fade_after_s
        self.drop_after_s = drop_after_s
        self.devices: dict[str, NearbyDevice] = {}

    def seen(self, sighting: Sighting, now: float) -> None:
        self.devices[sighting.address] = NearbyDevice(sighting, now)

    def prune(self, now: float) -> None:
        for address, device in list(self.devices.items()):
            age = now - device.last_seen
            if age >= self.drop_after_s:
                del self.devices[address]
            else:
                device.faded = age >= self.fade_after_s

    def rows(self, now: float) -> list[NearbyDevice]:
        self.prune(now)

        def order(d: NearbyDevice) -> tuple[int, int, int, str]:
            s = d.sighting
            return (
                int(d.faded),
                0 if s.status.state is AdvState.UNPROVISIONED else 1,
                -s.rssi,
                s.name or s.address,
            )

        return sorted(self.devices.values(), key=order)

    def get(self, address: str) -> NearbyDevice | None:
        return self.devices.get(address)


# ---- pairing progress (pure model: the pairing screen renders it) ---------------------------

STAGES: tuple[Stage, ...] = tuple(Stage)


@dataclass
class StageRow:
    stage: Stage
    state: StageState | None = None  # None: not reached yet
    detail: str = ""
    started: float = 0.0
    elapsed: float | None = None


class StageBoard:
    """The stage list with live state and elapsed time per stage."""

    def __init__(self) -> None:
        self.rows: dict[Stage, StageRow] = {s: StageRow(s) for s in STAGES}

    def update(self, stage: Stage, state: StageState, detail: str, now: float) -> None:
        index = STAGES.index(stage)
        row = self.rows[stage]
        if state is StageState.RUNNING:
            for earlier in STAGES[:index]:
                e = self.rows[earlier]
                if e.state is StageState.RUNNING:  # the flow moved on: it is done
                    e.state, e.elapsed = StageState.DONE, now - e.started
            for later in STAGES[index + 1 :]:
                self.rows[later] = StageRow(later)  # a retry (e.g. another network)
            if row.state is not StageState.RUNNING:
                row.started, row.elapsed = now, None
                row.detail = detail
            elif detail:
                row.detail = detail  # progress from the device (PROGRESS)
            row.state = StageState.RUNNING
            return
        if row.state is StageState.FAILED and state is StageState.DONE:
            return  # a failed join is not done; the next choice restarts it
        row.state = state
        row.elapsed = now - row.started if row.started else 0.0
        if detail or state is StageState.FAILED:
            row.detail = detail

    def elapsed(self, row: StageRow, now: float) -> float | None:
        if row.state is StageState.RUNNING:
            return max(0.0, now - row.started)
        return row.elapsed


# ---- messages from the workers ---------------------------------------------------------------


class DeviceSeen(Message):
    def __init__(self, sighting: Sighting) -> None:
        super().__init__()
        self.sighting = sighting


class ScanProblem(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class StageUpdate(Message):
    def __init__(self, stage: Stage, state: StageState, detail: str) -> None:
        super().__init__()
        self.stage = stage
        self.state = state
        self.detail = detail


@dataclass
class PairingOutcome:
    """How a pairing ended, for the result screen and the history."""

    name: str
    address: str
    report: OnboardingReport
    cancelled: bool = False
    error: str = ""  # an error outside DS1 (the cloud unreachable, refused the token, …)
    last_failure: ProvisionFailed | None = None


class PairingFinished(Message):
    def __init__(self, outcome: PairingOutcome) -> None:
        super().__init__()
        self.outcome = outcome


# ---- the delegate: user decisions as screens (STYLE.md §7) ------------------------------------

R = TypeVar("R")


@dataclass
class PhoneDelegate:
    """``CommissionerDelegate`` for the app; runs inside the pairing worker."""

    app: PhoneApp
    last_choice: NetworkChoice | None = None
    last_failure: ProvisionFailed | None = None
    gave_up: bool = False
    codes: list[str] = field(default_factory=list)

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        self.app.post_message(StageUpdate(stage, state, printable(detail)))

    async def _ask(self, screen: Screen[R]) -> R:
        """Show ``screen`` and wait for its answer. Cancelled (the device went away
        meanwhile, or the pairing was cancelled), the screen is taken down at once:
        nobody is left answering a question that no longer matters."""
        try:
            return await self.app.push_screen_wait(screen)
        except asyncio.CancelledError:
            if self.app.screen is screen:
                # Popped, not dismissed: the answer's future is already cancelled.
                self.app.pop_screen()
            raise

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        from phone.screens import ConfirmCodeScreen

        self.codes.append(sas)
        accepted = await self._ask(ConfirmCodeScreen(device, sas))
        return bool(accepted)

    async def choose_network(
        self, networks: tuple[Network, ...], failure: ProvisionFailed | None
    ) -> NetworkChoice | None:
        from phone.screens import ChooseNetworkScreen

        self.last_failure = failure
        previous = self.last_choice
        choice: NetworkChoice | None = await self._ask(
            ChooseNetworkScreen(
                networks,
                failure,
                previous_ssid=previous.ssid if previous else None,
                previous_security=previous.security if previous else None,
            )
        )
        if choice is None:
            self.gave_up = True
        else:
            self.last_choice = choice
        return choice


# ---- the app ----------------------------------------------------------------------------------


class PhoneApp(App[None]):
    """The Doorstep phone app."""

    TITLE = "Doorstep"
    CSS_PATH = "phone.tcss"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "quit", "Quit", show=False)]

    def __init__(
        self,
        central: Central,
        cloud: OwnerCloud | None,
        history: History,
        config: PhoneConfig,
        *,
        config_store: ConfigStore | None = None,
        cloud_factory: CloudFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        localtime: Callable[[float], time.struct_time] = time.localtime,
        rng: RandomSource = os.urandom,
        scan_window_s: float = 2.0,
        fade_after_s: float = 5.0,
        drop_after_s: float = 12.0,
        wait_checkin_s: float = 20.0,
        devices_refresh_s: float = 10.0,
        scan: bool = True,
        cursor_blink: bool = True,
    ) -> None:
        super().__init__()
        self.central = central
        self.cloud = cloud
        self.history = history
        self.config = config
        self.config_store = config_store
        self.cloud_factory = cloud_factory
        self.clock = clock
        self.localtime = localtime
        self.rng = rng
        self.scan_window_s = scan_window_s
        self.wait_checkin_s = wait_checkin_s
        #: How often My devices reloads the account while shown (0: only on `r`).
        self.devices_refresh_s = devices_refresh_s
        self.scan_enabled = scan
        self.cursor_blink = cursor_blink
        self.nearby = NearbyDevices(fade_after_s, drop_after_s)
        self.scan_problem = ""
        self.known_models: dict[str, str] = {}
        self.board = StageBoard()
        self.pairing: Sighting | None = None
        self.last_outcome: PairingOutcome | None = None
        self._pairing_worker: Worker[None] | None = None
        self._scan_worker: Worker[None] | None = None
        self._user_cancelled = False

    # ---- lifecycle --------------------------------------------------------------------

    def get_default_screen(self) -> Screen[None]:
        from phone.screens import DevicesScreen

        return DevicesScreen()

    async def on_mount(self) -> None:
        with contextlib.suppress(Exception):
            self.known_models.update(await self.history.known_models())
        self.start_scanning()
        if not self.config.complete:
            from phone.screens import SettingsScreen

            self.push_screen(SettingsScreen(first_run=True))

    async def on_unmount(self) -> None:
        await self.history.close()
        closer = getattr(self.cloud, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()

    # ---- scanning ----------------------------------------------------------------------

    def start_scanning(self) -> None:
        if self.scan_enabled:
            self._scan_worker = self.scan_nearby()

    def stop_scanning(self) -> None:
        if self._scan_worker is not None:
            self._scan_worker.cancel()
            self._scan_worker = None

    @work(exclusive=True, group="scan", exit_on_error=False)
    async def scan_nearby(self) -> None:
        """Scan in windows, forever; each sighting becomes a message."""
        while True:
            try:
                async for sighting in self.central.scan(timeout=self.scan_window_s):
                    self.post_message(DeviceSeen(sighting))
            except LinkError as exc:
                self.post_message(ScanProblem(str(exc)))
                await asyncio.sleep(self.scan_window_s)
            await asyncio.sleep(0.05)

    def on_device_seen(self, message: DeviceSeen) -> None:
        self.scan_problem = ""
        self.nearby.seen(message.sighting, self.clock())
        self._refresh_devices()

    def on_scan_problem(self, message: ScanProblem) -> None:
        self.scan_problem = message.text
        self._refresh_devices()

    def _refresh_devices(self) -> None:
        from phone.screens import DevicesScreen

        for screen in self.screen_stack:
            if isinstance(screen, DevicesScreen):
                screen.refresh_devices()

    # ---- pairing -------------------------------------------------------------------------

    def start_pairing(self, sighting: Sighting) -> None:
        from phone.screens import PairingScreen, SettingsScreen

        if self._pairing_worker is not None and self._pairing_worker.is_running:
            return
        if self.cloud is None:
            self.notify("Set the cloud URL and token first.", severity="warning")
            self.push_screen(SettingsScreen(first_run=False))
            return
        self.stop_scanning()
        self.pairing = sighting
        self.board = StageBoard()
        self._user_cancelled = False
        self.push_screen(PairingScreen(sighting))
        self._pairing_worker = self.run_pairing(sighting, self.cloud)

    def cancel_pairing(self) -> None:
        """Escape: cancel the worker; the flow sends CLOSE and disconnects on its way out."""
        if self._pairing_worker is not None and self._pairing_worker.is_running:
            self._user_cancelled = True
            self._pairing_worker.cancel()

    @work(exclusive=True, group="pairing", exit_on_error=False)
    async def run_pairing(self, sighting: Sighting, cloud: OwnerCloud) -> None:
        delegate = PhoneDelegate(self)
        flow = Onboarding(
            self.central,
            cloud,
            delegate,
            rng=self.rng,
            clock=self.clock,
            wait_checkin_s=self.wait_checkin_s,
        )
        name = sighting.name or sighting.address
        outcome = PairingOutcome(name, sighting.address, flow.report)
        try:
            outcome.report = await flow.run(sighting.address, name)
            # Escape on the network screen is a cancel, unless a join had failed: then the
            # result screen explains that failure.
            outcome.cancelled = (
                delegate.gave_up and delegate.last_failure is None and not outcome.report.ok
            )
        except asyncio.CancelledError:
            outcome.cancelled = True
            self.post_message(PairingFinished(outcome))
            raise
        except Exception as exc:  # the cloud (or another non-DS1 dependency) failed
            outcome.error = str(exc) or type(exc).__name__
        outcome.last_failure = delegate.last_failure
        self.post_message(PairingFinished(outcome))

    def on_stage_update(self, message: StageUpdate) -> None:
        from phone.screens import PairingScreen

        self.board.update(message.stage, message.state, message.detail, self.clock())
        for screen in self.screen_stack:
            if isinstance(screen, PairingScreen):
                screen.refresh_board()

    async def on_pairing_finished(self, message: PairingFinished) -> None:
        from phone.screens import DevicesScreen, ResultScreen

        outcome = message.outcome
        outcome.cancelled = outcome.cancelled or self._user_cancelled
        self.last_outcome = outcome
        self.pairing = None
        report = outcome.report
        if report.device is not None:
            self.known_models[report.device.name] = report.device.model
        label = "cancelled" if outcome.cancelled else ("error" if outcome.error else None)
        with contextlib.suppress(Exception):
            await self.history.record(
                report,
                name=outcome.name,
                address=outcome.address,
                label=label,
                message=outcome.error or None,
            )
        while len(self.screen_stack) > 1 and not isinstance(self.screen, DevicesScreen):
            await self.pop_screen()
        if outcome.cancelled:
            self.notify("Pairing cancelled. The device is back in pairing mode.")
            self.start_scanning()
        else:
            await self.push_screen(ResultScreen(outcome))

    def back_to_devices(self) -> None:
        from phone.screens import DevicesScreen

        while len(self.screen_stack) > 1 and not isinstance(self.screen, DevicesScreen):
            self.pop_screen()
        self.start_scanning()

    # ---- settings ------------------------------------------------------------------------

    def apply_config(self, config: PhoneConfig) -> str:
        """Save and use new settings; returns an error message, or "" when saved."""
        if self.config_store is not None:
            try:
                self.config_store.save(config)
            except ConfigError as exc:
                return str(exc)
        self.config = config
        if self.cloud_factory is not None and config.complete:
            try:
                self.cloud = self.cloud_factory(config)
            except Exception as exc:  # e.g. a malformed URL refused by the HTTP client
                return f"Saved, but the cloud client could not start: {exc}"
        return ""

    # ---- formatting shared by screens ----------------------------------------------------

    def format_time(self, unix: float | None) -> str:
        if unix is None:
            return "—"
        return time.strftime("%Y-%m-%d %H:%M", self.localtime(unix))


def create_app(
    central: Central,
    cloud: OwnerCloud | None,
    history: History,
    config: PhoneConfig,
    *,
    config_store: ConfigStore | None = None,
    cloud_factory: CloudFactory | None = None,
    clock: Callable[[], float] = time.monotonic,
    localtime: Callable[[float], time.struct_time] = time.localtime,
    rng: RandomSource = os.urandom,
    scan_window_s: float = 2.0,
    fade_after_s: float = 5.0,
    drop_after_s: float = 12.0,
    wait_checkin_s: float = 20.0,
    devices_refresh_s: float = 10.0,
    scan: bool = True,
    cursor_blink: bool = True,
) -> PhoneApp:
    """The phone app with its dependencies injected (tests pass the in-memory air and a local cloud).

    ``cloud`` may be None before the first run's settings are saved; then
    ``cloud_factory`` builds it from the saved ``PhoneConfig``.
    """
    return PhoneApp(
        central,
        cloud,
        history,
        config,
        config_store=config_store,
        cloud_factory=cloud_factory,
        clock=clock,
        localtime=localtime,
        rng=rng,
        scan_window_s=scan_window_s,
        fade_after_s=fade_after_s,
        drop_after_s=drop_after_s,
        wait_checkin_s=wait_checkin_s,
        devices_refresh_s=devices_refresh_s,
        scan=scan,
        cursor_blink=cursor_blink,
    )
