"""A Doorstep device in its own process: ``DeviceRuntime`` on ``BlessPeripheral`` over BlueZ.

Run as ``python tests/ble_device_proc.py FACTORY_JSON STATE_DIR`` with
``DBUS_SYSTEM_BUS_ADDRESS`` pointing at a (simulated) BlueZ. The device's user
accepts every request; Wi-Fi is the default simulated home with instant joins;
there is no check-in service. Prints ``READY <adapter address> <name>`` once
advertising, ``STATUS <state> <flags>`` on every status change and ``LINK up``
/ ``LINK down`` on link events. Reads commands from stdin: ``button`` (press
the pairing button) and ``stop``; EOF stops too.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ble.bless_peripheral import BlessPeripheral
from ble.profile import DeviceStatus
from ble.transport import LinkDown, LinkUp, PeripheralEvent
from device.runtime import ConfirmRequest, DeviceRuntime
from device.storage import DeviceStore
from device.wifi import WifiEnvironment
from protocol.factory import FactoryRecord


class AcceptingUser:
    async def confirm(self, request: ConfirmRequest) -> bool:
        return True

    async def show(self, message: str) -> None:
        return None


class ReportingPeripheral(BlessPeripheral):
    """Reports status and link changes on stdout for the test's synchronisation."""

    async def set_status(self, status: DeviceStatus) -> None:
        await super().set_status(status)
        print(f"STATUS {int(status.state)} {status.flags}", flush=True)

    async def next_event(self) -> PeripheralEvent:
        event = await super().next_event()
        if isinstance(event, LinkUp | LinkDown):
            print(f"LINK {'up' if isinstance(event, LinkUp) else 'down'}", flush=True)
        return event


async def main(factory_path: str, state_dir: str) -> int:
    factory = FactoryRecord.loads(Path(factory_path).read_text())
    wifi = WifiEnvironment.default()
    wifi.set_join_delay(0)
    peripheral = ReportingPeripheral()
    runtime = DeviceRuntime(
        factory, DeviceStore(Path(state_dir)), peripheral, wifi, AcceptingUser(), None
    )
    task = asyncio.create_task(runtime.run())
    await runtime.started.wait()
    print(f"READY {peripheral.address} {factory.ble_name}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if line == "button":
            runtime.press_button()
            print("OK button", flush=True)
        elif line in ("stop", ""):
            break
    runtime.stop()
    await asyncio.wait_for(task, 10)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
