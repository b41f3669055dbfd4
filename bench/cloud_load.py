"""Cloud load benchmark: bind/start + bind/complete against a real server (one worker).

Starts ``doorstep cloud serve`` on SQLite (and on PostgreSQL beside it when
DOORSTEP_TEST_PG_DSN is set), registers devices, precomputes M1/M2 with the
protocol core, then drives the endpoint from this separate process and prints
requests/s, p50, p99, the ratio to a bare endpoint of the same app
(GET /v1/health, the floor) and the server's peak RSS. Figures only, no
assertions. Usage: ``python bench/cloud_load.py [--seconds 8] [--concurrency 32]``.
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
    PG_DSN,
    ServerProcess,
    SimDevice,
    new_factory_record,
    pg_url,
    start_session,
)
from test_cloud_process import _prepare  # noqa: E402

LIMITS = {f"DOORSTEP_CLOUD_RATE_{k}": "100000000" for k in ("USER", "DEVICE", "ADDRESS")}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(base: str, requests: list[tuple[str, str, dict[str, str] | None, dict[str, str]]],
                concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal index, errors
            while time.perf_counter() < deadline and index < len(requests):
                method, path, body, headers = requests[index]
                index += 1
                started = time.perf_counter()
                response = await client.request(method, path, json=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, errors


def fmt(name: str, rate: float, lat: list[float], errors: int) -> str:
    q = statistics.quantiles(lat, n=100)
    return f"{name:28s} {rate:8.0f} req/s  p50 {q[49]*1e3:6.2f} ms  p99 {q[98]*1e3:6.2f} ms  errors {errors}"


async def run(url: str, label: str, seconds: float, concurrency: int, devices: int) -> None:
    sims, (token,) = await _prepare(url, devices)
    headers = {"authorization": f"Bearer {token}"}
    print(f"[{label}] precomputing {devices} M1/M2 pairs …", flush=True)
    starts = [("POST", "/v1/bind/start", start_session(d).request, headers) for d in sims]
    server = ServerProcess(url, **LIMITS)
    server.start()
    try:
        floor = [("GET", "/v1/health", None, {})] * 10**6
        f_rate, f_lat, f_err = await drive(server.base_url, floor, concurrency, seconds)
        print(fmt(f"[{label}] floor GET /v1/health", f_rate, f_lat, f_err))
        s_rate, s_lat, s_err = await drive(server.base_url, starts, concurrency, seconds)
        print(fmt(f"[{label}] POST /v1/bind/start", s_rate, s_lat, s_err))
        print(f"[{label}] ratio bind/start / floor: {s_rate / f_rate:.2f}")
        half = max(1, concurrency // 8)
        rest = starts[len(s_lat):]
        h_rate, h_lat, h_err = await drive(server.base_url, rest, half, seconds / 2)
        print(fmt(f"[{label}] bind/start @ c={half}", h_rate, h_lat, h_err))
        assert server.process is not None
        print(f"[{label}] server peak RSS: {peak_rss_mb(server.process.pid):.1f} MB", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--devices", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(f"sqlite:///{tmp}/bench.db", "sqlite", args.seconds, args.concurrency, args.devices))
    if PG_DSN:
        asyncio.run(run(pg_url(), "postgresql", args.seconds, args.concurrency, args.devices))
    _ = (SimDevice, new_factory_record, os)


if __name__ == "__main__":
    main()
