"""The device's firmware loop: DS1 over a ``Peripheral``, storage, Wi-Fi and check-in.

One consumer task owns the ``DeviceSession``: peripheral events, the user's
answer, the Wi-Fi join outcome and timer ticks all arrive on one inbox, so
session calls never race. Slow work (asking the user, joining Wi-Fi, the
atomic store, the cloud check-in) runs in tasks that post their result back.

What the device's user sees (``DeviceUser.show``, the ``[device]`` lines of
``doorstep device run``): its state once at start-up, one line when it is
provisioned and one when it checks in, one line per Wi-Fi join that fails
(status code, why, what next) and one per refused or failed connection. A
passphrase never appears in any of them.

The state directory is first written only once the radio has started: a
device that cannot start (no Bluetooth) leaves its stored state as it was.
If Bluetooth goes away later (the peripheral's ``bluetooth_lost``), ``run``
stops the device and raises it, so that its caller says so and exits.

Check-in failures are told once (why, in words) and the check-in that then
succeeds once, however many retries lie between.

PROTOCOL.md §5.3 (PROVISION order and the atomic store), §5.6 (window,
back-off, one commissioner at a time), §6.4 (check-in with the pending key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ble.errors import LinkError
from ble.profile import FLAG_BUTTON_NEEDED, FLAG_WINDOW_OPEN, AdvState, DeviceStatus
from ble.transport import FragmentIn, LinkDown, LinkUp, Peripheral
from device.storage import DeviceState, DeviceStore, PendingBind, StoredIdentity, StoredWifi
from device.wifi import JoinFailed, WifiEnvironment
from protocol.crypto import RandomSource
from protocol.device_side import (
    Authenticated,
    ConfirmationRequested,
    DeviceEvent,
    DeviceSession,
    HelloReceived,
    JoinRequested,
    Provisioned,
    ScanRequested,
    SessionEnded,
    StoreRequested,
)
from protocol.display import printable
from protocol.errors import Status
from protocol.factory import FactoryRecord
from protocol.pairing import PairingGate, backoff_seconds

log = logging.getLogger("doorstep.device")

U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class ConfirmRequest:
    """What the device's user is shown (§5.3 step 3)."""

    ssid: str
    sas: str
    deadline_s: float


class DeviceUser(Protocol):
    """The device's user interface (a prompt, or scripted accept/reject)."""

    async def confirm(self, request: ConfirmRequest) -> bool: ...

    async def show(self, message: str) -> None: ...


class CheckinRefused(Exception):
    """The cloud refused the check-in for good (e.g. 410 after 7 days, or unknown)."""


class CheckinUnavailable(Exception):
    """The check-in did not get through this time; ``str()`` says why, in words, no secret."""


class CheckinService(Protocol):
    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> None:
        """Raises ``CheckinRefused`` for a final no; ``CheckinUnavailable`` (or any other
        exception) means retry later."""
        ...


# ---- inbox items ---------------------------------------------------------------


@dataclass(frozen=True)
class _UserAnswer:
    session: DeviceSession
    accepted: bool


@dataclass(frozen=True)
class _JoinOutcome:
    session: DeviceSession
    status: Status
    detail: str = ""
    ssid: bytes = b""


@dataclass(frozen=True)
class _JoinStage:
    session: DeviceSession
    stage: int


@dataclass(frozen=True)
class _Stored:
    session: DeviceSession


@dataclass(frozen=True)
class _Command:
    # "button", "reset", "tick", "checked_in", "checkin_failing", "checkin_refused",
    # "bluetooth_lost", "stop"
    name: str
    detail: str = ""  # checkin_failing: why; checked_in: the failed tries before, if any


_Item = (
    LinkUp | FragmentIn | LinkDown | _UserAnswer | _JoinOutcome | _JoinStage | _Stored | _Command
)


class DeviceRuntime:
    """A Doorstep device: advertise, onboard, store, join, check in."""

    def __init__(
        self,
        factory: FactoryRecord,
        store: DeviceStore,
        peripheral: Peripheral,
        wifi: WifiEnvironment,
        user: DeviceUser,
        checkin: CheckinService | None,
        *,
        fw: str = "1.0.0",
        rng: RandomSource = os.urandom,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        checkin_backoff: tuple[float, float] = (0.5, 30.0),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stop_if_bluetooth_lost: bool = True,
    ) -> None:
        """``stop_if_bluetooth_lost``: when the peripheral says Bluetooth went away
        (``LinkError`` ``bluetooth_lost``), ``run`` stops and raises it; otherwise the
        device carries on without a radio, as it did before it could tell."""
        self.factory = factory
        self.store = store
        self.peripheral = peripheral
        self.wifi = wifi
        self.user = user
        self.checkin_service = checkin
        self.fw = fw
        self.rng = rng
        self.clock = clock
        self.sleep = sleep
        self.checkin_backoff = checkin_backoff
        self.stop_if_bluetooth_lost = stop_if_bluetooth_lost
        self._bluetooth_lost: LinkError | None = None
        self.state: DeviceState = store.load()
        self.gate = PairingGate.from_json(dict(self.state.gate), wall_clock)
        self.session: DeviceSession | None = None
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._saves: set[asyncio.Task[None]] = set()
        self._checkin_task: asyncio.Task[None] | None = None
        self._status: DeviceStatus | None = None
        self._save_lock = asyncio.Lock()
        self._provisioned_by: DeviceSession | None = None  # the session that sent RESULT 0
        self._cut_by_reset: DeviceSession | None = None  # ended by a factory reset
        self.started = asyncio.Event()
        self.onboarded = asyncio.Event()  # set when a check-in made an identity active
        self.stopped = asyncio.Event()  # set when run() has ended
        if self.state.active is None and not self.gate.window_open:
            self.gate.open_window()  # power-on without an active identity (§5.6)
        # Saved by run() once the radio is up, not here: see the module docstring.
        self.state = self.state.with_(gate=self.gate.to_json())

    # ---- status shown on the air ---------------------------------------------

    def current_status(self) -> DeviceStatus:
        if self.session is not None and not self.session.closed:
            state = AdvState.BUSY
        elif self.state.active is not None:
            state = AdvState.PROVISIONED
        else:
            state = AdvState.UNPROVISIONED
        flags = FLAG_WINDOW_OPEN if self.gate.window_open else 0
        if not self.gate.window_open and self.state.active is not None:
            flags |= FLAG_BUTTON_NEEDED
        return DeviceStatus(state, flags)

    async def _refresh_status(self) -> None:
        status = self.current_status()
        if status != self._status:
            self._status = status
            await self.peripheral.set_status(status)

    async def _save(self) -> None:
        """Persist ``self.state`` (with the gate) off the event loop, one save at a time.

        A save fsyncs twice; doing it on the loop would stall the GATT
        server's D-Bus replies (and so the commissioner) for as long.
        """
        async with self._save_lock:
            self.state = self.state.with_(gate=self.gate.to_json())
            await asyncio.to_thread(self.store.save, self.state)

    # ---- public controls -------------------------------------------------------

    def press_button(self) -> None:
        self._inbox.put_nowait(_Command("button"))

    def factory_reset(self) -> None:
        self._inbox.put_nowait(_Command("reset"))

    def stop(self) -> None:
        self._inbox.put_nowait(_Command("stop"))

    def wake(self) -> None:
        """Re-check timers now (for an injected clock that was moved by hand)."""
        self._inbox.put_nowait(_Command("tick"))

    # ---- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        self._status = self.current_status()
        await self.peripheral.start(
            name=self.factory.ble_name, dev_id=self.factory.dev_id, status=self._status
        )
        pump: asyncio.Task[None] | None = None
        try:
            # Only now that the radio is up: a start that fails writes nothing, so the
            # next start opens its own 10-minute window rather than the rest of this one.
            await self._save()
            pump = asyncio.create_task(self._pump_peripheral())
            if self.state.pending is not None:
                self._start_checkin()  # resume after a restart (§5.3)
            self.started.set()
            await self.user.show(self._describe())
            while True:
                item = await self._next_item()
                if item is None:
                    await self._tick()
                    continue
                if isinstance(item, _Command) and item.name == "stop":
                    break
                if self._bluetooth_lost is not None and self.stop_if_bluetooth_lost:
                    raise self._bluetooth_lost  # after the clean-up below
                await self._handle(item)
                await self._refresh_status()
        finally:
            if pump is not None:
                pump.cancel()
            for task in list(self._tasks):
                task.cancel()
            if self._saves:  # a power-off is kill -9; an orderly stop finishes its saves
                await asyncio.gather(*self._saves, return_exceptions=True)
            if self._checkin_task is not None:
                self._checkin_task.cancel()
            with contextlib.suppress(Exception):
                await self.peripheral.stop()
            self.stopped.set()

    # ---- what the device's user is told ------------------------------------------------

    def _window_text(self) -> str:
        if self.gate.window_open:
            return "pairing window open"
        return "pairing window closed; press the pairing button to open it"

    def _describe(self) -> str:
        """The state line shown at start-up."""
        name = self.factory.ble_name
        if (pending := self.state.pending) is not None:
            return (
                f"{name}: provisioned as {pending.identity.identifier.hex()[:8]} "
                f"(epoch {pending.identity.epoch}), {self._checkin_text()}"
            )
        if (active := self.state.active) is not None:
            return (
                f"{name}: provisioned as {active.identifier.hex()[:8]} "
                f"(epoch {active.epoch}; {self._window_text()})"
            )
        return f"{name}: waiting for a commissioner ({self._window_text()})"

    def _checkin_text(self) -> str:
        if self.checkin_service is None:
            return "not checking in (no cloud URL)"
        return "checking in with the cloud"

    def _next_text(self) -> str:
        """What the device does now, after a session ended without provisioning it."""
        if (pending := self.state.pending) is not None:
            return (
                f"still provisioned as {pending.identity.identifier.hex()[:8]}, "
                f"{self._checkin_text()}"
            )
        if (active := self.state.active) is not None:
            return f"still provisioned as {active.identifier.hex()[:8]} ({self._window_text()})"
        return f"waiting for a commissioner ({self._window_text()})"

    def _provisioned_text(self) -> str:
        pending = self.state.pending
        assert pending is not None  # stored before RESULT 0 (§5.3 step 5)
        return (
            f"Provisioned: joined Wi-Fi {_shown(pending.wifi.ssid)} as "
            f"{pending.identity.identifier.hex()[:8]} (epoch {pending.identity.epoch}); "
            f"{self._checkin_text()}"
        )

    def _session_end_text(self, session: DeviceSession, event: SessionEnded) -> str | None:
        """One line on a session that ended without provisioning the device (None if it did)."""
        if session is self._provisioned_by:
            return None  # the "Provisioned: …" line told it all
        code = _code(event.status)
        reason = printable(event.reason, 80)
        if event.status in (Status.WINDOW_CLOSED, Status.BUSY) and not event.sent_m2:
            why = f" ({reason})"
            if event.status is Status.WINDOW_CLOSED:
                n = self.gate.failures
                # The window itself is open during a back-off; a closed one is said next.
                why = f" (back-off {backoff_seconds(n):g} s after {_sessions(n)})"
                if not self.gate.window_open:
                    why = ""
            return f"Refused a commissioner: {code}{why}; {self._next_text()}"
        if event.status is Status.OK:
            return (
                f"A commissioner left without provisioning this device ({reason}); "
                f"{self._next_text()}"
            )
        backoff = ""
        if event.sent_m2 and not event.accepted_m3:  # counts for §5.6
            n = self.gate.failures
            backoff = f"; back-off {backoff_seconds(n):g} s after {_sessions(n)}"
        return (
            f"Connection from a commissioner failed: {code} ({reason}){backoff}; "
            f"{self._next_text()}"
        )

    async def _pump_peripheral(self) -> None:
        while True:
            try:
                event = await self.peripheral.next_event()
            except LinkError as exc:
                if exc.code != "bluetooth_lost":
                    raise
                log.info("%s", exc.message)
                self._bluetooth_lost = exc
                self._inbox.put_nowait(_Command("bluetooth_lost"))
                return
            self._inbox.put_nowait(event)

    async def _next_item(self) -> _Item | None:
        wake: list[float] = []
        if self.session is not None and (d := self.session.next_deadline()) is not None:
            wake.append(d - self.clock())
        if self.gate.window_open:
            wake.append(self.gate.window_until - self.gate.clock())
        timeout = max(0.0, min(wake)) if wake else None
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return None

    async def _tick(self) -> None:
        if self.session is not None:
            await self._apply(self.session, self.session.handle_timer())
        await self._refresh_status()

    async def _handle(self, item: _Item) -> None:
        session = self.session
        if isinstance(item, LinkUp):
            if session is not None and not session.closed:
                return  # one commissioner at a time; the adapter refuses others
            self.session = DeviceSession(
                self.factory,
                reset_ctr=self.state.reset_ctr,
                active_epoch=self.state.active.epoch if self.state.active else 0,
                fw=self.fw,
                rng=self.rng,
                clock=self.clock,
                max_fragment=self.peripheral.max_fragment,
            )
            await self._refresh_status()
        elif isinstance(item, FragmentIn):
            if session is None or session.closed:
                return
            session.max_fragment = max(session.max_fragment, self.peripheral.max_fragment)
            await self._apply(session, session.receive_fragment(item.data))
        elif isinstance(item, LinkDown):
            if session is not None and not session.closed:
                await self._apply(session, session.connection_lost(), disconnect=False)
            self.session = None
        elif isinstance(item, _UserAnswer | _JoinOutcome | _JoinStage | _Stored):
            if item.session is not session or session.closed:
                return  # an answer for a session that already ended
            if isinstance(item, _UserAnswer):
                await self._apply(session, session.user_decision(item.accepted))
            elif isinstance(item, _JoinStage):
                await self._apply(session, session.join_progress(item.stage))
            elif isinstance(item, _JoinOutcome):
                if item.status is Status.OK:
                    await self._apply(session, session.joined())
                else:
                    await self._apply(session, session.join_failed(item.status, item.detail))
                    detail = printable(item.detail or item.status.describe, 80)
                    await self.user.show(
                        f"Could not join Wi-Fi {_shown(item.ssid)}: {_code(item.status)} "
                        f"({detail}); nothing stored, waiting for the commissioner to send "
                        "other credentials or leave"
                    )
            else:
                await self._apply(session, session.stored())
        elif isinstance(item, _Command):
            await self._command(item.name, item.detail)

    async def _command(self, name: str, detail: str = "") -> None:
        if name == "tick":
            await self._tick()
        elif name == "button":
            self.gate.button_pressed()
            await self._save()
            await self.user.show("Button pressed: pairing window open for 10 minutes")
        elif name == "reset":
            await self._factory_reset()
        elif name == "checked_in" and self.state.active is not None:
            active = self.state.active
            after = f" {detail}" if detail else ""
            await self.user.show(
                f"Checked in with the cloud{after}: onboarded as {active.identifier.hex()[:8]}"
                f" (epoch {active.epoch})"
            )
        elif name == "checkin_failing" and self.state.pending is not None:
            await self.user.show(
                f"Could not check in with the cloud ({detail}); retrying in the background "
                "until it answers"
            )
        elif name == "checkin_refused":
            await self.user.show("The cloud refused the check-in; keeping the previous identity")

    async def _factory_reset(self) -> None:
        cut = ""
        if self.session is not None and not self.session.closed:
            # The reset's own line tells of the session: not "failed …; still provisioned".
            self._cut_by_reset = self.session
            cut = "the commissioner was disconnected; "
            await self._apply(self.session, self.session.connection_lost())
        if self._checkin_task is not None:
            self._checkin_task.cancel()
        self.state = DeviceState(
            reset_ctr=min(self.state.reset_ctr + 1, U32_MAX), dev_id=self.state.dev_id
        )
        self.gate.factory_reset()
        await self._save()
        await self.user.show(f"Factory reset: {cut}identity and Wi-Fi erased, pairing window open")

    # ---- session events -------------------------------------------------------------

    async def _flush(self, session: DeviceSession) -> None:
        for fragment in session.data_to_send():
            await self.peripheral.notify(fragment)

    async def _apply(
        self, session: DeviceSession, events: list[DeviceEvent], *, disconnect: bool = True
    ) -> None:
        await self._flush(session)
        for event in events:
            if isinstance(event, HelloReceived):
                refusal = self.gate.admit()
                follow = session.admit() if refusal is None else session.refuse(refusal)
                await self._flush(session)
                await self._apply(session, follow, disconnect=disconnect)
            elif isinstance(event, Authenticated):
                log.info("session secured with a commissioner")
            elif isinstance(event, ScanRequested):
                await self._apply(session, session.scan_results(self.wifi.scan()))
            elif isinstance(event, ConfirmationRequested):
                request = ConfirmRequest(
                    event.ssid.decode("utf-8", "replace"),
                    event.sas,
                    max(0.0, event.deadline - self.clock()),
                )
                self._spawn(self._ask_user(session, request))
            elif isinstance(event, JoinRequested):
                self._spawn(self._join(session, event))
            elif isinstance(event, StoreRequested):
                self._spawn(self._store_pending(session, event))
            elif isinstance(event, Provisioned):
                self.gate.close_window()
                self._provisioned_by = session
                self._start_checkin()
                self._spawn_save()
                await self.user.show(self._provisioned_text())
            elif isinstance(event, SessionEnded):
                await self._session_ended(session, event, disconnect)

    async def _session_ended(
        self, session: DeviceSession, event: SessionEnded, disconnect: bool
    ) -> None:
        self.gate.session_ended(sent_m2=event.sent_m2, accepted_m3=event.accepted_m3)
        self._spawn_save()
        log.info("session ended: %s (%s)", event.status.name, event.reason)
        if self.session is session:
            self.session = None
        if disconnect:
            with contextlib.suppress(Exception):
                await self.peripheral.disconnect()
        line = self._session_end_text(session, event)
        if session is self._provisioned_by:
            self._provisioned_by = None  # don't keep an ended session (its keys) alive
        if session is self._cut_by_reset:
            self._cut_by_reset = None
            line = None
        if line is not None:
            await self.user.show(line)

    def _spawn_save(self) -> None:
        """Save in the background; stopping the device waits for it (never cancels it)."""
        task: asyncio.Task[None] = asyncio.ensure_future(self._save())
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_user(self, session: DeviceSession, request: ConfirmRequest) -> None:
        try:
            accepted = await asyncio.wait_for(self.user.confirm(request), request.deadline_s)
        except TimeoutError:
            return  # the session's own 60 s timer answers RESULT 1
        self._inbox.put_nowait(_UserAnswer(session, accepted))

    async def _join(self, session: DeviceSession, event: JoinRequested) -> None:
        async def progress(stage: int) -> None:
            self._inbox.put_nowait(_JoinStage(session, stage))

        ssid = event.credentials.ssid
        try:
            await self.wifi.join(event.credentials, progress)
        except JoinFailed as exc:
            self._inbox.put_nowait(_JoinOutcome(session, exc.status, exc.detail, ssid))
            return
        self._inbox.put_nowait(_JoinOutcome(session, Status.OK, ssid=ssid))

    async def _store_pending(self, session: DeviceSession, event: StoreRequested) -> None:
        record = event.record
        creds = record.credentials
        pending = PendingBind(
            wifi=StoredWifi(creds.ssid, int(creds.security), creds.passphrase),
            identity=StoredIdentity(
                record.identity.identifier, record.identity.k_dev, record.identity.epoch
            ),
            ack=record.ack,
            th=record.th,
            stored_at=time.time(),
        )
        self.state = self.state.with_(pending=pending)
        await self._save()  # §5.3 step 5: one atomic write
        self._inbox.put_nowait(_Stored(session))

    # ---- check-in (§6.4) --------------------------------------------------------------

    def _start_checkin(self) -> None:
        if self.checkin_service is None or self.state.pending is None:
            return
        if self._checkin_task is not None and not self._checkin_task.done():
            self._checkin_task.cancel()
        self._checkin_task = asyncio.ensure_future(self._checkin_loop())

    async def _checkin_loop(self) -> None:
        assert self.checkin_service is not None
        delay, cap = self.checkin_backoff
        failures = 0  # the user hears of the first and of the success after, not of each
        while (pending := self.state.pending) is not None:
            try:
                await self.checkin_service.checkin(
                    pending.identity.identifier, pending.identity.k_dev, pending.ack
                )
            except CheckinRefused as exc:
                log.warning("check-in refused: %s", exc)
                self.state = self.state.with_(pending=None)
                await self._save()
                self._inbox.put_nowait(_Command("checkin_refused"))
                return
            except Exception as exc:
                failures += 1
                if failures == 1:
                    self._inbox.put_nowait(_Command("checkin_failing", _checkin_problem(exc)))
                jitter = int.from_bytes(self.rng(2), "big") / 65535  # full jitter
                wait = delay * (0.5 + jitter)
                log.info("check-in failed (%s); retrying in %.1f s", type(exc).__name__, wait)
                await self.sleep(wait)
                delay = min(cap, delay * 2)
                continue
            # accepted: promote the pending identity, retire the old one
            self.state = self.state.with_(
                active=pending.identity,
                wifi=pending.wifi,
                pending=None,
                checkins=self.state.checkins + 1,
            )
            await self._save()
            self.onboarded.set()
            after = f"after {failures} failed attempt{'' if failures == 1 else 's'}"
            self._inbox.put_nowait(_Command("checked_in", after if failures else ""))
            return


# ---- text for the device's user ----------------------------------------------------------


def _checkin_problem(exc: Exception) -> str:
    """Why a check-in did not get through, for the device's user."""
    if isinstance(exc, CheckinUnavailable):
        return printable(str(exc), 80)
    return f"unexpected error {type(exc).__name__}"  # the type only: a message may hold anything


def _shown(ssid: bytes) -> str:
    """An SSID as the user sees it: quoted, control characters escaped."""
    return repr(ssid.decode("utf-8", "replace"))


def _code(status: Status) -> str:
    """``3 wifi_auth_failed``: the §4 number and its stable name."""
    return f"{int(status)} {status.name.lower()}"


def _sessions(n: int) -> str:
    return f"{n} failed session" + ("" if n == 1 else "s")
