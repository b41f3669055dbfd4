"""``doorstep sim``: run the simulated BlueZ until SIGINT/SIGTERM.

Prints exactly one line on stdout, ``DBUS_SYSTEM_BUS_ADDRESS=<address>``, once
the simulator owns ``org.bluez``. Other processes use it by exporting that
variable; to also pass bleak's BlueZ version check, prepend the shim directory
(reported on stderr, and by the control method
``org.doorstep.Sim1.GetEnvironment`` as ``BLUEZSIM_SHIM_DIR``) to ``PATH``.
``--interval-ms``/``--adv-interval-ms`` switch the timing model on unless
``--no-timing`` is given; without them (or ``--timing``) it is off.
Out-of-range options are refused with one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
from typing import Any

from bluezsim import att
from bluezsim.simulator import Simulator
from bluezsim.timing import TimingModel

# What ``--help`` shows (the module docstring is reStructuredText).
DESCRIPTION = (
    "Run a simulated BlueZ (org.bluez on a private D-Bus) until SIGINT/SIGTERM. Once it "
    "serves, it prints one line on stdout, DBUS_SYSTEM_BUS_ADDRESS=<address>: export it "
    "in the processes that should use it. Unless --timing or an interval option is given, "
    "the timing model is off: connecting, GATT discovery and ATT traffic take no simulated "
    "time, and a scan sees an advertiser at once."
)

# BLE's ranges (Core Specification, Vol 6, Part B, 4.4.2.2 and 4.5): the
# simulator refuses what no controller would accept.
CONNECTION_INTERVAL_MS = (7.5, 4000.0)
ADVERTISING_INTERVAL_MS = (20.0, 10240.0)
SUPERVISION_TIMEOUT_MS = (100.0, 32000.0)
# RSSI is reported in -127..20 dBm: a wider jitter changes nothing.
RSSI_JITTER_DB = (0, 147)

_DEFAULT_TIMING = TimingModel()


def add_parser(subparsers: Any) -> None:
    """Register the ``sim`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "sim", help="run a simulated BlueZ on a private D-Bus", description=DESCRIPTION
    )
    configure(parser)
    parser.set_defaults(func=run)


def configure(parser: argparse.ArgumentParser) -> None:
    low, high = CONNECTION_INTERVAL_MS
    parser.add_argument(
        "--interval-ms", type=float, default=None,
        help=f"BLE connection interval, {low:g}..{high:g} ms; giving it turns the timing "
        f"model on. Without it: {_DEFAULT_TIMING.interval_ms:g} ms while the model is on",
    )
    low, high = ADVERTISING_INTERVAL_MS
    parser.add_argument(
        "--adv-interval-ms", type=float, default=None,
        help=f"advertising interval, {low:g}..{high:g} ms; giving it turns the timing "
        f"model on. Without it: {_DEFAULT_TIMING.adv_interval_ms:g} ms",
    )
    low, high = SUPERVISION_TIMEOUT_MS
    parser.add_argument(
        "--supervision-timeout-ms", type=float, default=_DEFAULT_TIMING.supervision_timeout_ms,
        help=f"how long a link that went silent takes to drop, {low:g}..{high:g} ms "
        "(default %(default)g)",
    )
    parser.add_argument("--mtu", type=int, default=att.MAX_MTU,
                        help=f"ATT MTU negotiated on every link ({att.MIN_MTU}..{att.MAX_MTU})")
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=None,
                        help="force the timing model on or off, whatever the interval options; "
                        "without this option it is on only when an interval is given")
    parser.add_argument("--seed", type=int, default=0, help="seed for RSSI jitter and phases")
    low_db, high_db = RSSI_JITTER_DB
    parser.add_argument(
        "--rssi-jitter-db", type=int, default=0,
        help=f"vary each sighting's RSSI randomly by up to ± this many dB, {low_db}..{high_db} "
        "(default 0: no jitter)",
    )
    parser.add_argument("--connect-timeout", type=float, default=20.0,
                        help="seconds before a connect to an unreachable device fails")


def check_range(option: str, value: float, bounds: tuple[float, float], what: str) -> None:
    """ValueError, one line naming ``option`` and its range, unless ``value`` is in ``bounds``."""
    low, high = bounds
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{option} must be in {low:g}..{high:g} {what}, got {value:g}")


def check_intervals(interval_ms: float | None, adv_interval_ms: float | None) -> None:
    """ValueError for a connection or advertising interval outside BLE's range."""
    if interval_ms is not None:
        check_range("--interval-ms", interval_ms, CONNECTION_INTERVAL_MS,
                    "ms (BLE's connection interval range)")
    if adv_interval_ms is not None:
        check_range("--adv-interval-ms", adv_interval_ms, ADVERTISING_INTERVAL_MS,
                    "ms (BLE's advertising interval range)")


def check_args(args: argparse.Namespace) -> None:
    """ValueError, one line, for the first option out of its range."""
    check_intervals(args.interval_ms, args.adv_interval_ms)
    check_range("--supervision-timeout-ms", args.supervision_timeout_ms,
                SUPERVISION_TIMEOUT_MS, "ms (BLE's supervision timeout range)")
    att.check_mtu(args.mtu)
    check_range("--rssi-jitter-db", args.rssi_jitter_db, RSSI_JITTER_DB,
                "dB (RSSI spans -127..20 dBm)")
    if not (math.isfinite(args.connect_timeout) and args.connect_timeout > 0):
        raise ValueError(f"--connect-timeout must be more than 0 s, got {args.connect_timeout:g}")


def timing_from_args(args: argparse.Namespace) -> TimingModel:
    enabled = args.timing
    if enabled is None:
        enabled = args.interval_ms is not None or args.adv_interval_ms is not None
    return TimingModel(
        enabled=bool(enabled),
        interval_ms=_DEFAULT_TIMING.interval_ms if args.interval_ms is None else args.interval_ms,
        adv_interval_ms=(
            _DEFAULT_TIMING.adv_interval_ms if args.adv_interval_ms is None
            else args.adv_interval_ms
        ),
        supervision_timeout_ms=args.supervision_timeout_ms,
    )


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as exc:
        print(f"doorstep sim: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    sim = Simulator(
        timing=timing_from_args(args),
        mtu=args.mtu,
        seed=args.seed,
        rssi_jitter_db=args.rssi_jitter_db,
        connect_timeout=args.connect_timeout,
        patch_environ=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start()
    except Exception as exc:
        print(f"doorstep sim: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"DBUS_SYSTEM_BUS_ADDRESS={sim.bus_address}", flush=True)
        timing = sim.timing
        state = (
            f"timing on (interval {timing.interval_ms} ms, adv {timing.adv_interval_ms} ms)"
            if timing.enabled else "timing off"
        )
        print(f"bluezsim: serving org.bluez, MTU {args.mtu}, {state}; "
              f"bluetoothctl shim in {sim.shim_dir}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bluezsim", description=DESCRIPTION)
    configure(parser)
    return run(parser.parse_args(argv))
