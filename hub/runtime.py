"""The hub as a commissioner: scan, offer each new device to the operator, onboard in parallel.

A hub is first a device (``device.runtime.DeviceRuntime``, the same code as
any device) onboarded by the phone, which gives it the home Wi-Fi, an
identifier and K_dev. Then ``HubCommissioner`` scans continuously for
unprovisioned Doorstep devices whose pairing window is open and runs the
phone's own ``Onboarding`` flow for each, with at most ``max_parallel`` at
once. The operator confirms each device and its code; the hub provisions its
home Wi-Fi and signs cloud requests with its identity (§6.3), so the hub's
owner becomes the device's owner. Transient failures are retried with
backoff a bounded number of times; permanent ones are recorded and left.

Every outcome for a device (onboarded, failed, rejected, retrying) is handed
to ``on_outcome`` as a ``DeviceOutcome`` once the registry holds it; its
``line()`` is what the unattended hub prints, e.g.::

    Doorstep-01A2 (C8:2B:96:1A:01:A2): onboarded as 0561683a
    Doorstep-01A3 (C8:2B:96:1A:01:A3): failed: 6 no_ip_address (The device joined …)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ble.profile import AdvState, Sighting
from ble.transport import Central
from hub.registry import HubRegistry, OnboardingRecord
from phone.commissioner import (
    BindService,
    DeviceSummary,
    NetworkChoice,
    Onboarding,
    OnboardingReport,
    Stage,
    StageState,
)
from protocol.commissioner_side import ProvisionFailed
from protocol.display import printable
from protocol.errors import Status
from protocol.messages import Network

log = logging.getLogger("doorstep.hub")

# Outcomes worth another try: the radio, a busy device, a lost or slow answer.
TRANSIENT = frozenset({Status.PROTOCOL_ERROR, Status.TIMED_OUT, Status.BUSY})


class OwnedDeviceView(Protocol):
    @property
    def dev_id(self) -> bytes: ...

    @property
    def identifier(self) -> bytes: ...


class HubCloud(BindService, Protocol):
    """The bind flow plus the owner view, both signed with the hub's identity."""

    async def list_devices(self) -> Sequence[OwnedDeviceView]: ...


class Operator(Protocol):
    """The person (or script) who accepts devices into the home."""

    async def confirm(self, device: PendingDevice) -> bool: ...


class DeviceProgress(Enum):
    SEEN = "seen"
    CONNECTING = "connecting"
    AWAITING_OPERATOR = "awaiting operator"
    PROVISIONING = "provisioning"
    ONBOARDED = "onboarded"
    FAILED = "failed"
    REJECTED = "rejected"
    RETRYING = "retrying"


@dataclass
class PendingDevice:
    """A device the hub is working on, as the console shows it."""

    address: str
    name: str
    rssi: int
    first_seen: float
    progress: DeviceProgress = DeviceProgress.SEEN
    model: str = ""
    sas: str = ""
    detail: str = ""
    attempts: int = 0
    identifier: str = ""
    settled_at: float | None = None  # when it was onboarded, rejected or failed for now

    def waiting_s(self, now: float) -> float:
        """How long it waited: until ``now``, or until it was settled (the clock stops)."""
        return (now if self.settled_at is None else self.settled_at) - self.first_seen


@dataclass(frozen=True)
class DeviceOutcome:
    """How one attempt at a device ended, as the hub's operator is told."""

    name: str
    address: str
    progress: DeviceProgress  # ONBOARDED, FAILED, REJECTED or RETRYING
    status: Status
    message: str
    identifier: str = ""  # the first 8 hex digits, once onboarded
    attempt: int = 1
    max_attempts: int = 1
    retry_in_s: float = 0.0
    final: bool = True  # False: tried again when it next advertises an open window
    #: a failure outside DS1 (the cloud unreachable or failing, or refusing this hub): its
    #: stable code, e.g. ``cloud_unavailable``, shown instead of the nearest DS1 status
    cause: str = ""

    def line(self) -> str:
        """One log line: who, what happened, and for a failure its code and reason."""
        who = f"{printable(self.name, 96)} ({printable(self.address, 96)})"
        if self.progress is DeviceProgress.ONBOARDED:
            note = f" ({printable(self.message, 96)})" if self.message else ""
            return f"{who}: onboarded as {self.identifier}{note}"
        code = printable(self.cause, 40) or f"{int(self.status)} {self.status.name.lower()}"
        what = f"{code} ({printable(self.message, 96)})"
        if self.progress is DeviceProgress.RETRYING:
            return (
                f"{who}: attempt {self.attempt}/{self.max_attempts} failed: {what}; "
                f"retrying in {self.retry_in_s:g} s"
            )
        verdict = "rejected" if self.progress is DeviceProgress.REJECTED else "failed"
        later = "" if self.final else "; will try again once its pairing window is open"
        return f"{who}: {verdict}: {what}{later}"


def outside_ds1_cause(report: OnboardingReport) -> str:
    """The stable code of a failure outside DS1 (``cloud_unavailable`` …), else "".

    Its DS1 status is only the nearest one (``timed_out`` for a cloud that cannot be
    reached): the operator is told the cause, as ``phone pair`` tells its user.
    """
    return report.cause if report.outside_ds1 and not report.ok else ""


@dataclass
class HubStats:
    onboarded: int = 0
    failed: int = 0
    rejected: int = 0
    #: devices onboarded by earlier runs of this hub (its registry), for the console
    onboarded_before: int = 0
    #: onboardings still in progress when the hub was stopped (a restarted hub settles them)
    cut_short: int = 0
    reports: list[OnboardingReport] = field(default_factory=list)


class _DeviceDelegate:
    """The flow's delegate for one device: operator for the code, the hub's Wi-Fi for the network."""

    def __init__(self, hub: HubCommissioner, pending: PendingDevice, row_id: int) -> None:
        self.hub = hub
        self.pending = pending
        self.row_id = row_id

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        if stage in (Stage.CONNECT, Stage.VERIFY, Stage.SECURE):
            self.pending.progress = DeviceProgress.CONNECTING
        elif stage in (Stage.NETWORK, Stage.JOIN):
            self.pending.progress = DeviceProgress.PROVISIONING
        self.pending.detail = f"{stage.value}: {detail}" if detail else stage.value
        self.hub.changed()

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        self.pending.model, self.pending.sas = device.model, sas
        # From here on the device may end up onboarded even if the hub dies:
        # the registry must know which device this row is about.
        await self.hub.registry.note_device(self.row_id, device.dev_id.hex(), device.model)
        self.pending.progress = DeviceProgress.AWAITING_OPERATOR
        self.hub.changed()
        return await self.hub.operator.confirm(self.pending)

    async def choose_network(
        self, networks: tuple[Network, ...], failure: ProvisionFailed | None
    ) -> NetworkChoice | None:
        return None if failure is not None else self.hub.wifi  # one home network; no retries


class HubCommissioner:
    def __init__(
        self,
        central: Central,
        cloud: HubCloud,
        operator: Operator,
        wifi: NetworkChoice,
        registry: HubRegistry,
        *,
        max_parallel: int = 4,
        max_attempts: int = 3,
        retry_base_s: float = 1.0,
        scan_period_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        on_outcome: Callable[[DeviceOutcome], None] | None = None,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.central = central
        self.cloud = cloud
        self.operator = operator
        self.wifi = wifi
        self.registry = registry
        self.max_parallel = max_parallel
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.scan_period_s = scan_period_s
        self.clock = clock
        self.on_change = on_change
        self.on_outcome = on_outcome
        self.devices: dict[str, PendingDevice] = {}
        self.stats = HubStats()
        self._slots = asyncio.Semaphore(max_parallel)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        # finished addresses since seen advertising as provisioned: back to unprovisioned
        # with the pairing window open, such a device was factory-reset (a new case)
        self._provisioned_since: set[str] = set()
        self._unfinished: dict[str, int] = {}  # address → row of an attempt cut short
        self._settling: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _tell(self, outcome: DeviceOutcome) -> None:
        log.info("%s", outcome.line())
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Scan and onboard until ``stop`` is set."""
        stop = stop or asyncio.Event()
        self._finished = await self.registry.finished_addresses()
        self.stats.onboarded_before = await self.registry.onboarded_count()
        self._unfinished = {rec.address: row for row, rec in await self.registry.unfinished()}
        await self.settle()
        try:
            while not stop.is_set():
                async for sighting in self.central.scan(timeout=self.scan_period_s):
                    self._consider(sighting)
                    if stop.is_set():
                        break
                self.idle.clear() if self._tasks else self.idle.set()
                await asyncio.sleep(0)
        finally:
            self.stats.cut_short = sum(not task.done() for task in self._tasks.values())
            for task in list(self._tasks.values()):
                task.cancel()
            for task in list(self._tasks.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _consider(self, sighting: Sighting) -> None:
        address = sighting.address
        known = self.devices.get(address)
        if known is not None:
            known.rssi = sighting.rssi
        status = sighting.status
        if address in self._finished and address not in self._tasks:
            if status.state is AdvState.PROVISIONED:
                self._provisioned_since.add(address)
            elif status.window_open and address in self._provisioned_since:
                # Reset since the hub finished with it: onboard it anew. (A device the
                # hub failed or the operator rejected never advertised as provisioned:
                # it is not retried over and over.)
                self._finished.discard(address)
                self._provisioned_since.discard(address)
                self.devices.pop(address, None)
                known = None
        if address in self._tasks or address in self._finished:
            return
        if (
            status.state is AdvState.PROVISIONED
            and address in self._unfinished
            and (self._settling is None or self._settling.done())
        ):
            self._settling = asyncio.create_task(self.settle())
        if status.state is not AdvState.UNPROVISIONED or not status.window_open:
            return
        pending = known or PendingDevice(address, sighting.name, sighting.rssi, self.clock())
        self.devices[address] = pending
        self.idle.clear()
        task = asyncio.create_task(self._onboard(pending))
        self._tasks[address] = task
        task.add_done_callback(lambda _t, a=address: self._tasks.pop(a, None))
        self.changed()

    async def _onboard(self, pending: PendingDevice) -> None:
        pending.settled_at = None  # tried again: its waiting goes on
        interrupted = self._unfinished.pop(pending.address, None)
        if interrupted is not None:  # an attempt a crash cut short, and the device is back
            await self._finish(interrupted, pending, None, final=False)
        for attempt in range(1, self.max_attempts + 1):
            pending.attempts = attempt
            async with self._slots:
                started = time.time()
                row_id = await self.registry.begin(pending.address, pending.name, attempt, started)
                flow = Onboarding(
                    self.central,
                    self.cloud,
                    _DeviceDelegate(self, pending, row_id),
                    wait_checkin_s=0,
                )
                report = await flow.run(pending.address, pending.name)
                retry = report.status in TRANSIENT and attempt < self.max_attempts
                self._settle(pending, report, retry, attempt)  # before the slot is freed
            self.stats.reports.append(report)
            # Not the device's last word: its pairing window closed, or the cloud was down
            # (a device failed only for that used to be left alone for good, restarts too).
            final = (
                not retry and report.status is not Status.WINDOW_CLOSED and not report.cloud_down
            )
            await self._finish(row_id, pending, report, final=final)
            delay = self.retry_base_s * 2 ** (attempt - 1)
            self._tell(
                DeviceOutcome(
                    name=pending.name,
                    address=pending.address,
                    progress=pending.progress,
                    status=report.status,
                    message="" if report.ok else report.message,
                    identifier=report.short_id,
                    attempt=attempt,
                    max_attempts=self.max_attempts,
                    retry_in_s=delay if retry else 0.0,
                    final=final,
                    cause=outside_ds1_cause(report),
                )
            )
            if retry:
                await asyncio.sleep(delay)
                continue
            if final:
                self._finished.add(pending.address)
            return

    async def settle(self) -> None:
        """Settle attempts a crash cut short: the cloud says which devices got onboarded."""
        if not self._unfinished:
            return
        try:
            owned = {d.dev_id.hex(): d for d in await self.cloud.list_devices()}
        except Exception as exc:
            log.info("cannot settle interrupted onboardings yet: %s", exc)
            return
        for row_id, rec in await self.registry.unfinished():
            device = owned.get(rec.dev_id or "")
            if device is None or rec.address not in self._unfinished:
                continue
            await self.registry.finish(
                row_id,
                OnboardingRecord(
                    rec.address,
                    rec.name,
                    rec.model,
                    rec.dev_id,
                    device.identifier.hex(),
                    int(Status.OK),
                    "ok",
                    Stage.DONE.value,
                    "onboarded (confirmed by the cloud after the hub restarted)",
                    rec.attempt,
                    True,
                    rec.started_at,
                    0.0,
                    {},
                ),
            )
            del self._unfinished[rec.address]
            self._finished.add(rec.address)
            self.stats.onboarded += 1
            self.changed()
            self._tell(
                DeviceOutcome(
                    name=rec.name,
                    address=rec.address,
                    progress=DeviceProgress.ONBOARDED,
                    status=Status.OK,
                    message="confirmed by the cloud after the hub restarted",
                    identifier=device.identifier.hex()[:8],
                    attempt=rec.attempt,
                    max_attempts=self.max_attempts,
                )
            )

    def _settle(
        self, pending: PendingDevice, report: OnboardingReport, retry: bool, attempt: int
    ) -> None:
        pending.detail = report.message
        pending.settled_at = None if retry else self.clock()
        if report.ok:
            pending.progress = DeviceProgress.ONBOARDED
            pending.identifier = report.short_id
            self.stats.onboarded += 1
        elif report.status is Status.REJECTED_BY_USER:
            pending.progress = DeviceProgress.REJECTED
            self.stats.rejected += 1
        elif retry:
            pending.progress = DeviceProgress.RETRYING
            pending.detail = f"{report.message} — retry {attempt + 1}/{self.max_attempts}"
        else:
            pending.progress = DeviceProgress.FAILED
            self.stats.failed += 1
        self.changed()

    async def _finish(
        self,
        row_id: int,
        pending: PendingDevice,
        report: OnboardingReport | None,
        *,
        final: bool,
    ) -> None:
        if report is None:
            status, message, stage = Status.PROTOCOL_ERROR, "interrupted: the hub restarted", ""
        else:
            status, message, stage = report.status, report.message, report.stage.value
        await self.registry.finish(
            row_id,
            OnboardingRecord(
                address=pending.address,
                name=pending.name,
                model=report.device.model if report and report.device else pending.model or None,
                dev_id=report.device.dev_id.hex() if report and report.device else None,
                identifier=report.identifier.hex() if report and report.identifier else None,
                status=int(status),
                status_name=(report and outside_ds1_cause(report)) or status.name.lower(),
                stage=stage,
                message=message,
                attempt=pending.attempts,
                final=final,
                started_at=0.0,
                duration_s=report.total_s if report else 0.0,
                timings={s.value: t for s, t in report.timings.items()} if report else {},
            ),
        )


class ScriptedOperator:
    """``--confirm accept|reject`` for unattended hubs."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.asked: list[str] = []

    async def confirm(self, device: PendingDevice) -> bool:
        self.asked.append(device.address)
        return self.accept
