"""Helpers for the bluezsim tests: a bleak central in its own process."""

from __future__ import annotations

import asyncio
import sys

from bleak import BleakClient, BleakScanner

from bluezsim.echo_peripheral import RX_CHAR

# Run as ``python tests/bluezsim_helpers.py NAME``: connect to NAME and write to
# rx forever, printing WRITING once the first write went through.
CENTRAL_WRITER = __file__


async def _write_forever(name: str) -> int:
    device = await BleakScanner.find_device_by_name(name, timeout=10)
    if device is None:
        print("NOT FOUND", flush=True)
        return 1
    async with BleakClient(device) as client:
        i = 0
        while True:
            await client.write_gatt_char(RX_CHAR, i.to_bytes(4, "big"), response=True)
            if i == 0:
                print("WRITING", flush=True)
            i += 1


if __name__ == "__main__":
    sys.exit(asyncio.run(_write_forever(sys.argv[1])))
