"""The hub operator's console (Textual): pending devices with Accept / Reject and the code.

The console only orchestrates (STYLE.md §8): the ``HubCommissioner`` runs in a
worker; devices awaiting the operator are resolved through ``ConsoleOperator``.
"""

from __future__ import annotations

import asyncio
import time

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from hub.runtime import DeviceProgress, HubCommissioner, PendingDevice


class ConsoleOperator:
    """An ``Operator`` whose answers come from the console's Accept / Reject keys."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[bool]] = {}

    async def confirm(self, device: PendingDevice) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[device.address] = future
        try:
            return await future
        finally:
            self._waiting.pop(device.address, None)

    def answer(self, address: str, accept: bool) -> bool:
        future = self._waiting.get(address)
        if future is None or future.done():
            return False
        future.set_result(accept)
        return True

    @property
    def waiting(self) -> set[str]:
        return set(self._waiting)


def bars(rssi: int) -> str:
    for n, floor in ((4, -55), (3, -67), (2, -75), (1, -85)):
        if rssi >= floor:
            return "▂▄▆█"[:n].ljust(4, "·")
    return "····"


class HubConsole(App[None]):
    """Lists the devices the hub sees and is onboarding."""

    TITLE = "Doorstep hub"
    BINDINGS = [
        Binding("a", "accept", "Accept"),
        Binding("r", "reject", "Reject"),
        Binding("q", "quit", "Quit"),
    ]
    CSS = """
    #summary { height: 3; padding: 0 1; }
    DataTable { height: 1fr; }
    """

    def __init__(self, hub: HubCommissioner, operator: ConsoleOperator, title: str = "") -> None:
        super().__init__()
        self.hub = hub
        self.operator = operator
        self.sub_title = title
        self._stop = asyncio.Event()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="summary")
        yield DataTable(id="devices", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("Device", "Model", "Signal", "Waiting", "Code", "State")
        self.hub.on_change = self.refresh_table
        self.run_worker(self.hub.run(self._stop), exclusive=True, name="hub")
        self.set_interval(1.0, self.refresh_table)
        self.refresh_table()

    def refresh_table(self) -> None:
        table = self.query_one(DataTable)
        now = time.monotonic()
        selected = self._selected_address()
        table.clear()
        order = sorted(
            self.hub.devices.values(),
            key=lambda d: (d.address not in self.operator.waiting, d.first_seen),
        )
        for d in order:
            waiting = d.address in self.operator.waiting
            code = f"{d.sas[:3]} {d.sas[3:]}" if d.sas and waiting else ""
            state = "ACCEPT? (a/r)" if waiting else d.progress.value
            if d.progress is DeviceProgress.ONBOARDED and d.identifier:
                state = f"onboarded {d.identifier}"
            table.add_row(
                d.name,
                d.model or "…",
                bars(d.rssi),
                f"{d.waiting_s(now):.0f} s",
                code,
                state,
                key=d.address,
            )
        if selected is not None and selected in self.hub.devices:
            table.move_cursor(row=table.get_row_index(selected))
        s = self.hub.stats
        # A restarted hub said "Onboarded 0" however many it had brought in before.
        before = f" (and {s.onboarded_before} before this run)" if s.onboarded_before else ""
        self.query_one("#summary", Static).update(
            f"Onboarded {s.onboarded}{before}   failed {s.failed}   rejected {s.rejected}   "
            f"waiting for you {len(self.operator.waiting)}   parallel ≤ {self.hub.max_parallel}"
        )

    def _selected_address(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:
            return None
        return str(key.value) if key.value is not None else None

    def _answer(self, accept: bool) -> None:
        address = self._selected_address()
        waiting = self.operator.waiting
        if address not in waiting and len(waiting) == 1:
            address = next(iter(waiting))
        if address is None or not self.operator.answer(address, accept):
            self.notify("Select a device that is waiting for you", severity="warning")
            return
        self.refresh_table()

    def action_accept(self) -> None:
        self._answer(True)

    def action_reject(self) -> None:
        self._answer(False)

    async def action_quit(self) -> None:
        self._stop.set()
        self.exit()
