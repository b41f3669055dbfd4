"""Can a client tell bind/start refusals apart by their timing? (issue 4)

Against a real server (one worker, SQLite), sends interleaved bind/start
requests that the cloud refuses for different device-related reasons, each
``--tries`` times (default 1 000), and prints the median and p90 latency of
each kind and the largest difference between medians. Every refusal must be
the same 403 ``device_refused`` body; the script says so if one is not.
Figures only, no assertions.

Kinds: an unknown dev_id; a known device whose tag is made under the wrong
K_init; a device owned by another user whose reset_ctr did not rise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cloud_helpers import (  # noqa: E402
    ServerProcess,
    SimDevice,
    bearer,
    new_factory_record,
    onboard,
    start_session,
)
from protocol.factory import FactoryRecord  # noqa: E402
from test_cloud_process import _prepare  # noqa: E402

LIMITS = {f"DOORSTEP_CLOUD_RATE_{k}": "100000000" for k in ("USER", "DEVICE", "ADDRESS")}


async def run(tries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/timing.db"
        (known, owned), (alice, bob) = await _prepare(url, 2, users=2)
        server = ServerProcess(url, **LIMITS)
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                await onboard(client, bob, owned)  # bob owns one device (bound, never reset)
                record = known.record
                wrong_key = FactoryRecord(record.dev_id, record.mac, os.urandom(32), record.model)
                makers = {
                    "unknown dev_id": lambda: start_session(SimDevice(new_factory_record())).request,
                    "bad tag (wrong K_init)": lambda: start_session(SimDevice(wrong_key)).request,
                    "owned by another, no reset": lambda: start_session(owned).request,
                }
                print(f"precomputing {tries:,} requests of each kind …", flush=True)
                requests = {name: [make() for _ in range(tries)] for name, make in makers.items()}
                samples: dict[str, list[float]] = {name: [] for name in makers}
                bodies: set[bytes] = set()
                for _ in range(50):  # warm-up
                    await client.get("/v1/health")
                for i in range(tries):
                    for name in makers:
                        started = time.perf_counter()
                        response = await client.post(
                            "/v1/bind/start", json=requests[name][i], headers=bearer(alice)
                        )
                        samples[name].append(time.perf_counter() - started)
                        bodies.add(response.content)
                        if response.status_code != 403:
                            print(f"  {name}: unexpected {response.status_code}")
        finally:
            server.stop()
    medians = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    for name, values in samples.items():
        p90 = statistics.quantiles(values, n=10)[-1] * 1e6
        print(f"  {name:28s} median {medians[name]:8.1f} µs   p90 {p90:8.1f} µs")
    spread = max(medians.values()) - min(medians.values())
    print(f"largest difference between medians: {spread:.1f} µs over {tries:,} tries each")
    print(f"distinct response bodies: {len(bodies)} (1 means the refusals are identical)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tries", type=int, default=1000)
    asyncio.run(run(parser.parse_args().tries))


if __name__ == "__main__":
    main()
