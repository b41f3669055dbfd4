"""The phone app's screens (issue 6): nearby devices, pairing, confirm code, choose network,
result, my devices, settings.

Screens render the app's models (``NearbyDevices``, ``StageBoard``) and turn
keys into app actions; they do no BLE themselves. The owner view's HTTP calls
run in a screen worker. Everything fits 80×24 and works with the keyboard
only; the footer lists the keys. Passphrases are masked (with a reveal toggle)
and never kept after the screen closes; the saved token is shown masked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    Checkbox,
    DataTable,
    Digits,
    Footer,
    Header,
    Input,
    Label,
    Select,
    Static,
)

from ble.profile import Sighting
from phone.commissioner import DeviceSummary, NetworkChoice, Stage, StageState, explain
from phone.config import PhoneConfig, mask_token
from protocol.commissioner_side import ProvisionFailed
from protocol.errors import UnsupportedSecurity, WifiParameterError
from protocol.messages import Network
from protocol.wifi import Security, validate_wifi

if TYPE_CHECKING:
    from textual.worker import Worker

    from phone.app import OwnedDevice, PairingOutcome, PhoneApp
    from phone.history import HistoryEntry

EMPTY_NEARBY = "No devices nearby — is the device powered and in pairing mode?"
OTHER_NETWORK = "__other__"


def _app(screen: Screen[Any]) -> PhoneApp:
    return cast("PhoneApp", screen.app)


def _format_code(sas: str) -> str:
    return f"{sas[:3]} {sas[3:]}" if len(sas) == 6 else sas


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


# ---- nearby devices ------------------------------------------------------------------------


class DevicesScreen(Screen[None]):
    """The live list of nearby Doorstep devices."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "pair", "Pair", priority=True),
        Binding("m", "my_devices", "My devices"),
        Binding("s", "settings", "Settings"),
        Binding("q", "quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="nearby"):
            yield Label("Nearby devices", classes="title")
            yield DataTable(id="devices", cursor_type="row", zebra_stripes=False)
            yield Static(EMPTY_NEARBY, id="empty", classes="empty")
            yield Static("", id="scan-status", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Nearby devices"
        table = self.query_one("#devices", DataTable)
        table.add_column("Device", key="name", width=16)
        table.add_column("Model", key="model", width=20)
        table.add_column("State", key="state", width=22)
        table.add_column("Signal", key="signal", width=12)
        self.set_interval(0.5, self.refresh_devices)
        self.refresh_devices()

    def on_screen_resume(self) -> None:
        self.refresh_devices()

    def refresh_devices(self) -> None:
        app = _app(self)
        try:
            table = self.query_one("#devices", DataTable)
        except NoMatches:  # a sighting arrived before the screen was composed
            return
        if not table.columns:  # composed, not yet mounted: on_mount adds them, then refreshes
            return
        rows = app.nearby.rows(app.clock())
        selected = self.selected_address()
        table.clear()
        for device in rows:
            s = device.sighting
            style = "dim" if device.faded else ""
            from phone.app import signal_bars, state_label

            model = app.known_models.get(s.name, "—")
            table.add_row(
                Text(s.name or s.address, style=style),
                Text(model, style=style),
                Text(state_label(s) + (" · not seen" if device.faded else ""), style=style),
                Text(f"{signal_bars(s.bars)} {s.rssi:>4}", style=style),
                key=s.address,
            )
        if selected is not None:
            for index, device in enumerate(rows):
                if device.sighting.address == selected:
                    table.move_cursor(row=index, animate=False)
        empty = not rows
        table.display = not empty
        self.query_one("#empty", Static).display = empty
        problem = app.scan_problem
        status = self.query_one("#scan-status", Static)
        if problem:
            status.update(f"Bluetooth problem: {problem}")
        elif empty:
            status.update("Scanning…")
        else:
            status.update(
                "Enter pairs the selected device. Faded devices have not been seen lately."
            )

    def selected_address(self) -> str | None:
        table = self.query_one("#devices", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return None if key.value is None else str(key.value)

    def selected(self) -> Sighting | None:
        address = self.selected_address()
        if address is None:
            return None
        device = _app(self).nearby.get(address)
        return None if device is None else device.sighting

    def action_pair(self) -> None:
        sighting = self.selected()
        if sighting is None:
            self.notify("No device selected.", severity="warning")
            return
        _app(self).start_pairing(sighting)

    def action_my_devices(self) -> None:
        self.app.push_screen(MyDevicesScreen())

    def action_settings(self) -> None:
        self.app.push_screen(SettingsScreen(first_run=False))

    async def action_quit(self) -> None:
        self.app.exit()


# ---- pairing -------------------------------------------------------------------------------

_GLYPH: dict[StageState | None, tuple[str, str]] = {
    None: ("·", "dim"),
    StageState.RUNNING: ("▸", "bold yellow"),
    StageState.DONE: ("✓", "green"),
    StageState.FAILED: ("✗", "bold red"),
    StageState.SKIPPED: ("-", "dim"),
}


class PairingScreen(Screen[None]):
    """The stage list with live state and elapsed time; Escape cancels."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel pairing")]

    def __init__(self, sighting: Sighting) -> None:
        super().__init__()
        self.sighting = sighting

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="pairing"):
            name = self.sighting.name or self.sighting.address
            yield Label(f"Pairing {name}", classes="title")
            yield Static(f"{self.sighting.address}", classes="hint")
            yield Static(id="stages")
            yield Static(
                "Esc cancels; the device goes back to pairing mode.", classes="hint", id="help"
            )
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Pairing"
        self.refresh_board()
        self.set_interval(0.25, self.refresh_board)

    def refresh_board(self) -> None:
        app = _app(self)
        now = app.clock()
        table = Table.grid(padding=(0, 2))
        table.add_column(width=1)
        table.add_column(width=18)
        table.add_column(width=8, justify="right")
        table.add_column(ratio=1)
        for row in app.board.rows.values():
            glyph, style = _GLYPH[row.state]
            label_style = "" if row.state is not None else "dim"
            detail = row.detail
            if row.stage is Stage.CONFIRM and row.state is StageState.RUNNING:
                detail = f"code {_format_code(detail)}" if detail else ""
            elif row.stage is Stage.CONFIRM:
                detail = ""
            table.add_row(
                Text(glyph, style=style),
                Text(row.stage.value, style=label_style),
                Text(_seconds(app.board.elapsed(row, now)), style="dim"),
                Text(detail, style="red" if row.state is StageState.FAILED else "dim"),
            )
        with contextlib.suppress(NoMatches):  # an update before the screen was composed
            self.query_one("#stages", Static).update(table)

    def action_cancel(self) -> None:
        _app(self).cancel_pairing()


# ---- confirm the code (§5.5) ----------------------------------------------------------------


class ConfirmCodeScreen(ModalScreen[bool]):
    """The device's registered name/model and the code in large digits: accept or reject."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Accept"),
        Binding("n", "answer(False)", "Reject"),
        Binding("escape", "answer(False)", "Reject", show=False),
    ]

    def __init__(self, device: DeviceSummary, sas: str) -> None:
        super().__init__()
        self.device = device
        self.sas = sas

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm", classes="dialog"):
            yield Label("Confirm the device", classes="title")
            yield Static(
                Text.assemble(
                    (self.device.name, "bold"), "  ·  ", self.device.model or "unknown model"
                ),
                id="who",
            )
            yield Digits(_format_code(self.sas), id="code")
            yield Static("Does the device show this code?", id="question")
            with Horizontal(classes="buttons"):
                yield Button("Accept (y)", id="accept", variant="success")
                yield Button("Reject (n)", id="reject", variant="error")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#accept", Button).focus()

    @on(Button.Pressed, "#accept")
    def _accept(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#reject")
    def _reject(self) -> None:
        self.dismiss(False)

    def action_answer(self, accepted: bool) -> None:
        self.dismiss(accepted)


# ---- choose a network (§4) -------------------------------------------------------------------

SECURITY_OPTIONS: list[tuple[str, int]] = [(s.label, int(s)) for s in Security]


def _security_label(value: int) -> str:
    try:
        return Security(value).label
    except ValueError:
        return f"type {value}"


class ChooseNetworkScreen(Screen[NetworkChoice | None]):
    """The device's scan results, manual entry, a masked passphrase; validated before sending."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel pairing"),
        Binding("ctrl+r", "reveal", "Show/hide passphrase"),
        Binding("ctrl+o", "other", "Other network"),
        Binding("ctrl+j", "submit", "Join", show=False),
    ]

    def __init__(
        self,
        networks: Sequence[Network],
        failure: ProvisionFailed | None = None,
        *,
        previous_ssid: bytes | None = None,
        previous_security: int | None = None,
    ) -> None:
        super().__init__()
        self.networks = list(networks)
        self.failure = failure
        self.previous_ssid = previous_ssid
        self.previous_security = previous_security

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="choose"):
            if self.failure is None:
                yield Label("Choose the network for the device", classes="title")
                # Only `doorstep demo` sets this: its simulated home network's passphrase.
                if hint_text := os.environ.get("DOORSTEP_DEMO_HINT", ""):
                    yield Static(Text(hint_text, style="italic"), id="demo-hint")
            else:
                what, hint = explain(self.failure.status)
                yield Label("Try another network/passphrase", classes="title")
                yield Static(Text(f"✗ {what} {hint}", style="bold red"), id="failure")
            yield DataTable(id="networks", cursor_type="row")
            with Horizontal(classes="row"):
                yield Input(placeholder="Network name (SSID)", id="ssid")
                yield Select(
                    SECURITY_OPTIONS, value=int(Security.WPA2_PSK), allow_blank=False, id="security"
                )
            with Horizontal(classes="row"):
                yield Input(placeholder="Passphrase", password=True, id="passphrase")
                yield Checkbox("Show", id="reveal")
            yield Static("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Join (Enter)", id="join", variant="primary")
                yield Button("Cancel (Esc)", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Choose network"
        app = _app(self)
        for widget in self.query(Input):
            widget.cursor_blink = app.cursor_blink
        from phone.app import signal_bars, wifi_bars

        table = self.query_one("#networks", DataTable)
        table.add_column("Network", key="ssid", width=26)
        table.add_column("Signal", key="signal", width=10)
        table.add_column("Security", key="security", width=10)
        table.add_column("Ch", key="channel", width=4)
        for index, network in enumerate(self.networks):
            ssid = network.ssid.decode("utf-8", "replace")
            table.add_row(
                Text(ssid) if ssid else Text("(hidden network)", style="italic dim"),
                f"{signal_bars(wifi_bars(network.rssi))} {network.rssi:>4}",
                _security_label(network.security),
                str(network.channel),
                key=str(index),
            )
        table.add_row(Text("Other network…", style="italic"), "", "", "", key=OTHER_NETWORK)
        if self.previous_ssid is not None:
            self.query_one("#ssid", Input).value = self.previous_ssid.decode("utf-8", "replace")
            if self.previous_security is not None:
                self._set_security(self.previous_security)
            for index, network in enumerate(self.networks):
                if network.ssid == self.previous_ssid:
                    table.move_cursor(row=index, animate=False)
            self.query_one("#passphrase", Input).focus()
        elif self.networks:
            self._fill(0)
            table.focus()
        else:
            self.query_one("#ssid", Input).focus()

    def _set_security(self, value: int) -> None:
        if value in {v for _label, v in SECURITY_OPTIONS}:
            self.query_one("#security", Select).value = value

    def _fill(self, index: int) -> None:
        network = self.networks[index]
        ssid = self.query_one("#ssid", Input)
        ssid.value = network.ssid.decode("utf-8", "replace")
        self._set_security(network.security)

    @on(DataTable.RowHighlighted, "#networks")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key is not None and key != OTHER_NETWORK:
            self._fill(int(key))

    @on(DataTable.RowSelected, "#networks")
    def _selected(self, event: DataTable.RowSelected) -> None:
        key = event.row_key.value
        if key == OTHER_NETWORK:
            self.action_other()
            return
        if key is not None:
            self._fill(int(key))
            if not self.networks[int(key)].ssid:
                self.query_one("#ssid", Input).focus()
                self.query_one("#error", Static).update("A hidden network: type its name.")
                return
        self.query_one("#passphrase", Input).focus()

    @on(Input.Submitted, "#ssid")
    def _ssid_done(self) -> None:
        self.query_one("#passphrase", Input).focus()

    @on(Input.Submitted, "#passphrase")
    def _passphrase_done(self) -> None:
        self.action_submit()

    @on(Checkbox.Changed, "#reveal")
    def _reveal_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#passphrase", Input).password = not event.value

    @on(Button.Pressed, "#join")
    def _join(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()

    def action_reveal(self) -> None:
        box = self.query_one("#reveal", Checkbox)
        box.value = not box.value

    def action_other(self) -> None:
        ssid = self.query_one("#ssid", Input)
        ssid.value = ""
        ssid.focus()

    def action_submit(self) -> None:
        ssid = self.query_one("#ssid", Input).value.encode("utf-8")
        security = self.query_one("#security", Select).value
        passphrase = self.query_one("#passphrase", Input).value
        try:
            creds = validate_wifi(ssid, int(cast(int, security)), passphrase)
        except (WifiParameterError, UnsupportedSecurity) as exc:
            message = str(exc)
            self.query_one("#error", Static).update(f"✗ {message[:1].upper()}{message[1:]}")
            return
        self.dismiss(NetworkChoice(creds.ssid, creds.passphrase, int(creds.security)))

    def action_cancel(self) -> None:
        self.dismiss(None)


# ---- result --------------------------------------------------------------------------------


class ResultScreen(Screen[None]):
    """Success (identifier, time taken) or failure (plain words and the next action)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "back", "Back to devices", priority=True),
        Binding("escape", "back", "Back", show=False),
        Binding("m", "my_devices", "My devices"),
    ]

    def __init__(self, outcome: PairingOutcome) -> None:
        super().__init__()
        self.outcome = outcome

    def compose(self) -> ComposeResult:
        outcome = self.outcome
        report = outcome.report
        yield Header()
        with Vertical(id="result"):
            if report.ok:
                model = report.device.model if report.device else ""
                yield Label(
                    Text(f"✓ {outcome.name} is set up", style="bold green"), classes="title"
                )
                lines = [
                    f"Identifier   {report.short_id}",
                    f"Model        {model}",
                    f"Took         {report.total_s:.1f} s",
                    "Cloud        "
                    + (
                        "checked in"
                        if report.checked_in
                        else "not checked in yet (it will when it is online)"
                    ),
                ]
                yield Static("\n".join(lines), id="summary")
            else:
                yield Label(
                    Text(f"✗ {outcome.name} was not set up", style="bold red"), classes="title"
                )
                yield Static(self._failure_text(), id="summary")
            yield Static("Enter: back to the device list   m: my devices", classes="hint")
        yield Footer()

    def _failure_text(self) -> Text:
        outcome = self.outcome
        report = outcome.report
        if outcome.error:
            return Text.assemble(
                ("The cloud could not complete the pairing.\n", "bold"),
                (f"{outcome.error}\n\n", ""),
                ("Next: ", "bold"),
                "check the cloud URL and token in Settings (s on the device list), then try again.",
            )
        what, hint = explain(report.status)
        hint = report.hint or hint  # the flow's own advice (a lost link, the cloud) comes first
        if report.outside_ds1:
            # Not about the device (the cloud unreachable or failing, the token refused):
            # the DS1 status is only the nearest one, and its words speak of the device.
            what, why = report.message, report.cause
        else:
            why = f"status {int(report.status)} ({report.status.name.lower()})"
        text = Text.assemble(
            (f"{what}\n", "bold"),
            (f"Stopped at: {report.stage.value} · {why} after {report.total_s:.1f} s\n", ""),
        )
        if report.message and report.message not in (what, "Cancelled."):
            text.append(f"Details: {report.message}\n")
        if hint:
            text.append("\nNext: ", style="bold")
            text.append(hint)
        return text

    def on_mount(self) -> None:
        self.sub_title = "Result"

    def action_back(self) -> None:
        _app(self).back_to_devices()

    def action_my_devices(self) -> None:
        _app(self).back_to_devices()
        self.app.push_screen(MyDevicesScreen())


# ---- my devices ----------------------------------------------------------------------------


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question (unbind)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm-dialog"):
            yield Label(self.question, classes="title")
            if self.detail:
                yield Static(self.detail)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed, "#yes")
    def _yes(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#no")
    def _no(self) -> None:
        self.dismiss(False)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def _result_word(status: int, status_name: str) -> str:
    """A short word for the history's Result column (80 columns)."""
    if status_name in ("ok", "cancelled", "error"):
        return {"ok": "ok", "cancelled": "cancelled", "error": "cloud err"}[status_name]
    return f"failed {status}"


class MyDevicesScreen(Screen[None]):
    """The cloud's owner view (§6.5) and this phone's onboarding history; unbind from here."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("u", "unbind", "Unbind"),
        Binding("r", "reload", "Refresh"),
        Binding("tab", "app.focus_next", "Switch list", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.owned: list[OwnedDevice] = []
        self.pairings: list[HistoryEntry] = []
        self.loaded = False  # the first load has finished
        self._loading: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="mine"):
            yield Label("In your account", classes="title")
            yield DataTable(id="owned", cursor_type="row")
            yield Static("", id="owned-status", classes="hint")
            yield Label("Pairings on this phone", classes="title")
            yield DataTable(id="history", cursor_type="row")
            yield Static("", id="history-status", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "My devices"
        owned = self.query_one("#owned", DataTable)
        owned.add_column("Identifier", key="id", width=10)
        owned.add_column("Model", key="model", width=20)
        owned.add_column("State", key="state", width=8)
        owned.add_column("Epoch", key="epoch", width=5)
        owned.add_column("Bound", key="bound", width=16)
        history = self.query_one("#history", DataTable)
        history.add_column("When", key="when", width=16)
        history.add_column("Device", key="device", width=13)
        history.add_column("Model", key="model", width=13)
        history.add_column("Id", key="id", width=8)
        history.add_column("Result", key="result", width=10)
        history.add_column("Took", key="took", width=5)
        self.query_one("#owned-status", Static).update("Loading…")
        owned.focus()
        self._loading = self.load()
        refresh_s = _app(self).devices_refresh_s
        if refresh_s > 0:
            self.set_interval(refresh_s, self._refresh_if_shown)

    def on_screen_resume(self) -> None:
        """Back from another screen or a dialog: what it did may have changed the lists."""
        self._refresh_if_shown()

    def _refresh_if_shown(self) -> None:
        # Not under a dialog (an unbind being confirmed), not while a load runs.
        if self.app.screen is self and (self._loading is None or self._loading.is_finished):
            self._loading = self.load()

    @work(exclusive=True, group="my-devices", exit_on_error=False)
    async def load(self) -> None:
        app = _app(self)
        self.loaded = False
        try:
            await self._load_history(app)
            await self._load_owned(app)
        finally:
            self.loaded = True

    async def _load_history(self, app: PhoneApp) -> None:
        table = self.query_one("#history", DataTable)
        status = self.query_one("#history-status", Static)
        try:
            entries = await app.history.recent(50)
        except Exception as exc:
            status.update(f"Cannot read the history: {exc}")
            return
        row = table.cursor_row
        selected = (
            (self.pairings[row].at, self.pairings[row].device_name)
            if 0 <= row < len(self.pairings)
            else None
        )
        self.pairings = entries
        table.clear()
        for index, e in enumerate(entries):
            table.add_row(
                app.format_time(e.at),
                e.device_name,
                e.model or "—",
                e.identifier or "—",
                Text(_result_word(e.status, e.status_name), style="green" if e.ok else "red"),
                f"{e.duration_s:.0f}s" if e.duration_s >= 10 else f"{e.duration_s:.1f}s",
                key=str(index),
            )
        # The cursor stays on its entry when newer pairings push it down.
        keys = [(e.at, e.device_name) for e in entries]
        if entries:
            table.move_cursor(
                row=keys.index(selected) if selected in keys else min(row, len(keys) - 1)
            )
        table.display = bool(entries)
        status.update("" if entries else "No pairings on this phone yet.")

    async def _load_owned(self, app: PhoneApp) -> None:
        table = self.query_one("#owned", DataTable)
        status = self.query_one("#owned-status", Static)
        if app.cloud is None:
            table.display = False
            status.update("No cloud configured: set the URL and token in Settings.")
            return
        try:
            devices = list(await app.cloud.list_devices())
        except Exception as exc:
            # A refresh that fails keeps the rows already shown (and says so).
            table.display = bool(self.owned)
            shown = " (showing the last list)" if self.owned else ""
            status.update(Text(f"The cloud is not reachable: {exc}{shown}", style="red"))
            return
        row = table.cursor_row
        selected = self.owned[row].identifier if 0 <= row < len(self.owned) else None
        was_hidden = not table.display
        self.owned = devices
        table.clear()
        for index, d in enumerate(devices):
            table.add_row(
                d.identifier.hex()[:8],
                d.model,
                Text(d.state, style="green" if d.state == "active" else "yellow"),
                str(d.epoch),
                app.format_time(d.bound_at),
                key=str(index),
            )
        # The cursor stays on the device it was on, wherever that row is now (if
        # the device is gone, on the row where it was).
        identifiers = [d.identifier for d in devices]
        if devices:
            fallback = min(row, len(devices) - 1)
            table.move_cursor(
                row=identifiers.index(selected) if selected in identifiers else fallback
            )
        table.display = bool(devices)
        if devices and was_hidden:  # the list appears: it takes the keys (`u` acts on it)
            table.focus()
        status.update("" if devices else "No devices in your account yet.")

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_reload(self) -> None:
        self.load()

    def action_unbind(self) -> None:
        table = self.query_one("#owned", DataTable)
        if not self.owned or table.row_count == 0:
            self.notify("No device to unbind.", severity="warning")
            return
        device = self.owned[table.cursor_row]
        self.confirm_unbind(device)

    @work(exclusive=True, group="unbind", exit_on_error=False)
    async def confirm_unbind(self, device: OwnedDevice) -> None:
        app = _app(self)
        short = device.identifier.hex()[:8]
        yes = await app.push_screen_wait(
            ConfirmScreen(
                f"Unbind {device.model} ({short})?",
                "It leaves your account and must be factory-reset and paired again.",
            )
        )
        if not yes or app.cloud is None:
            return
        try:
            await app.cloud.unbind(device.identifier)
        except Exception as exc:
            self.notify(f"Unbind failed: {exc}", severity="error")
            return
        self.notify(f"Unbound {short}.")
        self._loading = self.load()  # replaces a reload that started before the unbind


# ---- settings ------------------------------------------------------------------------------


class SettingsScreen(Screen[None]):
    """Cloud URL and token; the saved token is never shown in full."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, *, first_run: bool) -> None:
        super().__init__()
        self.first_run = first_run

    def compose(self) -> ComposeResult:
        config = _app(self).config
        yield Header()
        with Vertical(id="settings"):
            if self.first_run:
                yield Label("Welcome to Doorstep", classes="title")
                yield Static(
                    "Connect this phone to your Doorstep cloud: its URL and your account's token.",
                )
            else:
                yield Label("Settings", classes="title")
            yield Label("Cloud URL")
            yield Input(config.cloud_url, placeholder="https://cloud.example", id="url")
            yield Label("Token")
            saved = mask_token(config.token)
            yield Input(
                placeholder=f"saved {saved} — type to replace" if saved else "your account's token",
                password=True,
                id="token",
            )
            yield Static("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", id="save", variant="primary")
                yield Button("Back (Esc)", id="back")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "Settings"
        app = _app(self)
        for widget in self.query(Input):
            widget.cursor_blink = app.cursor_blink
        self.query_one("#url", Input).focus()

    @on(Input.Submitted, "#url")
    def _url_done(self) -> None:
        self.query_one("#token", Input).focus()

    @on(Input.Submitted, "#token")
    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#back")
    def _back(self) -> None:
        self.action_back()

    def action_save(self) -> None:
        app = _app(self)
        url = self.query_one("#url", Input).value.strip().rstrip("/")
        token_input = self.query_one("#token", Input)
        token = token_input.value.strip() or app.config.token
        error = self.query_one("#error", Static)
        if not url.startswith(("http://", "https://")):
            error.update("✗ The cloud URL must start with http:// or https://")
            return
        if not token:
            error.update("✗ A token is needed (ask your cloud administrator: cloud user add).")
            return
        problem = app.apply_config(PhoneConfig(url, token))
        token_input.value = ""
        if problem:
            error.update(f"✗ {problem}")
            return
        self.notify(f"Saved. Token {mask_token(token)}.")
        self.app.pop_screen()

    def action_back(self) -> None:
        self.app.pop_screen()


__all__ = [
    "EMPTY_NEARBY",
    "ChooseNetworkScreen",
    "ConfirmCodeScreen",
    "ConfirmScreen",
    "DevicesScreen",
    "MyDevicesScreen",
    "PairingScreen",
    "ResultScreen",
    "SettingsScreen",
]
