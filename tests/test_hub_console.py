"""The hub operator's console (Textual Pilot): pending devices, Accept / Reject with the code."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable

from hub.console import ConsoleOperator, HubConsole
from hub.registry import HubRegistry
from hub.runtime import DeviceProgress, HubCommissioner
from test_hub_memory import HOME, fleet


async def wait_for(predicate, pilot, tries: int = 400) -> None:
    for _ in range(tries):
        if predicate():
            return
        await pilot.pause(0.01)
    raise AssertionError("condition not reached")


async def test_operator_accepts_one_and_rejects_another(tmp_path: Path) -> None:
    async with fleet(tmp_path, 2) as (air, cloud, runtimes):
        async with HubRegistry(tmp_path / "hub.db") as registry:
            operator = ConsoleOperator()
            hub = HubCommissioner(
                air.central(), cloud, operator, HOME, registry, max_parallel=1, scan_period_s=0.01
            )
            app = HubConsole(hub, operator, title="test")
            async with app.run_test(size=(100, 30)) as pilot:
                await wait_for(lambda: len(operator.waiting) == 1, pilot)
                (address,) = operator.waiting
                pending = hub.devices[address]
                assert len(pending.sas) == 6 and pending.model.startswith("Doorstep Plug")
                app.refresh_table()
                row = app.query_one(DataTable).get_row(address)
                assert row[0] == pending.name and row[1] == pending.model
                assert row[4] == f"{pending.sas[:3]} {pending.sas[3:]}"  # the code to compare
                assert row[5] == "ACCEPT? (a/r)"
                await pilot.press("a")
                await wait_for(lambda: pending.progress is DeviceProgress.ONBOARDED, pilot)
                await wait_for(lambda: len(operator.waiting) == 1, pilot)
                (second,) = operator.waiting
                assert second != address
                await pilot.press("r")
                await wait_for(
                    lambda: hub.devices[second].progress is DeviceProgress.REJECTED, pilot
                )
                assert hub.stats.onboarded == 1 and hub.stats.rejected == 1
                await pilot.press("q")
            # Restarted, the hub counts what it brought in before (it said "Onboarded 0").
            hub = HubCommissioner(
                air.central(), cloud, operator, HOME, registry, scan_period_s=0.01
            )
            app = HubConsole(hub, operator, title="test")
            async with app.run_test(size=(100, 30)) as pilot:
                await wait_for(lambda: hub.stats.onboarded_before == 1, pilot)
                app.refresh_table()
                summary = str(app.query_one("#summary").render())
                assert summary.startswith("Onboarded 0 (and 1 before this run)   failed 0"), summary
                await pilot.press("q")
        await asyncio.sleep(0.05)
        rejected = next(rt for rt in runtimes if rt.factory.mac_text == second)
        assert rejected.state.pending is None and rejected.state.active is None
