"""``doorstep demo``: the whole system on this machine, with the phone app on top (issue 8).

It starts the BLE simulator with the timing model (connection interval 30 ms,
advertising 100 ms), a cloud on SQLite in the user's data directory, a demo
user, three factory-fresh devices in a demo Wi-Fi environment, and opens the
phone app configured for them. ``--headless`` onboards every device with the
same flow ``doorstep phone pair`` uses and prints a timeline per stage; it is
also what runs when stdin or stdout is not a terminal (a pipe, a CI log), where
the phone app could only wait for keys that never come.
Everything it starts is stopped when it exits, on Ctrl-C, or when a process dies.

Every demo starts factory-fresh: it empties its work directory first. It only
ever empties a directory it made itself, which it marks with a ``.doorstep-demo``
file; a ``--dir`` that is neither new, empty, nor marked is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import time
from pathlib import Path
from typing import Any

DEMO_SSID = "DoorstepHome"
DEMO_PASSPHRASE = "correct horse battery"  # noqa: S105 - the simulated network's, shown on screen

# In every work directory the demo made: its licence to empty that directory.
MARKER = ".doorstep-demo"
_MARKER_TEXT = (
    "This directory belongs to `doorstep demo`: every demo run deletes everything in it.\n"
)
# What versions that wrote no marker left in the default directory (demo.stack
# and the phone app): only such a directory is emptied without a marker.
_UNMARKED_DEMO_FILES = frozenset({"logs", "kek", "factory", "devices", "config"})


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "doorstep" / "demo"


def add_parser(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole system here: sim, cloud, devices, phone"
    )
    demo.add_argument("--headless", action="store_true", help="onboard every device, scripted")
    demo.add_argument("--devices", type=int, default=3, help="how many devices (default 3)")
    demo.add_argument(
        "--interval-ms",
        type=float,
        default=30.0,
        help="BLE connection interval, 7.5..4000 ms (default 30)",
    )
    demo.add_argument(
        "--adv-interval-ms",
        type=float,
        default=100.0,
        help="advertising interval, 20..10240 ms (default 100)",
    )
    demo.add_argument("--mtu", type=int, default=247, help="ATT MTU, 23..517 (default 247)")
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"work directory, emptied at every start: a new or empty one, or one an earlier "
        f"demo made (default {data_dir()})",
    )
    demo.set_defaults(func=cmd_demo)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


class WorkdirError(Exception):
    """The demo must not use this work directory; the message (one line) says why."""


def check_workdir(workdir: Path) -> bool:
    """Whether ``workdir`` holds an earlier demo's files (to delete); WorkdirError if unusable.

    Usable: a path that does not exist yet (under directories), an empty
    directory, or one the demo made. Only looks; changes nothing.
    """
    try:
        if not workdir.exists():
            if workdir.is_symlink():
                raise WorkdirError(f"{workdir} is a dangling symbolic link, not a directory")
            parent = next(p for p in workdir.absolute().parents if p.exists())
            if not parent.is_dir():
                raise WorkdirError(f"{parent} is not a directory (in --dir {workdir})")
            return False
        if not workdir.is_dir():
            raise WorkdirError(f"{workdir} is not a directory")
        names = {entry.name for entry in workdir.iterdir()}
    except OSError as exc:
        raise WorkdirError(f"cannot use {workdir}: {exc.strerror or exc}") from exc
    if not names:
        return False
    if (workdir / MARKER).is_file():
        return True
    # The default directory, made by a version that wrote no marker: it is
    # Doorstep's own (under the user's data directory), and users expect it to
    # be emptied. Only if it holds nothing but what the demo writes there.
    if workdir.absolute() == data_dir().absolute() and all(
        name in _UNMARKED_DEMO_FILES or name.startswith("cloud.db") for name in names
    ):
        return True
    raise WorkdirError(
        f"{workdir} is not empty and was not made by the demo (no {MARKER} in it); "
        "refusing to delete what is in it: choose a new or empty --dir"
    )


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` a factory-fresh, marked work directory (WorkdirError, OSError)."""
    earlier_demo = check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # The marker first: an interrupted clean-up leaves a directory still known as the demo's.
    (workdir / MARKER).write_text(_MARKER_TEXT)
    if not earlier_demo:
        return  # new or empty: nothing of anyone's to delete
    for entry in workdir.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line (one line), or None; starts and changes nothing."""
    from bluezsim import att
    from bluezsim.cli import check_intervals

    if not 1 <= args.devices <= 32:
        return "--devices must be 1..32"
    try:
        check_intervals(args.interval_ms, args.adv_interval_ms)
        att.check_mtu(args.mtu)
        check_workdir(args.dir)
    except (ValueError, WorkdirError) as exc:
        return str(exc)
    return None


def interactive_terminal() -> bool:
    """Whether the phone app can run here: it reads keys from stdin and draws on stderr,
    and the demo's own lines go to stdout (``demo 2>log`` drew the app into the log)."""
    return all(stream.isatty() for stream in (sys.stdin, sys.stdout, sys.stderr))


def cmd_demo(args: argparse.Namespace) -> int:
    if args.dir is None:
        args.dir = data_dir()
    problem = _usage_error(args)
    if problem is not None:
        print(f"doorstep demo: {problem}", file=sys.stderr)
        return 2
    if shutil.which("dbus-daemon") is None:
        print(
            "doorstep demo: dbus-daemon is missing (Debian: apt-get install dbus)", file=sys.stderr
        )
        return 2
    if not args.headless and not interactive_terminal():
        say("not a terminal: running the scripted demo (--headless) instead of the phone app")
        args.headless = True
    try:
        try:
            prepare_workdir(args.dir)  # every demo starts factory-fresh
        except WorkdirError as exc:  # it changed since the check above
            print(f"doorstep demo: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"doorstep demo: cannot prepare {args.dir}: {exc}", file=sys.stderr)
            return 1
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:
        say("interrupted; everything stopped")
        return 130


async def _demo(args: argparse.Namespace) -> int:
    from demo.stack import Stack, StackError

    workdir: Path = args.dir
    stack = Stack(
        workdir,
        timing=True,
        interval_ms=args.interval_ms,
        adv_interval_ms=args.adv_interval_ms,
        mtu=args.mtu,
        say=say,
    )
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    # A stop request, or the terminal closing, stops everything (the stack's
    # processes run in sessions of their own: no hangup reaches them).
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    loop.add_signal_handler(signal.SIGHUP, main.cancel)
    started = time.monotonic()
    try:
        async with stack:
            await stack.add_devices(args.devices)
            say(f"ready in {time.monotonic() - started:.1f} s")
            say(f"Wi-Fi for the devices: {DEMO_SSID!r}, passphrase {DEMO_PASSPHRASE!r}")
            os.environ.update(stack.env)  # bleak reaches the simulator through it
            if args.headless:
                return await _headless(stack)
            return await _interactive(stack)
    except StackError as exc:
        print(f"doorstep demo: {exc}", file=sys.stderr)
        print(f"doorstep demo: logs are in {workdir / 'logs'}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        say("stopped")
        return 130


async def _watch(stack: Any) -> None:
    """Fail fast when a process of the stack dies."""
    while True:
        stack.check_alive()
        await asyncio.sleep(0.5)


async def _interactive(stack: Any) -> int:
    say("opening the phone app (q quits; everything stops with it)")
    env = dict(os.environ)
    env.update(stack.env)
    env["DOORSTEP_CLOUD_URL"] = stack.cloud_url
    env["DOORSTEP_TOKEN"] = stack.token
    env["XDG_CONFIG_HOME"] = str(stack.workdir / "config")
    env["DOORSTEP_DEMO_HINT"] = (
        f"Demo: the devices can join {DEMO_SSID!r} with the passphrase {DEMO_PASSPHRASE!r}."
    )
    from demo.stack import doorstep_cmd

    # The URL and token reach the app through its environment only: a command
    # line is visible to every user of the machine (ps).
    terminal = _terminal_state()
    app = await asyncio.create_subprocess_exec(*doorstep_cmd("phone"), env=env)
    watcher = asyncio.create_task(_watch(stack))
    waiter = asyncio.create_task(app.wait())
    try:
        done, _ = await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            watcher.result()  # raises StackError
    finally:
        # However the demo ends (the app quit, a process died, SIGTERM, Ctrl-C),
        # the app does not outlive it.
        watcher.cancel()
        try:
            if app.returncode is None:
                app.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), 5)
                except TimeoutError:
                    app.kill()
                    await waiter
                except asyncio.CancelledError:  # a second stop request meanwhile
                    app.kill()
                    await asyncio.shield(waiter)
                    raise
        finally:
            if app.returncode != 0:
                # Killed (by us or anyone) or crashed: it may have left the terminal in
                # its screen mode, with no echo, the cursor hidden and mouse reports on.
                _restore_terminal(terminal)
    if app.returncode != 0:
        print(f"doorstep demo: the phone app ended with status {app.returncode}", file=sys.stderr)
        return 1
    return 0


# What a Textual app undoes when it stops: the Kitty keyboard protocol, the
# alternate screen, a hidden cursor, focus, mouse and paste reports, no line wrap.
_TERMINAL_RESET = (
    "\x1b[<u\x1b[?1049l\x1b[?25h\x1b[?1004l"
    "\x1b[?1000l\x1b[?1003l\x1b[?1015l\x1b[?1006l\x1b[?2004l\x1b[?7h"
)


def _terminal_state() -> list[Any] | None:
    """The terminal's settings before the phone app changes them (None: no terminal)."""
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError):
        return None


def _restore_terminal(saved: list[Any] | None) -> None:
    """Put the terminal back as it was before the phone app, as the app would on quitting."""
    if saved is None:
        return
    with contextlib.suppress(termios.error, OSError, ValueError):
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(_TERMINAL_RESET)
        sys.stdout.flush()


async def _headless(stack: Any) -> int:
    from ble.bleak_central import BleakCentral
    from phone.cloudlink import CloudLink
    from phone.commissioner import NetworkChoice, Onboarding, Stage, StageState

    class Timeline:
        def __init__(self, name: str) -> None:
            self.name = name
            self.t0 = time.monotonic()

        async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
            if state in (StageState.DONE, StageState.FAILED):
                t = time.monotonic() - self.t0
                extra = f" — {detail}" if detail and state is StageState.FAILED else ""
                print(
                    f"  {t:7.3f} s  {self.name}  {stage.value:18s} {state.value}{extra}", flush=True
                )

        async def confirm_code(self, device: Any, sas: str) -> bool:
            print(f"  code {sas[:3]} {sas[3:]} on {device.model} — accepted (headless)", flush=True)
            return True

        async def choose_network(self, networks: Any, failure: Any) -> NetworkChoice | None:
            if failure is not None:
                return None
            return NetworkChoice(DEMO_SSID.encode(), DEMO_PASSPHRASE, 1)

    central = BleakCentral()
    cloud = CloudLink(stack.cloud_url, stack.token)
    watcher = asyncio.create_task(_watch(stack))
    reports = []
    try:
        for handle in stack.devices:
            say(f"onboarding {handle.name}")
            flow = Onboarding(central, cloud, Timeline(handle.name), wait_checkin_s=15)
            address = await _find(central, handle.name)
            report = await flow.run(address, handle.name)
            reports.append((handle.name, report))
            verdict = (
                f"onboarded as {report.short_id} in {report.total_s:.2f} s"
                if report.ok
                else f"FAILED ({report.status.name.lower()}): {report.message} {report.hint}"
            )
            say(f"{handle.name}: {verdict}")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        await cloud.aclose()
    ok = sum(r.ok for _, r in reports)
    print("\nsummary", flush=True)
    for name, r in reports:
        ble = r.stats
        print(
            f"  {name}  {'ok ' if r.ok else 'FAIL'}  {r.total_s:6.2f} s  id {r.short_id or '-':8s}  "
            f"checked in: {'yes' if r.checked_in else 'no '}  BLE round trips {r.handshake_round_trips}  "
            f"bytes {ble.bytes_to_device}↓ {ble.bytes_from_device}↑"
        )
    say(f"{ok}/{len(reports)} devices onboarded")
    return 0 if ok == len(reports) and all(r.checked_in for _, r in reports) else 1


async def _find(central: Any, name: str, timeout: float = 20.0) -> str:
    from ble.errors import DeviceNotFound

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async for sighting in central.scan(timeout=min(2.0, deadline - time.monotonic())):
            if sighting.name == name:
                return str(sighting.address)
    raise DeviceNotFound(f"{name} was not seen within {timeout:.0f} s")
