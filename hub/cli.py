"""``doorstep hub``: run a hub (first a device, then a commissioner), list what it brought in."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.runtime import DeviceOutcome, HubStats


RUN_EPILOG = """exit status:
  0    stopped: SIGTERM, or Ctrl-C / quit once it accepts devices
  1    its first boot ended without it being onboarded, or Bluetooth went away
       while it accepted devices
  2    a usage error, or it could not start (no Bluetooth adapter, an unusable
       state directory or registry, another device's state)
  130  interrupted (Ctrl-C) during its first boot, before it was onboarded"""


def add_parser(subparsers: Any) -> None:
    hub = subparsers.add_parser(
        "hub", help="a home hub: onboarded by the phone, then onboards devices"
    )
    hub.set_defaults(func=lambda _a: (hub.print_help(), 2)[1])
    sub = hub.add_subparsers(dest="hub_command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the hub",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--factory", required=True, type=Path, help="the hub's factory record JSON")
    run.add_argument("--state", required=True, type=Path, help="state directory")
    run.add_argument(
        "--confirm",
        choices=("prompt", "accept", "reject"),
        default="prompt",
        help="operator decisions: a console (default) or unattended accept/reject",
    )
    run.add_argument("--max-parallel", type=int, default=4, help="onboardings at once (default 4)")
    run.add_argument("--cloud", help="cloud base URL (default: $DOORSTEP_CLOUD_URL)")
    run.add_argument("--wifi", type=Path, help="the hub's own Wi-Fi environment JSON")
    run.add_argument(
        "--attempts", type=int, default=3, help="tries per device for transient failures"
    )
    run.set_defaults(func=cmd_run)

    devices = sub.add_parser("devices", help="the devices this hub brought in")
    devices.add_argument("--state", required=True, type=Path, help="state directory")
    devices.add_argument("--json", action="store_true", help="print JSON")
    devices.set_defaults(func=cmd_devices)


def _fail(message: str) -> int:
    print(f"doorstep hub: {message}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from device.cli import bluetooth_problem, load_factory, load_wifi, state_dir_problem
    from device.storage import StorageError
    from device.wifi import WifiConfigError
    from hub.registry import HubRegistryError
    from protocol.errors import MessageError

    if args.max_parallel < 1:
        return _fail("--max-parallel must be at least 1")
    if args.attempts < 1:
        return _fail("--attempts must be at least 1")
    cloud_url = args.cloud or os.environ.get("DOORSTEP_CLOUD_URL")
    if not cloud_url:
        return _fail("no cloud URL: pass --cloud or set DOORSTEP_CLOUD_URL")
    try:
        factory = load_factory(args.factory)
    except OSError as exc:
        return _fail(f"cannot read {args.factory}: {exc.strerror}")
    except MessageError as exc:
        return _fail(f"{args.factory}: {exc.message}")
    try:
        wifi = load_wifi(args.wifi)  # before the state directory is touched
    except WifiConfigError as exc:
        return _fail(str(exc))
    if args.confirm == "prompt" and not sys.stdin.isatty():
        return _fail(
            "no terminal for the operator console (stdin is not one): "
            "pass --confirm accept or --confirm reject"
        )
    if (problem := state_dir_problem(args.state)) is not None:
        return _fail(problem)
    try:
        return asyncio.run(_run(args, factory, wifi, cloud_url))
    except (StorageError, HubRegistryError) as exc:
        return _fail(str(exc))
    except Exception as exc:
        if (problem := bluetooth_problem(exc)) is None:
            raise
        return _fail(problem)
    except KeyboardInterrupt:
        return 130


def _say(message: str) -> None:
    print(f"[hub] {message}", flush=True)


async def _run(args: argparse.Namespace, factory: Any, wifi: Any, cloud_url: str) -> int:
    from device.cli import missing_directories, remove_if_empty
    from device.storage import DeviceStore

    created = missing_directories(args.state)  # gone again if the hub never got going
    try:
        store = DeviceStore(args.state, owner=True, dev_id=factory.dev_id)  # its own state only
        state = store.load()
        if state.active is None and state.pending is not None:
            # Restarted after the phone app onboarded it: only its check-in is missing.
            _say(
                "onboarded, not checked in yet: checking in with the cloud before accepting devices"
            )
        elif state.active is None:
            _say("not onboarded yet: advertising as a device for the phone app")
        if state.active is None:
            stopped = await _device_phase(args, factory, wifi, store, cloud_url)
            if stopped is not None:
                return stopped
            state = store.load()
    finally:
        remove_if_empty(created)
    assert state.active is not None and state.wifi is not None
    await _check_bluetooth()
    _say(f"onboarded as {state.active.identifier.hex()[:8]}; accepting devices")
    try:
        return await _commissioner_phase(args, state, cloud_url)
    except Exception as exc:
        from device.cli import bluetooth_problem

        if (problem := bluetooth_problem(exc)) is None:
            raise
        # It ran, then lost its radio: not a start-up problem (2), as for `device run`.
        print(
            f"doorstep hub: Bluetooth went away while accepting devices: {problem}", file=sys.stderr
        )
        return 1


async def _device_phase(
    args: argparse.Namespace, factory: Any, wifi: Any, store: Any, cloud_url: str
) -> int | None:
    """First boot: the hub is a device (the same runtime as any device). None once it is
    onboarded; else the exit status: 130 for Ctrl-C, 0 for SIGTERM (as ``device run``), 1."""
    from device.cli import build_runtime, wait_started
    from device.user import TerminalUser

    runtime, user, checkin = build_runtime(
        factory, store, confirm=args.confirm, wifi=wifi, cloud_url=cloud_url
    )
    loop = asyncio.get_running_loop()
    stopped_by: list[int] = []

    def stop(sig: int) -> None:
        stopped_by.append(sig)
        runtime.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        task = asyncio.create_task(runtime.run())
        if await wait_started(runtime, task) and isinstance(user, TerminalUser):
            user.start()
        done = asyncio.create_task(runtime.onboarded.wait())
        await asyncio.wait({task, done}, return_when=asyncio.FIRST_COMPLETED)
        runtime.stop()
        await task
    finally:
        await checkin.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if done.done():
        return None
    if stopped_by:  # it used to end with 1, like a failure, and without a word
        _say("stopped before it was onboarded")
        return 130 if stopped_by[0] == signal.SIGINT else 0
    return 1


async def _check_bluetooth() -> None:
    """A short scan, so that a hub without Bluetooth says so before its console opens.

    Raises ``LinkError`` ``scan_failed`` (``bluetooth_problem`` words it).
    """
    from ble.bleak_central import BleakCentral

    scan: Any = BleakCentral().scan(timeout=0.1)
    async with contextlib.aclosing(scan):
        async for _sighting in scan:
            break


class _OutcomeLog:
    """The unattended hub's log: a line per device outcome, then the counts if they moved."""

    def __init__(self, stats: HubStats) -> None:
        self.stats = stats
        self.last = (0, 0, 0)

    def __call__(self, outcome: DeviceOutcome) -> None:
        _say(outcome.line())
        s = self.stats
        counts = (s.onboarded, s.failed, s.rejected)
        if counts != self.last:
            self.last = counts
            _say(counts_text(s))


async def _commissioner_phase(args: argparse.Namespace, state: Any, cloud_url: str) -> int:
    from ble.bleak_central import BleakCentral
    from hub.console import ConsoleOperator, HubConsole
    from hub.registry import HubRegistry
    from hub.runtime import HubCommissioner, ScriptedOperator
    from phone.cloudlink import CloudLink
    from phone.commissioner import NetworkChoice

    cloud = CloudLink(cloud_url, hub_identity=(state.active.identifier, state.active.k_dev))
    wifi = NetworkChoice(state.wifi.ssid, state.wifi.passphrase, state.wifi.security)
    async with HubRegistry(args.state / "hub.db") as registry:
        operator: Any = (
            ConsoleOperator()
            if args.confirm == "prompt"
            else ScriptedOperator(args.confirm == "accept")
        )
        hub = HubCommissioner(
            BleakCentral(),
            cloud,
            operator,
            wifi,
            registry,
            max_parallel=args.max_parallel,
            max_attempts=args.attempts,
        )
        try:
            if isinstance(operator, ConsoleOperator):
                await HubConsole(hub, operator, title=state.active.identifier.hex()[:8]).run_async()
            else:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                hub.on_outcome = _OutcomeLog(hub.stats)
                await hub.run(stop)
        finally:
            await cloud.aclose()
    _say(stopped_line(hub.stats))
    return 0


def counts_text(stats: HubStats) -> str:
    return f"onboarded {stats.onboarded}, failed {stats.failed}, rejected {stats.rejected}"


def stopped_line(stats: HubStats) -> str:
    """What a hub that was accepting devices says when it stops (it said nothing)."""
    line = f"stopped: {counts_text(stats)}"
    if stats.cut_short == 1:
        line += "; 1 onboarding in progress cut short (a restarted hub picks it up)"
    elif stats.cut_short:
        line += (
            f"; {stats.cut_short} onboardings in progress cut short (a restarted hub picks them up)"
        )
    return line


def cmd_devices(args: argparse.Namespace) -> int:
    from hub.registry import HubRegistry, HubRegistryError

    path = args.state / "hub.db"
    if not path.exists():
        return _fail(f"no hub registry in {args.state} (has the hub run yet?)")

    async def load() -> list[Any]:
        async with HubRegistry(path) as registry:
            return await registry.latest_by_device()

    try:
        rows = asyncio.run(load())
    except HubRegistryError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    if not rows:
        print("no devices yet")
        return 0
    print(f"{'device':16s} {'model':20s} {'outcome':22s} {'id':9s} {'tries':5s} {'time':>7s}  when")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at))
        print(
            f"{r.name[:16]:16s} {(r.model or '-')[:20]:20s} {r.status_name[:22]:22s} "
            f"{(r.identifier or '-')[:8]:9s} {r.attempt:5d} {r.duration_s:6.2f}s  {when}"
        )
    return 0
