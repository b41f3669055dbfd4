"""Non-interactive pairing (``doorstep phone pair``), also used by the hub, demo and bench.

``pair`` scans until the named device (advertised name or address) is seen,
runs the same ``Onboarding`` flow as the app with a delegate that answers
from its arguments, and writes one line per stage with its timing to ``out``.
The code confirmation (§5.5) is asked on the terminal unless ``yes``. The
security type is the device's own scan result for that SSID when present,
else ``security``; the choice is validated (§4) before it is sent.

A Wi-Fi failure is final here (no one to ask for another passphrase): the
report then carries that failure's status (2–6), not "rejected by the user".
The passphrase is never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

from ble.profile import Sighting
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
from protocol.errors import Status, UnsupportedSecurity, WifiParameterError
from protocol.messages import Network
from protocol.wifi import validate_wifi

AskCode = Callable[[DeviceSummary, str], Awaitable[bool]]

STAGES: tuple[Stage, ...] = tuple(Stage)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:64]


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
) -> Sighting | None:
    """Scan until ``device`` (name or address, any case) is seen, or ``timeout`` passes."""
    deadline = clock() + timeout
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        async for sighting in central.scan(timeout=min(window_s, remaining)):
            if matches(sighting, device):
                return sighting
            if clock() >= deadline:
                return None
        await asyncio.sleep(0.05)


def terminal_ask(out: TextIO, stdin: TextIO | None = None) -> AskCode:
    """Ask the code question on ``out``; read the answer from ``stdin`` (EOF means no)."""

    async def ask(device: DeviceSummary, sas: str) -> bool:
        code = f"{sas[:3]} {sas[3:]}"
        out.write(f"Device {device.name} ({device.model}) — does it show the code {code}? [y/N] ")
        out.flush()
        source = stdin or sys.stdin
        line = await asyncio.to_thread(source.readline)
        return line.strip().lower() in ("y", "yes")

    return ask


@dataclass
class StageLine:
    stage: Stage
    state: StageState
    seconds: float
    detail: str


@dataclass
class ScriptedPairing:
    """The ``CommissionerDelegate`` for ``pair``: answers from its arguments, prints stages."""

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

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        now = self.clock()
        detail = _printable(detail)
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


def not_found_report(device: str, timeout: float) -> OnboardingReport:
    return OnboardingReport(
        Status.TIMED_OUT,
        Stage.CONNECT,
        f"No device {device!r} seen within {timeout:g} s.",
        "Check that the device is powered and in pairing mode, and nearby.",
    )


async def pair(
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
) -> OnboardingReport:
    """Find ``device`` and onboard it onto ``ssid``; never raises for a DS1 outcome.

    Errors outside DS1 (the cloud unreachable or refusing the token) propagate, and
    so does a scan that cannot start: ``LinkError`` ``scan_failed`` (no Bluetooth
    adapter, no ``bluetoothd``, no D-Bus system bus), caused by what the stack raised.
    """
    ssid_bytes = ssid.encode("utf-8") if isinstance(ssid, str) else ssid
    out.write(f"Scanning for {device}…\n")
    out.flush()
    sighting = await find_device(central, device, scan_timeout, clock=clock)
    if sighting is None:
        report = not_found_report(device, scan_timeout)
        out.write(f"{report.message}\n")
        return report
    out.write(
        f"Found {sighting.name or sighting.address} ({sighting.address}, {sighting.rssi} dBm)\n"
    )
    delegate = ScriptedPairing(
        ssid_bytes,
        passphrase,
        security,
        None if yes else (ask or terminal_ask(out)),
        out,
        clock,
    )
    flow = Onboarding(central, cloud, delegate, rng=rng, clock=clock, wait_checkin_s=wait_checkin_s)
    report = await flow.run(sighting.address, sighting.name or sighting.address)
    return _settle(report, delegate)


def summary(report: OnboardingReport, device: str) -> dict[str, object]:
    """The ``--json`` summary: the report, the stage timings, identifier and status."""
    body = report.to_json()
    body["query"] = device
    body["stages"] = [{"stage": s.value, "seconds": round(t, 4)} for s, t in report.timings.items()]
    body["exit_code"] = int(report.status)
    return body
