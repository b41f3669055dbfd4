"""Non-interactive pairing (``doorstep phone pair``).

``Pairing`` scans until the named device (advertised name or address) is
seen, runs the same ``Onboarding`` flow as the app with a delegate that
answers from its arguments, and writes one line per stage with its timing to
``out``. The code confirmation (§5.5) is asked on the terminal unless ``yes``;
the question is abandoned (its line ended) when the device goes away first.
The security type is the device's own scan result for that SSID when present,
else ``security``; the choice is validated (§4) before it is sent.

A Wi-Fi failure is final here (no one to ask for another passphrase): the
report then carries that failure's status (2–6), in the "Join Wi-Fi" stage,
not "rejected by the user". A device that is not found is reported with the
devices that were seen instead. Cancelled (Ctrl-C), ``Pairing.interrupted``
says how far it got. The passphrase is never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from ble.profile import AdvState, Sighting
from ble.transport import Central
from phone.commissioner import (
    BindService,
    DeviceSummary,
    NetworkChoice,
    Onboarding,
    OnboardingReport,
    Stage,
    StageState,
    explain,
)
from protocol.commissioner_side import ProvisionFailed
from protocol.crypto import RandomSource
from protocol.display import printable
from protocol.errors import Status, UnsupportedSecurity, WifiParameterError
from protocol.messages import Network
from protocol.wifi import validate_wifi

AskCode = Callable[[DeviceSummary, str], Awaitable[bool]]

STAGES: tuple[Stage, ...] = tuple(Stage)


def matches(sighting: Sighting, device: str) -> bool:
    wanted = device.strip().lower()
    return wanted in (sighting.address.lower(), sighting.name.lower())


async def find_device(
    central: Central,
    device: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    window_s: float = 2.0,
    seen: dict[str, Sighting] | None = None,
) -> Sighting | None:
    """Scan until ``device`` (name or address, any case) is seen, or ``timeout`` passes.

    ``seen`` collects the latest sighting of every device seen meanwhile, by address.
    """
    deadline = clock() + timeout
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        async for sighting in central.scan(timeout=min(window_s, remaining)):
            if seen is not None:
                seen[sighting.address] = sighting
            if matches(sighting, device):
                return sighting
            if clock() >= deadline:
                return None
        await asyncio.sleep(0.05)


def in_pairing_mode(sighting: Sighting) -> bool:
    return sighting.status.window_open and sighting.status.state is not AdvState.BUSY


def _by_name(seen: Iterable[Sighting]) -> list[Sighting]:
    return sorted(seen, key=lambda s: (printable(s.name) or s.address, s.address))


def describe_seen(seen: Iterable[Sighting]) -> list[str]:
    """The devices seen while scanning, one line each (peer names made printable)."""
    lines = []
    for s in _by_name(seen):
        mode = "in pairing mode" if in_pairing_mode(s) else "not in pairing mode"
        if s.status.state is AdvState.BUSY:
            mode += " (busy with another phone or hub)"
        lines.append(
            f"  {printable(s.name) or '(no name)':<18} {s.address}  {s.rssi:>4} dBm  {mode}"
        )
    return lines


def seen_json(seen: Iterable[Sighting]) -> list[dict[str, object]]:
    return [
        {
            "name": printable(s.name),
            "address": s.address,
            "rssi": s.rssi,
            "state": s.status.state.name.lower(),
            "pairing_mode": in_pairing_mode(s),
        }
        for s in _by_name(seen)
    ]


async def read_line(source: TextIO) -> str:
    """One line from ``source`` without blocking the event loop, and cancellable.

    A terminal or a pipe is waited on with the loop's reader (a thread blocked in
    ``readline`` could not be abandoned: it would hold the process until Enter);
    a regular file, ``/dev/null`` or an in-memory stream never blocks: read at once.
    """
    try:
        fd = source.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: no file descriptor
        return source.readline()
    loop = asyncio.get_running_loop()
    data = bytearray()
    while b"\n" not in data:
        readable: asyncio.Future[None] = loop.create_future()

        def wake(ready: asyncio.Future[None] = readable) -> None:
            if not ready.done():
                ready.set_result(None)

        try:
            loop.add_reader(fd, wake)
        except (OSError, ValueError, NotImplementedError):  # cannot be polled: never blocks
            return source.readline()
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        chunk = os.read(fd, 1024)
        if not chunk:  # end of input
            break
        data += chunk
    return data.decode("utf-8", "replace").split("\n", 1)[0]


def _drop_typed_input(source: TextIO) -> None:
    """What the user typed for an abandoned question goes: left on the terminal, it
    would be read by whatever reads it next (the shell, when ``phone pair`` exits)."""
    try:
        fd = source.fileno()
        if os.isatty(fd):
            termios.tcflush(fd, termios.TCIFLUSH)
    except (OSError, ValueError, termios.error):  # no terminal (a pipe, a file): nothing to do
        pass


def terminal_ask(out: TextIO, stdin: TextIO | None = None) -> AskCode:
    """Ask the code question on ``out``; read the answer from ``stdin`` (EOF means no).

    Cancelled (the device went away, Ctrl-C), the question's line is ended, so
    what follows starts on a line of its own.
    """

    async def ask(device: DeviceSummary, sas: str) -> bool:
        code = f"{sas[:3]} {sas[3:]}"
        who = f"{printable(device.name)} ({printable(device.model)})"
        out.write(f"Device {who} — does it show the code {code}? [y/N] ")
        out.flush()
        source = stdin or sys.stdin
        try:
            line = await read_line(source)
        except asyncio.CancelledError:
            out.write("\n")
            out.flush()
            _drop_typed_input(source)
            raise
        return line.strip().lower() in ("y", "yes")

    return ask


@dataclass
class StageLine:
    stage: Stage
    state: StageState
    seconds: float
    detail: str


@dataclass(repr=False)
class ScriptedPairing:
    """The ``CommissionerDelegate`` for ``pair``: answers from its arguments, prints stages.

    ``repr`` hides the passphrase.
    """

    ssid: bytes
    passphrase: str
    security: int
    ask: AskCode | None
    out: TextIO
    clock: Callable[[], float] = time.monotonic
    lines: list[StageLine] = field(default_factory=list)
    gave_up: tuple[Status, str] | None = None
    chosen_security: int | None = None
    _open: dict[Stage, tuple[float, str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ScriptedPairing(ssid={self.ssid!r}, security={self.security})"

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        now = self.clock()
        detail = printable(detail)
        if state is StageState.RUNNING:
            index = STAGES.index(stage)
            for earlier in STAGES[:index]:
                if earlier in self._open:  # the flow moved on without a DONE
                    self._close(earlier, StageState.DONE, "", now)
            if stage not in self._open:
                self._open[stage] = (now, detail)
            return
        if stage in self._open:
            self._close(stage, state, detail, now)
        elif stage is Stage.DONE:
            self._emit(StageLine(stage, state, 0.0, ""))

    def _close(self, stage: Stage, state: StageState, detail: str, now: float) -> None:
        started, first_detail = self._open.pop(stage)
        shown = detail if state is StageState.FAILED else first_detail
        if stage is Stage.CONFIRM and state is not StageState.FAILED:
            shown = f"code {first_detail}" if first_detail else ""
        self._emit(StageLine(stage, state, now - started, shown))

    def _emit(self, line: StageLine) -> None:
        self.lines.append(line)
        mark = {StageState.DONE: "ok", StageState.FAILED: "FAILED"}.get(
            line.state, line.state.value
        )
        text = f"{line.stage.value:<18} {mark:<6} {line.seconds:8.3f} s"
        if line.detail:
            text += f"  {line.detail}"
        self.out.write(text + "\n")
        self.out.flush()

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        if self.ask is None:
            return True
        return await self.ask(device, sas)

    async def choose_network(
        self, networks: tuple[Network, ...], failure: ProvisionFailed | None
    ) -> NetworkChoice | None:
        if failure is not None:
            self.gave_up = (failure.status, explain(failure.status)[0])
            return None
        security = next((n.security for n in networks if n.ssid == self.ssid), self.security)
        self.chosen_security = security
        try:
            creds = validate_wifi(self.ssid, security, self.passphrase)
        except (WifiParameterError, UnsupportedSecurity) as exc:
            self.gave_up = (exc.status, str(exc))
            return None
        return NetworkChoice(creds.ssid, creds.passphrase, int(creds.security))


def _settle(report: OnboardingReport, delegate: ScriptedPairing) -> OnboardingReport:
    """Report why we gave up on the network, instead of the CLOSE 1 the flow sends for it."""
    if (
        delegate.gave_up is not None
        and report.status is Status.REJECTED_BY_USER
        and report.stage in (Stage.NETWORK, Stage.JOIN)
    ):
        status, message = delegate.gave_up
        report.status = status
        report.message = message
        report.hint = explain(status)[1]
    return report


def not_found_report(device: str, timeout: float, elapsed: float = 0.0) -> OnboardingReport:
    return OnboardingReport(
        Status.TIMED_OUT,
        Stage.CONNECT,
        f"No device {device!r} seen within {timeout:g} s.",
        "Check that the device is powered and in pairing mode, and nearby.",
        total_s=elapsed,
        cause="device_not_found",
    )


class Pairing:
    """One ``phone pair``: find ``device``, then onboard it onto ``ssid``.

    ``run`` never raises for a DS1 outcome. Errors outside DS1 that happen before
    the flow (a scan that cannot start: ``LinkError`` ``scan_failed``, no Bluetooth
    adapter, no ``bluetoothd``, no D-Bus system bus) propagate; the cloud
    unreachable or refusing the token during the flow is a report with
    ``outside_ds1`` set. ``seen`` holds every device seen while scanning.
    """

    def __init__(
        self,
        central: Central,
        cloud: BindService,
        device: str,
        ssid: bytes | str,
        passphrase: str,
        *,
        yes: bool,
        out: TextIO,
        security: int = 1,
        scan_timeout: float = 30.0,
        wait_checkin_s: float = 20.0,
        ask: AskCode | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: RandomSource = os.urandom,
    ) -> None:
        self.central = central
        self.cloud = cloud
        self.device = device
        self.ssid = ssid.encode("utf-8") if isinstance(ssid, str) else ssid
        self.passphrase = passphrase
        self.yes = yes
        self.out = out
        self.security = security
        self.scan_timeout = scan_timeout
        self.wait_checkin_s = wait_checkin_s
        self.ask = ask
        self.clock = clock
        self.rng = rng
        self.seen: dict[str, Sighting] = {}
        self.found: Sighting | None = None
        self.scan_s: float | None = None  # None while still scanning
        self._started: float | None = None
        self._flow: Onboarding | None = None

    def __repr__(self) -> str:  # never the passphrase
        return f"Pairing(device={self.device!r}, ssid={self.ssid!r})"

    async def run(self) -> OnboardingReport:
        self._started = started = self.clock()
        self.out.write(f"Scanning for {self.device}…\n")
        self.out.flush()
        sighting = await find_device(
            self.central, self.device, self.scan_timeout, clock=self.clock, seen=self.seen
        )
        self.scan_s = self.clock() - started
        if sighting is None:
            others = describe_seen(self.seen.values())
            self.out.write(
                "Seen while scanning:\n" + "\n".join(others) + "\n"
                if others
                else "No Doorstep device seen at all.\n"
            )
            self.out.flush()
            return not_found_report(self.device, self.scan_timeout, self.scan_s)
        self.found = sighting
        self.out.write(
            f"Found {printable(sighting.name) or sighting.address} "
            f"({sighting.address}, {sighting.rssi} dBm)\n"
        )
        self.out.flush()
        delegate = ScriptedPairing(
            self.ssid,
            self.passphrase,
            self.security,
            None if self.yes else (self.ask or terminal_ask(self.out)),
            self.out,
            self.clock,
        )
        self._flow = flow = Onboarding(
            self.central,
            self.cloud,
            delegate,
            rng=self.rng,
            clock=self.clock,
            wait_checkin_s=self.wait_checkin_s,
        )
        report = await flow.run(sighting.address, printable(sighting.name) or sighting.address)
        return self._about_the_device(_settle(report, delegate))

    def _about_the_device(self, report: OnboardingReport) -> OnboardingReport:
        """A refusal before the cloud answered still names the device it was about."""
        if report.device is None and self.found is not None:
            found = self.found
            report.device = DeviceSummary(printable(found.name), found.address, "", b"")
        return report

    def interrupted(self) -> OnboardingReport:
        """The report of a cancelled ``run`` (Ctrl-C): how far it got, ``cancelled`` set."""
        now = self.clock()
        elapsed = 0.0 if self._started is None else now - self._started
        if self._flow is None:  # still scanning
            if self.scan_s is None:
                self.scan_s = elapsed
            return OnboardingReport(
                Status.PROTOCOL_ERROR,
                Stage.CONNECT,
                f"Interrupted while scanning for {self.device!r}; nothing was paired.",
                total_s=elapsed,
                cause="cancelled",
                cancelled=True,
            )
        report = self._about_the_device(self._flow.report)
        report.cancelled, report.cause, report.hint = True, "cancelled", ""
        if report.identifier is not None:  # bind/complete done: only the check-in wait was cut
            report.message = (
                f"Interrupted while waiting for the device's check-in; it was onboarded "
                f"as {report.short_id}."
            )
        else:
            report.message = (
                f"Interrupted during {report.stage.value!r}; the pairing was cancelled."
            )
        return report

    def json_summary(
        self, report: OnboardingReport, *, exit_code: int | None = None
    ) -> dict[str, object]:
        """``summary`` with what this run saw while scanning."""
        return summary(
            report, self.device, seen=self.seen.values(), scan_s=self.scan_s, exit_code=exit_code
        )


def summary(
    report: OnboardingReport,
    device: str,
    *,
    seen: Iterable[Sighting] = (),
    scan_s: float | None = None,
    exit_code: int | None = None,
) -> dict[str, object]:
    """The ``--json`` summary: the report, the stage timings, identifier and status.

    A cancelled report and one that ended outside DS1 have no DS1 status:
    ``status`` is null and ``status_name`` says what happened (``cancelled``, or
    the cause's stable code such as ``cloud_unavailable``). ``seen`` lists the
    devices seen while scanning, ``scan_s`` how long that took; ``exit_code`` is
    the command's (by default the DS1 status).
    """
    body = report.to_json()
    if report.cancelled:
        body.update(status=None, status_name="cancelled")
    elif report.outside_ds1 and not report.ok:
        body.update(status=None, status_name=report.cause or "error")
    body["query"] = device
    body["stages"] = [{"stage": s.value, "seconds": round(t, 4)} for s, t in report.timings.items()]
    body["scan_s"] = None if scan_s is None else round(scan_s, 4)
    body["seen"] = seen_json(seen)
    body["exit_code"] = int(report.status) if exit_code is None else exit_code
    return body
