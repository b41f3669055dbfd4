"""A commissioner in its own process (its own BlueZ adapter), for multi-central tests.

``python tests/ble_central_proc.py ADDRESS MODE [TIMEOUT]`` with ``DBUS_SYSTEM_BUS_ADDRESS``
set. It connects with ``BleakCentral`` without scanning first (so without
the BUSY check) and prints ``CONNECTED``, then:

* ``hold``: waits for a notification and prints ``ENDED <error class>`` when
  the link fails (``ENDED none`` if a notification arrived);
* ``write``: writes the FIRST fragment of a long message, prints ``WRITING``,
  then keeps writing its continuation fragments (never completing it) until
  killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ble.bleak_central import BleakCentral
from ble.errors import LinkError


async def main(address: str, mode: str, timeout: float) -> int:
    try:
        link = await BleakCentral().connect(address, timeout=timeout)
    except LinkError as exc:
        print(f"FAILED {type(exc).__name__}", flush=True)
        return 1
    print("CONNECTED", flush=True)
    if mode == "hold":
        try:
            await link.receive(timeout=10)
        except LinkError as exc:
            print(f"ENDED {type(exc).__name__}", flush=True)
            return 0
        print("ENDED none", flush=True)
        return 0
    # FIRST fragment: header 0x80, declared length 2000, then message bytes.
    size = link.max_fragment
    await link.write(bytes([0x80]) + (2000).to_bytes(2, "big") + b"\x01" * (size - 3))
    print("WRITING", flush=True)
    counter = 1
    while True:
        await link.write(bytes([counter % 64]) + b"\x02" * (size - 1))
        counter += 1
        await asyncio.sleep(0.005)


if __name__ == "__main__":
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], timeout)))
