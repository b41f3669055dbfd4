"""Benchmark: how many devices a hub onboards per minute, by ``--max-parallel``.

Per setting, a fresh system of real processes (``demo.stack.Stack``): the BLE
simulator with its timing model (connection interval 30 ms, advertising
100 ms, MTU 247), the cloud on SQLite, a hub (``doorstep hub run``) onboarded
by ``doorstep phone pair``, and N factory-fresh devices (``doorstep device
run``) whose simulated Wi-Fi join takes no time (the shipped home with
``join_delay_ms`` 0), so the figure is the hub's BLE and cloud work.

The hub's own onboarding is excluded: once paired it is stopped, the devices
are started and advertising, and the hub is restarted on its state with
``--confirm accept --max-parallel P``. The window runs from the first
onboarding's start to the end of the N-th successful one, both from the hub's
registry (``started_at``, ``duration_s``); process start-up is not in it.

Goal: at least 60 onboardings per minute with 4 in parallel.

Run: ``.venv/bin/python bench/hub_throughput.py [--devices N] [--parallel 1 4 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hub_process_helpers import (  # noqa: E402
    HubProcess,
    onboarded_hub,
    poll,
    running_stack,
    write_wifi,
)

GOAL_PARALLEL = 4
GOAL_PER_MINUTE = 60.0
SETTING_TIMEOUT_S = 300.0


@dataclass
class Result:
    parallel: int
    devices: int
    onboarded: int
    failed: int
    window_s: float
    mean_s: float
    peak: int

    @property
    def per_minute(self) -> float:
        return 60.0 * self.onboarded / self.window_s if self.window_s > 0 else 0.0


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def one_setting(workdir: Path, devices: int, parallel: int, say) -> Result:
    async with running_stack(
        workdir, timing=True, interval_ms=30.0, adv_interval_ms=100.0, mtu=247
    ) as stack:
        stack.wifi_file = write_wifi(workdir / "wifi.json", join_delay_ms=0)
        started = time.monotonic()
        hub: HubProcess = await onboarded_hub(stack, max_parallel=parallel)
        await hub.kill(signal.SIGTERM)
        say(f"hub onboarded and stopped ({time.monotonic() - started:.1f} s)")
        handles = await stack.add_devices(devices)
        say(f"{devices} devices advertising; restarting the hub with --max-parallel {parallel}")
        await hub.start(confirm="accept", max_parallel=parallel)
        rows = await poll(
            hub.rows,
            lambda rows: len({r["address"] for r in rows if r["final"]}) >= len(handles),
            SETTING_TIMEOUT_S,
            every=0.5,
            what=f"{devices} devices settled",
            stack=stack,
        )
    finals = [r for r in rows if r["final"]]
    ok = [r for r in finals if r["status"] == 0]
    first = min(r["started_at"] for r in rows)
    ends = sorted(r["started_at"] + r["duration_s"] for r in ok)
    window = (ends[-1] - first) if ends else 0.0
    spans = [(r["started_at"], r["started_at"] + r["duration_s"]) for r in rows]
    return Result(
        parallel=parallel,
        devices=devices,
        onboarded=len(ok),
        failed=len(finals) - len(ok),
        window_s=window,
        mean_s=statistics.fmean(r["duration_s"] for r in ok) if ok else 0.0,
        peak=peak_overlap(spans),
    )


async def main(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="doorstep-hub-bench-") as tmp:
        for parallel in args.parallel:
            print(f"--max-parallel {parallel}: fresh stack", flush=True)
            result = await asyncio.wait_for(
                one_setting(Path(tmp) / f"p{parallel}", args.devices, parallel, say),
                SETTING_TIMEOUT_S + 120,
            )
            say(
                f"{result.onboarded}/{result.devices} onboarded in {result.window_s:.1f} s "
                f"({result.per_minute:.1f}/min)"
            )
            results.append(result)

    print()
    print(
        f"hub throughput: {args.devices} devices, timing model 30 ms interval, "
        "advertising 100 ms, MTU 247, Wi-Fi join 0 ms"
    )
    print(
        f"{'parallel':>8} {'ok':>5} {'failed':>6} {'window':>9} {'per min':>8} "
        f"{'mean each':>10} {'peak':>5}"
    )
    for r in results:
        print(
            f"{r.parallel:>8} {r.onboarded:>5} {r.failed:>6} {r.window_s:>8.1f}s "
            f"{r.per_minute:>8.1f} {r.mean_s:>9.2f}s {r.peak:>5}"
        )
    goal = next((r for r in results if r.parallel == GOAL_PARALLEL), None)
    if goal is None:
        print(f"goal (≥ {GOAL_PER_MINUTE:g}/min with {GOAL_PARALLEL} in parallel): not measured")
        return 0
    met = goal.per_minute >= GOAL_PER_MINUTE and goal.failed == 0
    print(
        f"goal (≥ {GOAL_PER_MINUTE:g}/min with {GOAL_PARALLEL} in parallel, none failed): "
        f"{'MET' if met else 'NOT MET'} ({goal.per_minute:.1f}/min)"
    )
    return 0 if met else 1


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20, help="devices per setting (default 20)")
    parser.add_argument(
        "--parallel", type=int, nargs="+", default=[1, 4, 8], help="--max-parallel settings"
    )
    args = parser.parse_args()
    if not 1 <= args.devices <= 64:
        parser.error("--devices must be 1..64")
    if any(p < 1 for p in args.parallel):
        parser.error("--parallel values must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
