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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
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
from protocol.errors import Status
from protocol.messages import Network

log = logging.getLogger("doorstep.hub")

# Outcomes worth another try: the radio, a busy device, a lost or slow answer.
TRANSIENT = frozenset({Status.PROTOCOL_ERROR, Status.TIMED_OUT, Status.BUSY})


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

    def waiting_s(self, now: float) -> float:
        return now - self.first_seen


@dataclass
class HubStats:
    onboarded: int = 0
    failed: int = 0
    rejected: int = 0
    reports: list[OnboardingReport] = field(default_factory=list)


class _DeviceDelegate:
    """The flow's delegate for one device: operator for the code, the hub's Wi-Fi for the network."""

    def __init__(self, hub: HubCommissioner, pending: PendingDevice) -> None:
        self.hub = hub
        self.pending = pending

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        if stage in (Stage.CONNECT, Stage.VERIFY, Stage.SECURE):
            self.pending.progress = DeviceProgress.CONNECTING
        elif stage in (Stage.NETWORK, Stage.JOIN):
            self.pending.progress = DeviceProgress.PROVISIONING
        self.pending.detail = f"{stage.value}: {detail}" if detail else stage.value
        self.hub.changed()

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        self.pending.model, self.pending.sas = device.model, sas
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
        cloud: BindService,
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
        self.devices: dict[str, PendingDevice] = {}
        self.stats = HubStats()
        self._slots = asyncio.Semaphore(max_parallel)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()
        self.idle = asyncio.Event()

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Scan and onboard until ``stop`` is set."""
        stop = stop or asyncio.Event()
        self._finished = await self.registry.finished_addresses()
        try:
            while not stop.is_set():
                async for sighting in self.central.scan(timeout=self.scan_period_s):
                    self._consider(sighting)
                    if stop.is_set():
                        break
                self.idle.clear() if self._tasks else self.idle.set()
                await asyncio.sleep(0)
        finally:
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
        if address in self._tasks or address in self._finished:
            return
        status = sighting.status
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
        for attempt in range(1, self.max_attempts + 1):
            pending.attempts = attempt
            async with self._slots:
                started = time.time()
                flow = Onboarding(
                    self.central, self.cloud, _DeviceDelegate(self, pending), wait_checkin_s=0
                )
                report = await flow.run(pending.address, pending.name)
                retry = report.status in TRANSIENT and attempt < self.max_attempts
                self._settle(pending, report, retry, attempt)  # before the slot is freed
            self.stats.reports.append(report)
            final = not retry and report.status is not Status.WINDOW_CLOSED
            await self._record(pending, report, attempt, final, started)
            if retry:
                await asyncio.sleep(self.retry_base_s * 2 ** (attempt - 1))
                continue
            if final:
                self._finished.add(pending.address)
            log.info("%s: %s (%s)", pending.name, report.status.name, report.message)
            return

    def _settle(
        self, pending: PendingDevice, report: OnboardingReport, retry: bool, attempt: int
    ) -> None:
        pending.detail = report.message
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

    async def _record(
        self,
        pending: PendingDevice,
        report: OnboardingReport,
        attempt: int,
        final: bool,
        started: float,
    ) -> None:
        await self.registry.record(
            OnboardingRecord(
                address=pending.address,
                name=pending.name,
                model=report.device.model if report.device else None,
                dev_id=report.device.dev_id.hex() if report.device else None,
                identifier=report.identifier.hex() if report.identifier else None,
                status=int(report.status),
                status_name=report.status.name.lower(),
                stage=report.stage.value,
                message=report.message,
                attempt=attempt,
                final=final,
                started_at=started,
                duration_s=report.total_s,
                timings={s.value: t for s, t in report.timings.items()},
            )
        )


class ScriptedOperator:
    """``--confirm accept|reject`` for unattended hubs."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.asked: list[str] = []

    async def confirm(self, device: PendingDevice) -> bool:
        self.asked.append(device.address)
        return self.accept
