"""``doorstep device``: run the simulated device, press its button, reset it, show it (issue 5)."""

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
    from device.wifi import WifiEnvironment
    from protocol.factory import FactoryRecord

PIDFILE = "device.pid"
EXIT_USAGE = 2  # a usage error, or the device could not start (no Bluetooth, a bad state)
EXIT_BLUETOOTH_LOST = 1  # it ran, then Bluetooth went away
EXIT_INTERRUPTED = 130  # Ctrl-C
RUN_EPILOG = """exit status:
  0    stopped (SIGTERM)
  1    Bluetooth went away while the device ran
  2    a usage error, or the device could not start (no Bluetooth adapter,
       an unusable state directory, another device's state)
  130  interrupted (Ctrl-C)"""
# M2's ``fw`` is a text string of at most 16 bytes (protocol.messages.Challenge, PROTOCOL.md §4):
# a longer one makes every commissioner refuse the device at the first message.
FW_MAX_BYTES = 16


def add_parser(subparsers: Any) -> None:
    device = subparsers.add_parser("device", help="a simulated Doorstep device (BLE peripheral)")
    device.set_defaults(func=lambda _a: (device.print_help(), 2)[1])
    sub = device.add_subparsers(dest="device_command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the device: advertise, onboard, join Wi-Fi, check in",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--factory", required=True, type=Path, help="factory record JSON (§7)")
    run.add_argument("--state", required=True, type=Path, help="state directory")
    run.add_argument(
        "--confirm",
        choices=("prompt", "accept", "reject"),
        default="prompt",
        help="how the device's user answers (default: prompt on this terminal)",
    )
    run.add_argument("--wifi", type=Path, help="Wi-Fi environment JSON (default: a built-in home)")
    run.add_argument("--cloud", help="cloud base URL for check-in (default: $DOORSTEP_CLOUD_URL)")
    run.add_argument("--adapter", help="BlueZ adapter (default: the first one)")
    run.add_argument("--fw", default="1.0.0", help="firmware version reported in M2")
    run.set_defaults(func=cmd_run)

    for name, text, func in (
        ("button", "press the pairing button of a running device", cmd_button),
        ("reset", "factory reset: erase identity and Wi-Fi, open the window", cmd_reset),
        ("show", "show the device's state (never a key)", cmd_show),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state", required=True, type=Path, help="state directory")
        if name == "reset":
            p.add_argument(
                "--force",
                action="store_true",
                help="reset even if the stored state is unreadable (the reset counter restarts)",
            )
        if name == "show":
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)


def _fail(message: str) -> int:
    print(f"doorstep device: {message}", file=sys.stderr)
    return EXIT_USAGE


NO_TERMINAL = (
    "no terminal to answer pairing requests on (stdin is not one): "
    "pass --confirm accept or --confirm reject"
)


def load_factory(path: Path) -> FactoryRecord:
    """The factory record at ``path``; ``OSError`` if unreadable, ``MessageError`` if not one."""
    from protocol.errors import MessageError
    from protocol.factory import FactoryRecord

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # JSON is UTF-8: the same answer as any other non-JSON file
        raise MessageError("factory record is not valid JSON", code="bad_factory_record") from None
    return FactoryRecord.loads(text)


def load_wifi(path: Path | None) -> WifiEnvironment:
    """``--wifi``, or the built-in home; ``WifiConfigError`` if the file is not usable."""
    from device.wifi import WifiEnvironment

    return WifiEnvironment.load(path) if path is not None else WifiEnvironment.default()


def bluetooth_problem(exc: BaseException) -> str | None:
    """One line on why Bluetooth cannot be used, with what to do, if ``exc`` says so."""
    from ble.errors import BLUETOOTH_HINT, unusable_bluetooth

    problem = unusable_bluetooth(exc)
    return None if problem is None else f"{problem} ({BLUETOOTH_HINT})"


def missing_directories(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing: list[Path] = []
    for directory in (path, *path.parents):
        if directory.exists() or directory.is_symlink():
            break
        missing.append(directory)
    return missing


def state_dir_problem(state: Path) -> str | None:
    """Why ``state`` cannot be a state directory (worded as ``demo --dir`` words it), or None.

    Only looks; what this does not catch (no permission, say) the store reports itself.
    """
    try:
        if state.exists():
            return None if state.is_dir() else f"{state} is not a directory"
        if state.is_symlink():
            return f"{state} is a dangling symbolic link, not a directory"
        parent = next((p for p in state.absolute().parents if p.exists()), None)
    except OSError:
        return None
    if parent is not None and not parent.is_dir():
        return f"{parent} is not a directory (in --state {state})"
    return None


def remove_if_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty, so a failed start
    leaves no trace; a directory with anything in it (a saved state) stays."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


async def wait_started(runtime: Any, task: asyncio.Task[None]) -> bool:
    """Wait until ``runtime`` advertises (True) or its ``task`` ends first (False)."""
    started = asyncio.ensure_future(runtime.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    return bool(runtime.started.is_set())


def _running_pid(state: Path) -> int | None:
    try:
        pid = int((state / PIDFILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def cmd_run(args: argparse.Namespace) -> int:
    from ble.errors import BLUETOOTH_HINT, LinkError
    from device.storage import StorageError
    from device.wifi import WifiConfigError
    from protocol.errors import MessageError

    try:
        fw_bytes = len(args.fw.encode("utf-8"))
    except UnicodeEncodeError:
        return _fail("--fw must be UTF-8 text")
    if fw_bytes > FW_MAX_BYTES:
        return _fail(
            f"--fw must be at most {FW_MAX_BYTES} bytes of UTF-8 (the firmware version "
            f"sent in M2), got {fw_bytes}"
        )
    from cloud.client import cloud_url_problem

    if args.cloud:  # an empty --cloud is no --cloud, as for phone pair
        cloud_problem = cloud_url_problem(args.cloud, "--cloud")
    elif env_cloud := os.environ.get("DOORSTEP_CLOUD_URL"):
        cloud_problem = cloud_url_problem(env_cloud, "$DOORSTEP_CLOUD_URL")
    else:
        cloud_problem = None
    if cloud_problem is not None:
        return _fail(cloud_problem)
    try:
        factory = load_factory(args.factory)
    except OSError as exc:
        return _fail(f"cannot read factory record {args.factory}: {exc.strerror}")
    except MessageError as exc:
        return _fail(f"{args.factory}: {exc.message}")
    try:
        wifi = load_wifi(args.wifi)  # before the state directory is touched
    except WifiConfigError as exc:
        return _fail(str(exc))
    if (problem := state_dir_problem(args.state)) is not None:
        return _fail(problem)
    if args.confirm == "prompt" and not sys.stdin.isatty():
        # Nobody could answer: every pairing would wait out its 60 s and fail as "rejected".
        return _fail(NO_TERMINAL)
    if (pid := _running_pid(args.state)) is not None:
        return _fail(f"a device is already running on {args.state} (pid {pid})")
    if not (args.cloud or os.environ.get("DOORSTEP_CLOUD_URL")):
        print(
            "doorstep device: warning: no cloud URL (--cloud or DOORSTEP_CLOUD_URL): this "
            "device will not check in, so its pairings stay pending in the cloud",
            file=sys.stderr,
        )
    try:
        return asyncio.run(_run(args, factory, wifi))
    except (StorageError, WifiConfigError) as exc:
        return _fail(str(exc))
    except Exception as exc:
        if isinstance(exc, LinkError) and exc.code == "bluetooth_lost":
            # It ran, then lost its radio: no usage error, so not _fail's status.
            print(f"doorstep device: {exc.message} ({BLUETOOTH_HINT})", file=sys.stderr)
            return EXIT_BLUETOOTH_LOST
        if (problem := bluetooth_problem(exc)) is None:
            raise
        return _fail(problem)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def build_runtime(
    factory: Any,
    store: Any,
    *,
    confirm: str,
    wifi: WifiEnvironment,
    cloud_url: str | None,
    adapter: str | None = None,
    fw: str = "1.0.0",
    stop_if_bluetooth_lost: bool = False,
) -> tuple[Any, Any, Any]:
    """A device runtime on the BlueZ peripheral: ``(runtime, user, checkin)``.

    Shared by ``doorstep device run`` and the hub's first boot (a hub is a device first).
    ``stop_if_bluetooth_lost``: ``runtime.run()`` raises ``LinkError`` ``bluetooth_lost``
    when Bluetooth goes away (``device run`` asks for it; the hub does not, yet).
    Start a ``TerminalUser`` once ``wait_started`` says the device advertises: a reader
    blocked on stdin would keep a device that failed to start from exiting.
    """
    from ble.bless_peripheral import BlessPeripheral
    from device.runtime import DeviceRuntime
    from device.user import ScriptedUser, TerminalUser

    checkin = None
    if cloud_url:
        from device.cloudlink import CloudCheckin

        checkin = CloudCheckin(cloud_url)
    runtime: DeviceRuntime
    user: Any
    if confirm == "prompt":
        user = TerminalUser(on_button=lambda: runtime.press_button())
    else:
        user = ScriptedUser(confirm == "accept", out=lambda m: print(m, flush=True))
    runtime = DeviceRuntime(
        factory,
        store,
        BlessPeripheral(adapter),
        wifi,
        user,
        checkin,
        fw=fw,
        stop_if_bluetooth_lost=stop_if_bluetooth_lost,
    )
    if isinstance(user, TerminalUser):
        user.stop_with(runtime.stopped)  # the terminal is not the device's once it stopped
    return runtime, user, checkin


async def _run(args: argparse.Namespace, factory: FactoryRecord, wifi: WifiEnvironment) -> int:
    from device.storage import DeviceStore
    from device.user import TerminalUser

    # The runtime writes its state only once the radio is up; if it never comes up,
    # the directories made here go again, so the next start finds what this one did.
    created = missing_directories(args.state)
    try:
        runtime, user, checkin = build_runtime(
            factory,
            DeviceStore(args.state, owner=True, dev_id=factory.dev_id),
            confirm=args.confirm,
            wifi=wifi,
            cloud_url=args.cloud or os.environ.get("DOORSTEP_CLOUD_URL"),
            adapter=args.adapter,
            fw=args.fw,
            stop_if_bluetooth_lost=True,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, runtime.press_button)
        loop.add_signal_handler(signal.SIGUSR2, runtime.factory_reset)
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            runtime.stop()

        loop.add_signal_handler(signal.SIGTERM, runtime.stop)
        loop.add_signal_handler(signal.SIGINT, interrupt)  # Ctrl-C: 130, like the others
        pidfile = args.state / PIDFILE
        pidfile.write_text(f"{os.getpid()}\n")
        try:
            task = asyncio.create_task(runtime.run())
            if await wait_started(runtime, task) and isinstance(user, TerminalUser):
                user.start()
            await task
        finally:
            with contextlib.suppress(OSError):
                pidfile.unlink()
            if checkin is not None:
                await checkin.close()
    finally:
        remove_if_empty(created)
    return EXIT_INTERRUPTED if interrupted else 0


def cmd_button(args: argparse.Namespace) -> int:
    pid = _running_pid(args.state)
    if pid is None:
        return _fail(f"no device is running on {args.state}; start it with `doorstep device run`")
    os.kill(pid, signal.SIGUSR1)
    print("pairing button pressed: the window is open for 10 minutes")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    from device.storage import DeviceState, DeviceStore, StorageError
    from protocol.pairing import PairingGate

    pid = _running_pid(args.state)
    if pid is not None:
        os.kill(pid, signal.SIGUSR2)
        print("factory reset sent to the running device")
        return 0
    if not args.state.exists():  # a mistyped path: never create a device there
        return _fail(f"{args.state} does not exist")
    if not args.state.is_dir():
        return _fail(f"{args.state} is not a directory")
    try:
        store = DeviceStore(args.state)
        old = store.load()
    except StorageError as exc:
        if not args.force:
            return _fail(
                f"the stored state is unreadable ({exc}). A reset would restart the reset "
                "counter, which the cloud may then refuse; use --force to reset anyway"
            )
        old = None
        store = DeviceStore(args.state)
    gate = PairingGate(time.time)
    gate.factory_reset()
    reset_ctr = min((old.reset_ctr if old else 0) + 1, 2**32 - 1)
    # The state stays the same device's: a reset erases what a commissioner gave it.
    dev_id = old.dev_id if old else None
    store.save(DeviceState(reset_ctr=reset_ctr, gate=gate.to_json(), dev_id=dev_id))
    print(f"factory reset done: identity and Wi-Fi erased, reset counter {reset_ctr}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from device.storage import DeviceStore, StorageError
    from protocol.pairing import PairingGate

    if not args.state.exists():
        return _fail(f"{args.state} does not exist")
    if (problem := state_dir_problem(args.state)) is not None:
        return _fail(problem)
    try:
        state = DeviceStore(args.state).load()
    except StorageError as exc:
        return _fail(str(exc))
    gate = PairingGate.from_json(dict(state.gate), time.time)
    info = {
        "state": "active" if state.active else ("pending" if state.pending else "unprovisioned"),
        "identifier": state.active.identifier.hex()[:8] if state.active else None,
        "epoch": state.active.epoch if state.active else 0,
        "network": state.wifi.ssid.decode("utf-8", "replace") if state.wifi else None,
        "pending_identifier": state.pending.identity.identifier.hex()[:8]
        if state.pending
        else None,
        "reset_ctr": state.reset_ctr,
        "pairing_window_open": gate.window_open,
        "failed_sessions": gate.failures,
        "running": _running_pid(args.state) is not None,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:20s} {'-' if value is None else value}")
    return 0
