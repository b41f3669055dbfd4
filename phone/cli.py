"""``doorstep phone``: the phone app (Textual) and ``doorstep phone pair`` for scripts.

``doorstep phone [--cloud URL] [--token T] [--adapter HCI]`` opens the app.
``doorstep phone pair --device NAME|ADDRESS --ssid S (--passphrase-file F |
--passphrase-env VAR) [--security N] [--yes] [--json] [--scan-timeout S]``
pairs one device without a screen: one line per stage (stderr with
``--json``, else stdout), the §4 status as the exit code (0 ok), and with
``--json`` a summary object on stdout. Exit codes (``EXIT_CODES``, also in
``--help``): 0–14 the DS1 status, always about the device or the session with
it; 2 also for usage errors (bad arguments, unreadable passphrase file, a
passphrase that does not fit ``--security``, no cloud configured), which
``--json`` reports in the summary with ``status`` null and ``status_name``
``usage_error`` (argparse's own errors, an unknown or missing option or a value
of the wrong type, come before that: usage text on stderr, no summary); 20 for
failures outside DS1 (the cloud unreachable or failing, refusing the token,
no Bluetooth adapter; a device that joined but whose pairing the cloud could
not be told of), which ``--json`` reports in the same summary with ``status``
null and ``status_name`` the cause (e.g. ``cloud_unavailable``,
``unauthorized``); 130 when interrupted (Ctrl-C), with ``--json`` a summary
whose ``status_name`` is ``cancelled``.

``doorstep phone`` needs a terminal: Textual reads keys from stdin and draws on
stderr. Without one it refuses at once (exit 2) and points to ``phone pair``.

Cloud settings: flags, then ``DOORSTEP_CLOUD_URL``/``DOORSTEP_TOKEN``, then
the saved settings file (``phone.config``). The passphrase and the token are
never printed. The BlueZ central and the cloud adapter are imported lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ble.errors import BLUETOOTH_HINT, unusable_bluetooth
from phone.config import (
    ENV_CLOUD_URL,
    ENV_TOKEN,
    ConfigError,
    ConfigStore,
    PhoneConfig,
    default_config_path,
    default_history_path,
    resolve_config,
)
from protocol.errors import DS1Error, UnsupportedSecurity, WifiParameterError
from protocol.wifi import Security, validate_wifi

if TYPE_CHECKING:
    from phone.commissioner import OnboardingReport

EXIT_USAGE = 2
EXIT_ENVIRONMENT = 20
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
exit status:
  0         onboarded
  1-14      the DS1 status of the failure (the device or the session with it):
            1 rejected, 2 network not found, 3 Wi-Fi passphrase refused,
            4 unsupported security, 5 join timed out, 6 no IP address,
            8 identity refused, 9 busy, 10 not in pairing mode,
            11 protocol error or link lost, 12 device not verified,
            13 timed out or device not found, 14 invalid Wi-Fi parameters
  2         also a usage error (arguments, passphrase file, no cloud configured)
            (--json: status null, status_name "usage_error"; an unknown or
            missing option prints usage only)
  20        outside DS1: the cloud unreachable or failing, the token refused,
            too many requests to the cloud, no Bluetooth adapter; or the device
            joined but the cloud could not be told (it completes the pairing
            itself when it checks in) (--json: status null, status_name the cause)
  130       interrupted (--json: status null, status_name "cancelled")
"""


class UsageError(Exception):
    """A problem with the command line or its inputs (exit 2)."""


def _cloud_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--cloud", default=default, metavar="URL", help=f"cloud base URL (or ${ENV_CLOUD_URL})"
    )
    parser.add_argument(
        "--token",
        default=default,
        metavar="T",
        help=f"your account's token (prefer ${ENV_TOKEN}: other users see command lines)",
    )
    parser.add_argument(
        "--adapter", default=default, metavar="HCI", help="BlueZ adapter (default: the first)"
    )


def add_parser(subparsers: Any) -> None:
    """Register ``phone`` (the app) and ``phone pair`` on the ``doorstep`` parser."""
    phone = subparsers.add_parser(
        "phone", help="the phone app: find, pair and manage Doorstep devices"
    )
    _cloud_options(phone, suppress=False)
    phone.set_defaults(func=cmd_app)
    sub = phone.add_subparsers(dest="phone_command", metavar="COMMAND")

    pair = sub.add_parser(
        "pair",
        help="pair one device without the app (for scripts)",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _cloud_options(pair, suppress=True)
    pair.add_argument("--device", required=True, help="advertised name or BLE address")
    pair.add_argument("--ssid", required=True, help="the Wi-Fi network for the device")
    secret = pair.add_mutually_exclusive_group(required=True)
    secret.add_argument(
        "--passphrase-file", type=Path, metavar="F", help="file holding the Wi-Fi passphrase"
    )
    secret.add_argument(
        "--passphrase-env", metavar="VAR", help="environment variable holding the passphrase"
    )
    pair.add_argument(
        "--security",
        type=int,
        default=None,
        metavar="N",
        help="0 open, 1 WPA2, 2 WPA3, 3 WPA2/WPA3: used when the device did not see the SSID "
        "(default 1); given, the passphrase is checked against it before pairing (otherwise "
        "against the security the device saw)",
    )
    pair.add_argument("--yes", action="store_true", help="accept the code without asking")
    pair.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    pair.add_argument(
        "--scan-timeout", type=float, default=30.0, metavar="S", help="seconds to look for it"
    )
    pair.add_argument(
        "--wait-checkin",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds to wait for the device's cloud check-in (0: do not wait)",
    )
    pair.set_defaults(func=cmd_pair)


# ---- inputs ------------------------------------------------------------------------------------


def read_passphrase(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if args.passphrase_file is not None:
        path: Path = args.passphrase_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"passphrase file {path} does not exist") from None
        except OSError as exc:
            raise UsageError(f"cannot read passphrase file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"passphrase file {path} is not UTF-8 text") from None
        # One trailing newline is the file's, not the passphrase's.
        if text.endswith("\r\n"):
            return text[:-2]
        return text[:-1] if text.endswith("\n") else text
    name: str = args.passphrase_env
    if name not in env:
        raise UsageError(f"environment variable {name} is not set")
    return env[name]


def check_cloud_url(url: str, what: str) -> None:
    """Refuse a cloud URL that is not ``http(s)://host…`` (``what`` names where it came from)."""
    from cloud.client import cloud_url_problem

    if (problem := cloud_url_problem(url, what)) is not None:
        raise UsageError(problem)


def check_pair_options(args: argparse.Namespace) -> None:
    """The options of ``phone pair`` that need no file or network, before anything starts."""
    if not args.device.strip():  # it scanned for a device without a name
        raise UsageError("--device must be a device's advertised name or BLE address")
    if args.security is not None and args.security not in {int(s) for s in Security}:
        known = ", ".join(f"{int(s)} ({s.label})" for s in Security)
        raise UsageError(f"--security must be one of {known}; got {args.security}")
    if not (math.isfinite(args.scan_timeout) and args.scan_timeout > 0):
        raise UsageError("--scan-timeout must be a number of seconds above 0")
    if not (math.isfinite(args.wait_checkin) and args.wait_checkin >= 0):
        raise UsageError("--wait-checkin must be a number of seconds, 0 or more")


def check_passphrase(ssid: bytes, security: int, passphrase: str) -> None:
    """The passphrase rule of §4 for ``--security`` (as the app's network screen checks it)."""
    try:
        validate_wifi(ssid, security, passphrase)
    except (WifiParameterError, UnsupportedSecurity) as exc:
        label = Security(security).label
        raise UsageError(f"{exc} (--security {security}: {label})") from None
    except UnicodeEncodeError:
        raise UsageError("the passphrase is not UTF-8 text") from None


def cloud_config(
    args: argparse.Namespace, *, check_url: bool = False
) -> tuple[PhoneConfig, ConfigStore]:
    """The cloud settings; ``--cloud`` must be a URL, and with ``check_url`` any other source."""
    store = ConfigStore(default_config_path())
    flag = getattr(args, "cloud", None)
    if flag:
        check_cloud_url(flag, "--cloud")
    try:
        config = resolve_config(store, flag, getattr(args, "token", None))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if check_url and not flag and config.cloud_url:
        source = (
            f"${ENV_CLOUD_URL}" if os.environ.get(ENV_CLOUD_URL) else f"cloud_url in {store.path}"
        )
        check_cloud_url(config.cloud_url, source)
    return config, store


def make_cloud(config: PhoneConfig) -> Any:
    from phone.cloudlink import CloudLink  # type: ignore[import-not-found,unused-ignore]

    return CloudLink(config.cloud_url, config.token)


def make_central(adapter: str | None) -> Any:
    from ble.bleak_central import BleakCentral

    return BleakCentral(adapter)


# ---- doorstep phone pair -------------------------------------------------------------------------


def cmd_pair(args: argparse.Namespace) -> int:
    async def main() -> int:
        # The first Ctrl-C cancels the pairing, which then closes the session with the
        # device and reports (with --json, its summary). asyncio.run's own handler made a
        # second Ctrl-C a KeyboardInterrupt that cut that short and lost the summary.
        task = asyncio.current_task()
        assert task is not None
        presses = 0

        def interrupt() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                task.cancel()
            else:
                print("doorstep phone pair: stopping; closing the session first", file=sys.stderr)

        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupt)
        return await pair_main(args, sys.stdout, sys.stderr)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:  # pragma: no cover - a platform without loop signal handlers
        print("doorstep phone pair: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def pair_main(
    args: argparse.Namespace,
    stdout: TextIO,
    stderr: TextIO,
    *,
    central: Any = None,
    cloud: Any = None,
    stdin: TextIO | None = None,
) -> int:
    """``doorstep phone pair``; tests pass ``central``/``cloud`` (else BlueZ and the cloud).

    Cancelled (Ctrl-C: ``asyncio.run`` cancels this task), it reports how far the
    pairing got, like any other outcome, and returns ``EXIT_INTERRUPTED``.
    """
    from phone.pair import Pairing, terminal_ask

    progress = stderr if args.json else stdout
    try:
        check_pair_options(args)
        passphrase = read_passphrase(args)
        try:
            ssid = args.ssid.encode("utf-8")
        except UnicodeEncodeError:
            ssid = b""
        if not 1 <= len(ssid) <= 32:
            raise UsageError("--ssid must be 1–32 bytes of UTF-8")
        if args.security is not None:  # else the device's scan says, and pair() checks
            check_passphrase(ssid, args.security, passphrase)
        config = PhoneConfig()
        if cloud is None:
            config, _store = cloud_config(args, check_url=True)
            if not config.complete:
                raise UsageError(
                    f"no cloud configured: pass --cloud and --token (or set {ENV_CLOUD_URL} "
                    f"and {ENV_TOKEN})"
                )
    except UsageError as exc:
        print(f"doorstep phone pair: {exc}", file=stderr)
        if args.json:  # every outcome, a usage error too, is one summary
            body = failure_summary(args.device, "usage_error", str(exc), exit_code=EXIT_USAGE)
            _print_json(body, stdout)
        return EXIT_USAGE
    try:
        if central is None:
            central = make_central(getattr(args, "adapter", None))
        if cloud is None:
            cloud = make_cloud(config)
    except Exception as exc:
        return _environment_failure(args, stdout, stderr, "cannot_start", f"cannot start: {exc}")
    pairing = Pairing(
        central,
        cloud,
        args.device,
        ssid,
        passphrase,
        yes=args.yes,
        out=progress,
        security=int(Security.WPA2_PSK) if args.security is None else args.security,
        scan_timeout=args.scan_timeout,
        wait_checkin_s=args.wait_checkin,
        ask=None if stdin is None else terminal_ask(progress, stdin),
    )
    try:
        report = await pairing.run()
    except asyncio.CancelledError:  # Ctrl-C; the flow has closed the session on its way out
        report = pairing.interrupted()
    except Exception as exc:  # outside DS1 before the flow: no adapter, the scan cannot start
        if (problem := unusable_bluetooth(exc)) is not None:
            return _environment_failure(
                args, stdout, stderr, "bluetooth_unavailable", problem, BLUETOOTH_HINT
            )
        code = exc.code if isinstance(exc, DS1Error) else "error"
        return _environment_failure(args, stdout, stderr, code, f"{type(exc).__name__}: {exc}")
    finally:
        closer = getattr(cloud, "aclose", None)
        if closer is not None:
            # The outcome is decided: a Ctrl-C now does not lose its report.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(closer())
    exit_code = exit_status(report)
    print(outcome_line(report, args), file=progress)
    if args.json:
        _print_json(pairing.json_summary(report, exit_code=exit_code), stdout)
    return exit_code


def exit_status(report: OnboardingReport) -> int:
    """The exit status for an ``OnboardingReport`` (``EXIT_CODES``)."""
    if report.cancelled:
        return EXIT_INTERRUPTED
    if report.outside_ds1 and not report.ok:
        return EXIT_ENVIRONMENT
    return int(report.status)


def outcome_line(report: OnboardingReport, args: argparse.Namespace) -> str:
    """The last line of ``phone pair``'s output: the outcome in words and what to do next."""
    if report.ok:
        who = report.device.name if report.device else args.device
        line = f"Onboarded {who}: identifier {report.short_id}, {report.total_s:.1f} s"
        if args.wait_checkin > 0 and not report.checked_in:
            line += f"\n{report.message} {report.hint}"
        return line
    if report.cancelled:
        return report.message
    if report.outside_ds1:
        line = f"Failed ({report.cause}): {report.message}"
    else:
        line = f"Failed ({int(report.status)} {report.status.name.lower()}): {report.message}"
    return f"{line} — {report.hint}" if report.hint else line


def _print_json(body: dict[str, object], stdout: TextIO) -> None:
    stdout.write(json.dumps(body, indent=2) + "\n")  # one write: never half a summary
    stdout.flush()


def failure_summary(
    device: str, code: str, message: str, hint: str = "", *, exit_code: int = EXIT_ENVIRONMENT
) -> dict[str, object]:
    """The ``--json`` summary of a failure outside DS1: the shape of ``phone.pair.summary``.

    There is no DS1 status: ``status`` is null, ``status_name`` the cause's stable code
    (``usage_error`` with ``exit_code`` 2, else a cause of exit 20).
    """
    from phone.commissioner import OnboardingReport, Stage
    from phone.pair import summary
    from protocol.errors import Status

    report = OnboardingReport(
        Status.PROTOCOL_ERROR, Stage.CONNECT, message, hint, cause=code, outside_ds1=True
    )
    return summary(report, device, exit_code=exit_code)


def _environment_failure(
    args: argparse.Namespace,
    stdout: TextIO,
    stderr: TextIO,
    code: str,
    message: str,
    hint: str = "",
) -> int:
    """Exit 20: one line on stderr, and with ``--json`` the failure's summary on stdout."""
    print(f"doorstep phone pair: {message}{f' ({hint})' if hint else ''}", file=stderr)
    if args.json:
        _print_json(failure_summary(args.device, code, message, hint), stdout)
    return EXIT_ENVIRONMENT


# ---- doorstep phone (the app) ------------------------------------------------------------------


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed
        return False


def no_terminal_problem() -> str | None:
    """Why the app cannot run here, or None: Textual reads stdin and draws on stderr.

    Without a terminal it never ends and writes escape codes to stderr without end;
    stdout is not used, so ``doorstep phone > log`` is fine.
    """
    if os.environ.get("TEXTUAL_DRIVER"):  # another driver (`textual serve`'s) brings its own I/O
        return None
    stdin, stderr = _is_terminal(sys.__stdin__), _is_terminal(sys.__stderr__)
    if stdin and stderr:
        return None
    if not stdin and not stderr:
        which = "stdin and stderr, where it draws, are not terminals"
    elif not stdin:
        which = "stdin is not one"
    else:
        which = "stderr, where it draws, is not one"
    return f"no terminal for the app ({which}): to pair without one, use `doorstep phone pair`"


def cmd_app(args: argparse.Namespace) -> int:
    from phone.app import create_app
    from phone.history import History

    try:
        config, store = cloud_config(args)
        env_url = os.environ.get(ENV_CLOUD_URL)
        if not getattr(args, "cloud", None) and env_url:
            # A saved URL can be mended in the app's settings; a variable only where it is set.
            check_cloud_url(env_url, f"${ENV_CLOUD_URL}")
    except UsageError as exc:
        print(f"doorstep phone: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if (problem := no_terminal_problem()) is not None:
        print(f"doorstep phone: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        central = make_central(getattr(args, "adapter", None))
        cloud = make_cloud(config) if config.complete else None
    except Exception as exc:
        print(f"doorstep phone: cannot start: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    app = create_app(
        central,
        cloud,
        History(default_history_path()),
        config,
        config_store=store,
        cloud_factory=make_cloud,
    )

    async def run_app() -> None:
        # A stop request (SIGTERM, e.g. from `doorstep demo`) quits like `q`: the
        # terminal is restored, not left in the app's screen mode.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, app.exit)
        await app.run_async()

    asyncio.run(run_app())
    return 0
