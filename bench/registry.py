"""The cloud's device registry at scale, through the storage layer (issue 4 benchmark).

Imports ``--count`` factory records (default 1 000 000, made beforehand as the
factory would) with their K_init wrapped under a KEK, in batches through
``cloud.cli.import_factory_records`` (batches of 250 000, wrapping pipelined with inserting), then times point lookups by dev_id
through ``Registry.run`` and ``RegistryTransaction.device``, one transaction each. Prints import rows/s and lookup
p50/p99. Goals: import ≥ 100 000 rows/s, lookup p99 ≤ 0.5 ms.

    .venv/bin/python bench/registry.py [--count N] [--db URL] [--lookups N]

``--db`` defaults to a fresh SQLite file; pass ``postgresql://…`` (for example
``$DOORSTEP_TEST_PG_DSN?schema=bench_registry``) to measure PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.cli import import_factory_records, new_factory_record
from cloud.keys import KeyEncryptionKey
from cloud.store.registry import open_registry


async def run(url: str, count: int, lookups: int) -> None:
    registry = await open_registry(url)
    kek = KeyEncryptionKey(os.urandom(32))
    try:
        # The factory made the records; import is wrapping K_init and inserting.
        records = [new_factory_record("Doorstep Bench") for _ in range(count)]
        dev_ids = [r.dev_id for r in records[:: max(1, count // 20000)]]

        def progress(done: int) -> None:
            rate = done / (time.perf_counter() - t0)
            print(f"\r  imported {done:>9,} ({rate:,.0f} rows/s)", end="", flush=True)

        t0 = time.perf_counter()
        await import_factory_records(registry, kek, records, progress=progress)
        elapsed = time.perf_counter() - t0
        print()
        picks = random.Random(1).choices(dev_ids, k=lookups)
        samples = []
        # Each lookup is its own transaction through Registry.run (a thread hop on SQLite).
        for dev_id in picks[:200]:  # warm-up
            await registry.run(lambda tx, d=dev_id: tx.device(d))
        for dev_id in picks:
            s = time.perf_counter()
            record = await registry.run(lambda tx, d=dev_id: tx.device(d))
            samples.append(time.perf_counter() - s)
            assert record is not None
        samples.sort()
        p50 = samples[len(samples) // 2] * 1000
        p99 = samples[int(len(samples) * 0.99)] * 1000
        rate = count / elapsed
        print(
            f"  import: {count:,} rows in {elapsed:.1f} s = {rate:,.0f} rows/s "
            f"(goal ≥ 100,000: {'met' if rate >= 100_000 else 'NOT met'})"
        )
        print(
            f"  point lookup by dev_id ({lookups:,} random): p50 {p50:.3f} ms, p99 {p99:.3f} ms "
            f"(goal p99 ≤ 0.5 ms: {'met' if p99 <= 0.5 else 'NOT met'})"
        )
    finally:
        await registry.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--db", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{Path(tmp) / 'registry.db'}"
        print(f"registry benchmark on {url.split('?')[0].split('@')[-1]}")
        asyncio.run(run(url, args.count, args.lookups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
