"""``doorstep sim``: run the simulated BlueZ until SIGINT/SIGTERM.

Prints exactly one line on stdout, ``DBUS_SYSTEM_BUS_ADDRESS=<address>``, once
the simulator owns ``org.bluez``. Other processes use it by exporting that
variable; to also pass bleak's BlueZ version check, prepend the shim directory
(reported on stderr, and by the control method
``org.doorstep.Sim1.GetEnvironment`` as ``BLUEZSIM_SHIM_DIR``) to ``PATH``.
``--interval-ms``/``--adv-interval-ms`` switch the timing model on unless
``--no-timing`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from bluezsim import att
from bluezsim.simulator import Simulator
from bluezsim.timing import TimingModel


def add_parser(subparsers: Any) -> None:
    """Register the ``sim`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "sim", help="run a simulated BlueZ on a private D-Bus",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    configure(parser)
    parser.set_defaults(func=run)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval-ms", type=float, default=None,
                        help="connection interval (turns the timing model on); default 30")
    parser.add_argument("--adv-interval-ms", type=float, default=None,
                        help="advertising interval (turns the timing model on); default 100")
    parser.add_argument("--supervision-timeout-ms", type=float, default=2000.0)
    parser.add_argument("--mtu", type=int, default=att.MAX_MTU,
                        help=f"ATT MTU negotiated on every link ({att.MIN_MTU}..{att.MAX_MTU})")
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=None,
                        help="force the timing model on/off")
    parser.add_argument("--seed", type=int, default=0, help="seed for RSSI jitter and phases")
    parser.add_argument("--rssi-jitter-db", type=int, default=0)
    parser.add_argument("--connect-timeout", type=float, default=20.0,
                        help="seconds before a connect to an unreachable device fails")


def timing_from_args(args: argparse.Namespace) -> TimingModel:
    enabled = args.timing
    if enabled is None:
        enabled = args.interval_ms is not None or args.adv_interval_ms is not None
    return TimingModel(
        enabled=bool(enabled),
        interval_ms=args.interval_ms or 30.0,
        adv_interval_ms=args.adv_interval_ms or 100.0,
        supervision_timeout_ms=args.supervision_timeout_ms,
    )


def run(args: argparse.Namespace) -> int:
    try:
        att.check_mtu(args.mtu)
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
    parser = argparse.ArgumentParser(prog="bluezsim", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))
