"""End-to-end onboarding over the simulator, against the timing model's lower bound (issue 8).

For each setting, N devices (each its own ``doorstep device run`` process) and
the cloud (``doorstep cloud serve``) run against ``doorstep sim`` with the
timing model on; the commissioner is the flow ``doorstep phone pair`` runs
(scan for the device by name, then ``phone.commissioner.Onboarding``), user
prompts auto-accepted, the simulated Wi-Fi join set to 0 ms. Printed per
setting: p50/p95 of the total and of each stage, BLE round trips and
application bytes (GATT values) per onboarding, and the lower bound the
timing model allows for that traffic:

    connect (adv/2 + 3·CI) + GATT discovery (2·(1+1 service+3 characteristics)·CI)
    + 2·CI per write-with-response + the cloud's own time (measured, 2 calls)

Goals: ≤ 3 BLE round trips for handshake + provisioning, ≤ 600 application
bytes each way, p50 ≤ 1.0 s at CI 30 ms / advertising 100 ms, and within
1.5× of the model's lower bound.

    .venv/bin/python bench/onboarding.py [--devices N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.stack import Stack
from phone.commissioner import (
    BindStartAnswer,
    BoundDevice,
    NetworkChoice,
    Onboarding,
    OnboardingReport,
    Stage,
    StageState,
)
from protocol.handshake import BindStartRequest

SETTINGS = [
    ("CI 30 ms, adv 100 ms, MTU 247", 30.0, 100.0, 247),
    ("CI 7.5 ms, adv 20 ms, MTU 247", 7.5, 20.0, 247),
    ("CI 30 ms, adv 100 ms, MTU 23", 30.0, 100.0, 23),
]
SERVICES, CHARACTERISTICS = 1, 3
SETUP_INTERVALS = 3
HOME = NetworkChoice(b"DoorstepHome", "correct horse battery", 1)


class AutoAccept:
    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        return None

    async def confirm_code(self, device: Any, sas: str) -> bool:
        return True

    async def choose_network(self, networks: Any, failure: Any) -> NetworkChoice | None:
        return None if failure is not None else HOME


@dataclass
class TimedCloud:
    """The real cloud link, timing its calls (the part of an onboarding outside BLE)."""

    inner: Any
    spent: float = 0.0

    async def bind_start(self, request: BindStartRequest) -> BindStartAnswer:
        t0 = time.perf_counter()
        try:
            return await self.inner.bind_start(request)  # type: ignore[no-any-return]
        finally:
            self.spent += time.perf_counter() - t0

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice:
        t0 = time.perf_counter()
        try:
            return await self.inner.bind_complete(attempt, ack)  # type: ignore[no-any-return]
        finally:
            self.spent += time.perf_counter() - t0

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        return await self.inner.wait_active(identifier, timeout)  # type: ignore[no-any-return]


@dataclass
class Run:
    total: float
    scan: float
    report: OnboardingReport
    cloud: float
    bound: float
    per_stage: dict[str, float] = field(default_factory=dict)


def lower_bound(ci: float, adv: float, writes: int, cloud: float) -> float:
    connect = adv / 2 + SETUP_INTERVALS * ci
    discovery = 2 * (1 + SERVICES + CHARACTERISTICS) * ci
    return connect + discovery + 2 * ci * writes + cloud


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


async def run_setting(name: str, ci_ms: float, adv_ms: float, mtu: int, n: int) -> dict[str, Any]:
    from ble.bleak_central import BleakCentral
    from phone.cloudlink import CloudLink

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        wifi = workdir / "wifi.json"
        env = json.loads(
            (Path(__file__).parent.parent / "device" / "default_wifi.json").read_text()
        )
        env.setdefault("faults", {})["join_delay_ms"] = 0
        for net in env.get("networks", []):
            net.pop("join_delay_ms", None)
        wifi.write_text(json.dumps(env))
        async with Stack(
            workdir, timing=True, interval_ms=ci_ms, adv_interval_ms=adv_ms, mtu=mtu, wifi_file=wifi
        ) as stack:
            handles = await stack.add_devices(n)
            os.environ.update(stack.env)
            central = BleakCentral()
            link = CloudLink(stack.cloud_url, stack.token)
            runs: list[Run] = []
            try:
                for handle in handles:
                    cloud = TimedCloud(link)
                    t0 = time.perf_counter()
                    address = None
                    while address is None:
                        async for s in central.scan(timeout=2.0):
                            if s.name == handle.name:
                                address = s.address
                                break
                    t_scan = time.perf_counter() - t0
                    report = await Onboarding(central, cloud, AutoAccept(), wait_checkin_s=0).run(
                        address, handle.name
                    )
                    total = time.perf_counter() - t0
                    if not report.ok:
                        raise SystemExit(f"{handle.name}: {report.status.name} {report.message}")
                    writes = report.stats.writes
                    runs.append(
                        Run(
                            total,
                            t_scan,
                            report,
                            cloud.spent,
                            lower_bound(ci_ms / 1000, adv_ms / 1000, writes, cloud.spent),
                            {s.value: t for s, t in report.timings.items()},
                        )
                    )
            finally:
                await link.aclose()
    totals = [r.report.total_s for r in runs]
    bounds = [r.bound for r in runs]
    result = {
        "setting": name,
        "n": len(runs),
        "total_p50": pct(totals, 0.5),
        "total_p95": pct(totals, 0.95),
        "with_scan_p50": pct([r.total for r in runs], 0.5),
        "scan_p50": pct([r.scan for r in runs], 0.5),
        "stages": {
            s.value: (
                pct([r.per_stage.get(s.value, 0) for r in runs], 0.5),
                pct([r.per_stage.get(s.value, 0) for r in runs], 0.95),
            )
            for s in Stage
            if s not in (Stage.DONE, Stage.CHECKIN)
        },
        "round_trips": max(r.report.handshake_round_trips for r in runs),
        "writes": statistics.median(r.report.stats.writes for r in runs),
        "bytes_to_device": max(r.report.stats.bytes_to_device for r in runs),
        "bytes_from_device": max(r.report.stats.bytes_from_device for r in runs),
        "cloud_p50": pct([r.cloud for r in runs], 0.5),
        "bound_p50": pct(bounds, 0.5),
        "ratio_p50": statistics.median(t / b for t, b in zip(totals, bounds, strict=True)),
    }
    return result


def show(r: dict[str, Any], goal_ci30: bool) -> None:
    print(f"\n== {r['setting']}  ({r['n']} onboardings)")
    print(
        f"  total (connect → bind/complete): p50 {r['total_p50']:.3f} s   p95 {r['total_p95']:.3f} s"
        f"   (+ scan p50 {r['scan_p50']:.3f} s)"
    )
    for stage, (p50, p95) in r["stages"].items():
        print(f"    {stage:18s} p50 {p50 * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms")
    print(
        f"  BLE round trips (handshake + provisioning): {r['round_trips']}   "
        f"writes: {r['writes']:.0f}"
    )
    print(
        f"  application bytes: {r['bytes_to_device']} to device, {r['bytes_from_device']} from device"
    )
    print(f"  cloud time p50: {r['cloud_p50'] * 1000:.1f} ms")
    print(
        f"  timing-model lower bound p50: {r['bound_p50']:.3f} s   measured/bound: {r['ratio_p50']:.2f}×"
    )
    checks = [
        ("≤ 3 round trips", r["round_trips"] <= 3),
        ("≤ 600 bytes each way", max(r["bytes_to_device"], r["bytes_from_device"]) <= 600),
        ("within 1.5× of the bound", r["ratio_p50"] <= 1.5),
    ]
    if goal_ci30:
        checks.append(("p50 ≤ 1.0 s", r["total_p50"] <= 1.0))
    print(
        "  goals: " + "   ".join(f"{label}: {'met' if ok else 'NOT met'}" for label, ok in checks)
    )


async def main_async(n: int, only: int | None) -> None:
    for i, (name, ci, adv, mtu) in enumerate(SETTINGS):
        if only is not None and i != only:
            continue
        result = await run_setting(name, ci, adv, mtu, n)
        show(result, goal_ci30=(ci == 30.0 and adv == 100.0 and mtu == 247))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10, help="onboardings per setting")
    parser.add_argument("--setting", type=int, choices=range(len(SETTINGS)), default=None)
    args = parser.parse_args()
    asyncio.run(main_async(args.devices, args.setting))
    return 0


if __name__ == "__main__":
    sys.exit(main())
