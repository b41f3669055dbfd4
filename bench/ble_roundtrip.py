"""Benchmark: one DS1 request/response over the simulated BlueZ.

A round trip is: write-with-response to ``rx``, the peripheral (bless, in its
own process) notifies on ``tx``, the central (bleak, this process) awaits the
notification. The simulator runs as ``doorstep sim`` in a third process.

Goals:
* timing model on, connection interval 30 ms and 7.5 ms: median within 10 %
  of two intervals;
* timing model off: simulator overhead per round trip at most 2 ms.

Run: ``.venv/bin/python bench/ble_roundtrip.py``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bleak import BleakClient, BleakScanner

from bluezsim import SimProcess
from bluezsim.echo_peripheral import RX_CHAR, TX_CHAR, EchoPeripheralProcess

NAME = "Doorstep-0001"


async def measure(client: BleakClient, inbox: asyncio.Queue[bytes], samples: int) -> list[float]:
    times: list[float] = []
    for i in range(samples + 3):
        payload = i.to_bytes(4, "big") * 4
        start = time.perf_counter()
        await client.write_gatt_char(RX_CHAR, payload, response=True)
        echoed = await asyncio.wait_for(inbox.get(), timeout=5)
        elapsed = time.perf_counter() - start
        if echoed != payload:
            raise RuntimeError(f"round trip {i}: got {echoed!r}, sent {payload!r}")
        if i >= 3:  # warm-up
            times.append(elapsed)
    return times


async def main() -> int:
    async with SimProcess(timing=False, mtu=247) as sim:
        os.environ.update(sim.env())
        async with EchoPeripheralProcess(sim.env()):
            device = await BleakScanner.find_device_by_name(NAME, timeout=5)
            if device is None:
                print("peripheral not found")
                return 1
            inbox: asyncio.Queue[bytes] = asyncio.Queue()
            async with BleakClient(device) as client:
                await client.start_notify(TX_CHAR, lambda _c, data: inbox.put_nowait(bytes(data)))
                results: list[tuple[str, float, float, bool]] = []
                for interval in (30.0, 7.5):
                    await sim.control.set_timing(True, interval)
                    samples = 40 if interval >= 30 else 100
                    median = statistics.median(await measure(client, inbox, samples))
                    target = 2 * interval / 1000
                    ok = abs(median - target) <= 0.10 * target
                    results.append((f"interval {interval:g} ms", median, target, ok))
                await sim.control.set_timing(False)
                median = statistics.median(await measure(client, inbox, 300))
                results.append(("timing off (overhead)", median, 0.002, median <= 0.002))
    print(f"{'case':<24}{'median':>12}  {'goal':<30}result")
    all_ok = True
    for case, median, target, ok in results:
        if case.startswith("timing off"):
            goal = f"<= {target * 1000:.1f} ms"
        else:
            goal = f"{target * 1000:.1f} ms +/- 10 %"
            deviation = (median - target) / target * 100
            goal += f" ({deviation:+.1f} %)"
        print(f"{case:<24}{median * 1000:>9.2f} ms  {goal:<30}{'MET' if ok else 'NOT MET'}")
        all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
