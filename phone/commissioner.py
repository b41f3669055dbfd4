"""The commissioner's onboarding flow over a BLE link and the cloud (PROTOCOL.md §5, §6).

``Onboarding.run`` drives the sans-I/O ``CommissionerSession`` over a
``CentralLink`` and a ``BindService`` (the cloud), asking its
``CommissionerDelegate`` for every user decision (confirm the code, choose a
network, retry after a Wi-Fi failure). The phone app, ``doorstep phone pair``
and the hub all run this same flow; they differ only in their delegate.

It never raises for an outcome a user should see: it returns an
``OnboardingReport`` with the DS1 status, the stage it ended in, per-stage
timings, and what went over the air. Cancelling the task closes the session
cleanly (CLOSE, disconnect) so the device returns to advertising; the report
then says how far it got (``cancelled``).

While the user decides (confirm the code, choose a network) the link is still
read: a device that disconnects or ends the session meanwhile ends the flow at
once, in that stage, and the delegate's question is cancelled (its prompt or
dialog abandoned) instead of being noticed only after the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, TypeVar

from ble.errors import Disconnected, LinkError, LinkTimeout
from ble.transport import Central, CentralLink
from protocol.commissioner_side import (
    Authenticated,
    BindStartNeeded,
    CommissionerEvent,
    CommissionerSession,
    ProgressReported,
    ProvisionFailed,
    ProvisionSucceeded,
    ScanResultsReceived,
    SessionEnded,
)
from protocol.crypto import RandomSource
from protocol.display import printable
from protocol.errors import DS1Error, Status
from protocol.handshake import BindStartRequest
from protocol.messages import Network

T = TypeVar("T")


class Stage(Enum):
    CONNECT = "Connect"
    VERIFY = "Verify with cloud"
    SECURE = "Secure session"
    CONFIRM = "Confirm code"
    NETWORK = "Choose network"
    JOIN = "Join Wi-Fi"
    CHECKIN = "Device check-in"
    DONE = "Done"


class StageState(Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class BindStartAnswer:
    """The cloud's 201 to ``POST /v1/bind/start`` (§6.1)."""

    attempt: str
    ticket: bytes
    seal: bytes
    session_secret: bytes
    wrapped_identity: bytes
    dev_id: bytes
    model: str
    expires_in: int

    def __repr__(self) -> str:
        return f"BindStartAnswer(attempt={self.attempt}, model={self.model!r})"


@dataclass(frozen=True)
class BoundDevice:
    """The cloud's answer to ``POST /v1/bind/complete`` (§6.2)."""

    dev_id: bytes
    identifier: bytes
    epoch: int


class BindService(Protocol):
    """What the flow needs from the cloud (``cloud.client`` implements it)."""

    async def bind_start(self, request: BindStartRequest) -> BindStartAnswer: ...

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice: ...

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        """True once the device's check-in made its identity active."""
        ...


@dataclass(frozen=True, repr=False)
class NetworkChoice:
    ssid: bytes
    passphrase: str
    security: int

    def __repr__(self) -> str:
        return f"NetworkChoice(ssid={self.ssid!r}, security={self.security})"


@dataclass(frozen=True)
class DeviceSummary:
    """What the user is asked to confirm (§5.5).

    ``model`` and ``dev_id`` come from the cloud's answer; a device known only
    from its advertisement (a refusal before that answer) has them empty.
    """

    name: str
    address: str
    model: str
    dev_id: bytes


class CommissionerDelegate(Protocol):
    """User decisions and progress display (STYLE.md §7)."""

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None: ...

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool: ...

    async def choose_network(
        self, networks: tuple[Network, ...], failure: ProvisionFailed | None
    ) -> NetworkChoice | None:
        """The network to provision; ``failure`` is set after a failed join. None gives up."""
        ...


@dataclass
class LinkStats:
    """Application bytes on the air (fragment values) and request/response round trips."""

    bytes_to_device: int = 0
    bytes_from_device: int = 0
    writes: int = 0
    notifications: int = 0
    round_trips: int = 0


@dataclass
class OnboardingReport:
    status: Status
    stage: Stage
    message: str
    hint: str = ""
    device: DeviceSummary | None = None
    identifier: bytes | None = None
    epoch: int | None = None
    checked_in: bool = False
    timings: dict[Stage, float] = field(default_factory=dict)
    total_s: float = 0.0
    stats: LinkStats = field(default_factory=LinkStats)
    handshake_round_trips: int = 0
    #: the stable code of the error that ended it ("" when none did), e.g. ``disconnected``
    cause: str = ""
    #: ended by something that is neither the device nor DS1: the cloud unreachable or
    #: failing, or refusing this commissioner's credentials (``phone pair`` exits 20)
    outside_ds1: bool = False
    #: the cloud could not be reached or failed itself: the same try may work later
    cloud_down: bool = False
    #: the task was cancelled (the user cancelled, Ctrl-C): ``stage`` is where it stopped
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def short_id(self) -> str:
        return self.identifier.hex()[:8] if self.identifier else ""

    def to_json(self) -> dict[str, object]:
        return {
            "status": int(self.status),
            "status_name": self.status.name.lower(),
            "stage": self.stage.value,
            "message": self.message,
            "hint": self.hint,
            "device": None
            if self.device is None
            else {
                "name": self.device.name,
                "address": self.device.address,
                "model": self.device.model or None,  # None: the cloud did not say
                "dev_id": self.device.dev_id.hex() or None,
            },
            "identifier": self.identifier.hex() if self.identifier else None,
            "epoch": self.epoch,
            "checked_in": self.checked_in,
            "timings_s": {s.value: round(t, 4) for s, t in self.timings.items()},
            "total_s": round(self.total_s, 4),
            "ble": {
                "round_trips": self.stats.round_trips,
                "handshake_and_provisioning_round_trips": self.handshake_round_trips,
                "bytes_to_device": self.stats.bytes_to_device,
                "bytes_from_device": self.stats.bytes_from_device,
            },
        }


# Plain-language explanations and next actions, per status (issue 6: never leave them guessing).
HINTS: dict[Status, tuple[str, str]] = {
    Status.REJECTED_BY_USER: ("The pairing was rejected.", "Start again if this was a mistake."),
    Status.NETWORK_NOT_FOUND: (
        "The device cannot see that Wi-Fi network.",
        "Move the device closer to the router or pick another network.",
    ),
    Status.WIFI_AUTH_FAILED: (
        "The Wi-Fi passphrase was not accepted.",
        "Check the passphrase and try again.",
    ),
    Status.UNSUPPORTED_SECURITY: (
        "The device does not support that network's security.",
        "Pick a WPA2 or WPA2/WPA3 network.",
    ),
    Status.JOIN_TIMEOUT: ("Joining the network took too long.", "Try again, closer to the router."),
    Status.NO_IP_ADDRESS: (
        "The device joined but got no IP address.",
        "Check the router's DHCP settings, then try again.",
    ),
    Status.INVALID_IDENTITY: (
        "The device refused the identity from the cloud.",
        "Factory-reset the device, then pair it again.",
    ),
    Status.BUSY: ("The device is busy with another phone or hub.", "Wait a minute and try again."),
    Status.WINDOW_CLOSED: (
        "The device is not in pairing mode.",
        "Press the device's pairing button, then try again.",
    ),
    Status.PROTOCOL_ERROR: (
        "The connection to the device failed.",
        "Move closer to the device and try again.",
    ),
    Status.AUTHENTICATION_FAILED: (
        "The device could not be verified.",
        "It may not be a genuine device, or it belongs to someone else. Factory-reset it if it is yours.",
    ),
    Status.TIMED_OUT: ("The device stopped answering.", "Move closer and try again."),
    Status.INVALID_WIFI_PARAMETERS: (
        "The network name or passphrase is not valid.",
        "Check them and try again.",
    ),
}


# A link that drops (the device switched off, reset or out of range) is not a protocol fault.
LINK_LOST_HINT = "Check that the device is still on and in range, then try again."


def explain(status: Status) -> tuple[str, str]:
    return HINTS.get(status, ("Done.", "")) if status is not Status.OK else ("Onboarded.", "")


def device_ended(status: Status, reason: str) -> str:
    """The report's message when the device ended the session: the status in plain
    words, as for every other outcome, plus the device's own words when they add
    something (a refusal's reason is just the status's name)."""
    what = explain(status)[0]
    said = printable(reason).strip().rstrip(".")
    if not said or said.lower() in (status.describe.lower(), what.lower().rstrip(".")):
        return what
    return f"{what} The device said: {said}."


class _CountingLink:
    """Wraps a link to count bytes and round trips; a round trip is a write burst then a wait."""

    def __init__(self, link: CentralLink, stats: LinkStats) -> None:
        self.link = link
        self.stats = stats
        self._writing = False

    async def write(self, fragment: bytes) -> None:
        await self.link.write(fragment)
        self.stats.bytes_to_device += len(fragment)
        self.stats.writes += 1
        self._writing = True

    async def receive(self, timeout: float | None) -> bytes:
        data = await self.link.receive(timeout)
        if self._writing:
            self.stats.round_trips += 1
            self._writing = False
        self.stats.bytes_from_device += len(data)
        self.stats.notifications += 1
        return data


class CompletionUnconfirmed(DS1Error):
    """The device is provisioned, but bind/complete did not reach the cloud (§6.2).

    Not a dead end: the device completes the bind itself at its check-in (§6.4).
    """

    code = "completion_unconfirmed"

    def __init__(self, status: Status) -> None:
        super().__init__(
            "The device joined the network with its new identity, but the cloud could not "
            "be told: the device finishes the pairing itself when it reaches the cloud."
        )
        self.status = status
        self.hint = "Check your devices in a minute; pair it again only if it does not appear."
        #: DS1 succeeded; only the cloud was not reached (``phone pair`` exits 20)
        self.outside_ds1 = True


class OnboardingError(Exception):
    def __init__(self, status: Status, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code or status.name.lower()


class Onboarding:
    """One device onboarding, from connect to check-in."""

    def __init__(
        self,
        central: Central,
        cloud: BindService,
        delegate: CommissionerDelegate,
        *,
        rng: RandomSource = os.urandom,
        clock: Callable[[], float] = time.monotonic,
        scan_networks: bool = True,
        wait_checkin_s: float = 20.0,
    ) -> None:
        self.central = central
        self.cloud = cloud
        self.delegate = delegate
        self.rng = rng
        self.clock = clock
        self.scan_networks = scan_networks
        self.wait_checkin_s = wait_checkin_s
        self.report = OnboardingReport(Status.PROTOCOL_ERROR, Stage.CONNECT, "not started")
        self._stage = Stage.CONNECT
        self._stage_started = 0.0
        self._session: CommissionerSession | None = None
        self._link: _CountingLink | None = None
        self._failure_shown: tuple[Stage, str] | None = None  # told the delegate already

    # ---- stages ----------------------------------------------------------------

    async def _enter(self, stage: Stage, detail: str = "") -> None:
        now = self.clock()
        if self._stage_started and self._stage not in self.report.timings:
            self.report.timings[self._stage] = now - self._stage_started
            await self.delegate.stage_changed(self._stage, StageState.DONE, "")
        self._stage, self._stage_started = stage, now
        self.report.stage = stage
        await self.delegate.stage_changed(stage, StageState.RUNNING, detail)

    async def _fail(
        self, status: Status, message: str, hint: str = "", *, cause: str = ""
    ) -> OnboardingReport:
        if self._stage_started:
            self.report.timings.setdefault(self._stage, self.clock() - self._stage_started)
        what, status_hint = explain(status)
        self.report.status = status
        self.report.message = message or what
        self.report.hint = hint or status_hint
        self.report.cause = cause or status.name.lower()
        if self._failure_shown != (self._stage, self.report.message):
            await self.delegate.stage_changed(self._stage, StageState.FAILED, self.report.message)
        return self.report

    async def _choose_again(self, asked: float) -> None:
        """After a failed join, the user's next choice: NETWORK (since ``asked``) and JOIN
        are timed anew, and NETWORK is the current stage again."""
        self.report.timings.pop(Stage.NETWORK, None)
        self.report.timings.pop(Stage.JOIN, None)
        self._stage, self._stage_started = Stage.NETWORK, asked
        self.report.stage = Stage.NETWORK
        self._failure_shown = None
        await self.delegate.stage_changed(Stage.NETWORK, StageState.RUNNING, "")

    async def _stage_failed(self, stage: Stage, detail: str) -> None:
        """A stage failed but the flow goes on (a Wi-Fi join the user may retry)."""
        self._failure_shown = (stage, detail)
        await self.delegate.stage_changed(stage, StageState.FAILED, detail)

    # ---- link plumbing ----------------------------------------------------------

    async def _flush(self) -> None:
        assert self._session is not None and self._link is not None
        try:
            for fragment in self._session.data_to_send():
                await self._link.write(fragment)
        except LinkError:
            # A device that refuses (ERROR 9/10/12) disconnects at once, which can
            # beat our write's response: read what it already said before blaming
            # the link, so the user sees "not in pairing mode", not "link failed".
            await self._read_last_words()
            raise

    async def _read_last_words(self) -> None:
        assert self._session is not None and self._link is not None
        with contextlib.suppress(LinkError):
            while not self._session.closed:
                data = await self._link.receive(0.2)
                for event in self._session.receive_fragment(data):
                    if isinstance(event, SessionEnded) and event.by_device:
                        raise OnboardingError(
                            event.status, device_ended(event.status, event.reason)
                        )

    async def _next_events(self) -> list[CommissionerEvent]:
        """Wait for the device until the session produces events (or a timer fires)."""
        assert self._session is not None and self._link is not None
        while True:
            deadline = self._session.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                data = await self._link.receive(timeout)
            except LinkTimeout:
                events = self._session.handle_timer(self.clock() + 1e-6 if timeout == 0 else None)
                await self._flush_quietly()
                if events:
                    return events
                continue
            events = self._session.receive_fragment(data)
            if events:
                return events

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(LinkError):
            await self._flush()

    async def _expect(self, *kinds: type) -> CommissionerEvent:
        """The next event, which must be one of ``kinds`` (SessionEnded is raised).

        With no ``kinds`` it waits until the session ends or the link fails.
        """
        while True:
            for event in await self._next_events():
                if isinstance(event, SessionEnded):
                    if event.by_device:
                        raise OnboardingError(
                            event.status, device_ended(event.status, event.reason)
                        )
                    raise OnboardingError(event.status, "")
                if isinstance(event, kinds):
                    return event

    async def _ask(self, question: Awaitable[T], doing: str) -> T:
        """The user's answer to ``question``, while the link is watched.

        A device that disconnects or ends the session before the answer ends the
        flow now, in the current stage; ``question`` is then cancelled, which is
        how a delegate learns to take its prompt or dialog down.
        """
        assert self._session is not None
        answer = asyncio.ensure_future(question)
        watch = asyncio.ensure_future(self._expect())
        try:
            await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, watch):
                task.cancel()
            # Let both unwind (the delegate removes its prompt) before going on.
            await asyncio.gather(answer, watch, return_exceptions=True)
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            problem = watch.exception()
            if isinstance(problem, Disconnected):
                self._session.connection_lost()
                raise Disconnected(f"the device disconnected while {doing}") from None
            assert problem is not None
            raise problem
        return answer.result()

    # ---- the flow ----------------------------------------------------------------

    async def run(self, address: str, name: str = "") -> OnboardingReport:
        started = self.clock()
        self._stage_started = 0.0  # the first _enter starts the clock of CONNECT
        try:
            return await self._run(address, name or address)
        except OnboardingError as exc:
            return await self._fail(exc.status, str(exc), cause=exc.code)
        except DS1Error as exc:
            hint = LINK_LOST_HINT if isinstance(exc, Disconnected) else getattr(exc, "hint", "")
            self.report.outside_ds1 = bool(getattr(exc, "outside_ds1", False))
            self.report.cloud_down = bool(getattr(exc, "transient", False))
            return await self._fail(exc.status, exc.message, hint, cause=exc.code)
        except asyncio.CancelledError:
            self._cancelled()
            raise
        finally:
            self.report.total_s = self.clock() - started
            await self._shutdown()

    def _cancelled(self) -> None:
        """How far a cancelled flow got: the stage it was in, timed until now."""
        if self._stage_started:
            self.report.timings.setdefault(self._stage, self.clock() - self._stage_started)
        self.report.cancelled = True
        self.report.message = "Cancelled."
        self.report.hint = ""
        self.report.cause = "cancelled"

    async def _shutdown(self) -> None:
        """Always leave the device clean: CLOSE if the session is open, then disconnect."""
        session, link = self._session, self._link
        if link is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(self._close_link(session, link))

    async def _close_link(self, session: CommissionerSession | None, link: _CountingLink) -> None:
        if session is not None and not session.closed:
            status = Status.OK if self.report.ok else Status.REJECTED_BY_USER
            session.close(status)
            for fragment in session.data_to_send():
                await link.write(fragment)
        await link.link.disconnect()

    async def _run(self, address: str, name: str) -> OnboardingReport:
        await self._enter(Stage.CONNECT, name)
        raw = await self.central.connect(address)
        self._link = _CountingLink(raw, self.report.stats)
        self._session = session = CommissionerSession(
            rng=self.rng, clock=self.clock, max_fragment=raw.max_fragment
        )
        await self._enter(Stage.VERIFY)
        session.start()
        await self._flush()
        need = await self._expect(BindStartNeeded)
        assert isinstance(need, BindStartNeeded)
        answer = await self.cloud.bind_start(need.request)
        device = DeviceSummary(name, address, answer.model, answer.dev_id)
        self.report.device = device

        await self._enter(Stage.SECURE)
        session.cloud_answer(
            ticket=answer.ticket,
            seal=answer.seal,
            session_secret=answer.session_secret,
            wrapped_identity=answer.wrapped_identity,
        )
        if self.scan_networks:
            session.scan()  # rides along with M3
        await self._flush()
        auth = await self._expect(Authenticated)
        assert isinstance(auth, Authenticated)
        networks: tuple[Network, ...] = ()
        if self.scan_networks:
            scan = await self._expect(ScanResultsReceived)
            assert isinstance(scan, ScanResultsReceived)
            networks = scan.networks

        await self._enter(Stage.CONFIRM, auth.sas)
        confirmed = await self._ask(
            self.delegate.confirm_code(device, auth.sas), "the code was being confirmed"
        )
        if not confirmed:
            session.close(Status.REJECTED_BY_USER)
            await self._flush_quietly()
            raise OnboardingError(Status.REJECTED_BY_USER, "You rejected the code.")

        failure: ProvisionFailed | None = None
        await self._enter(Stage.NETWORK)
        while True:
            asked = self.clock()
            try:
                choice = await self._ask(
                    self.delegate.choose_network(networks, failure),
                    "the network was being chosen",
                )
            except (DS1Error, OnboardingError):
                if failure is not None:  # lost while choosing again: not the join's failure
                    await self._choose_again(asked)
                raise
            if choice is None:
                # After a failed join the session ends for that reason (the device's log
                # said "rejected_by_user" when an unattended commissioner gave up).
                session.close(Status.REJECTED_BY_USER if failure is None else failure.status)
                await self._flush_quietly()
                if failure is not None:
                    # Gave up after a failed join: the outcome is that join's, in its stage.
                    raise OnboardingError(failure.status, explain(failure.status)[0])
                raise OnboardingError(Status.REJECTED_BY_USER, "Cancelled.")
            if failure is not None:
                await self._choose_again(asked)
            await self._enter(Stage.JOIN, choice.ssid.decode("utf-8", "replace"))
            session.provision(choice.ssid, choice.passphrase, choice.security)
            await self._flush()
            outcome = await self._provision_outcome()
            if isinstance(outcome, ProvisionSucceeded):
                break
            failure = outcome
            # The failed join stays the current stage, timed, until the user tries again.
            self.report.timings[Stage.JOIN] = self.clock() - self._stage_started
            await self._stage_failed(Stage.JOIN, explain(outcome.status)[0])
        self.report.handshake_round_trips = self.report.stats.round_trips

        try:
            bound = await self.cloud.bind_complete(answer.attempt, outcome.ack)
        except DS1Error as exc:
            if not getattr(exc, "transient", False):
                raise
            # The device has joined with its identity; only the cloud was not told. The
            # device tells it itself when it checks in (§6.4 completes the bind then).
            session.close(Status.OK)
            await self._flush_quietly()
            with contextlib.suppress(LinkError):
                await raw.disconnect()
            raise CompletionUnconfirmed(exc.status) from None
        self.report.identifier, self.report.epoch = bound.identifier, bound.epoch
        session.close(Status.OK)
        await self._flush_quietly()
        with contextlib.suppress(LinkError):
            await raw.disconnect()

        await self._enter(Stage.CHECKIN)
        message = "Onboarded."
        if self.wait_checkin_s > 0:
            self.report.checked_in = await self.cloud.wait_active(
                bound.identifier, self.wait_checkin_s
            )
            if not self.report.checked_in:
                message = (
                    f"Onboarded, but the device has not checked in with the cloud within "
                    f"{self.wait_checkin_s:g} s: it stays pending until it does."
                )
                self.report.hint = (
                    "It checks in once it reaches the cloud; if it never does, check its "
                    "network and its cloud URL."
                )
                self.report.timings[Stage.CHECKIN] = self.clock() - self._stage_started
                await self.delegate.stage_changed(
                    Stage.CHECKIN, StageState.FAILED, "no check-in yet"
                )
        await self._enter(Stage.DONE)
        self.report.timings[Stage.DONE] = 0.0
        await self.delegate.stage_changed(Stage.DONE, StageState.DONE, "")
        self.report.status = Status.OK
        self.report.message = message
        return self.report

    async def _provision_outcome(self) -> ProvisionSucceeded | ProvisionFailed:
        while True:
            event = await self._expect(ProgressReported, ProvisionFailed, ProvisionSucceeded)
            if isinstance(event, ProgressReported):
                await self.delegate.stage_changed(Stage.JOIN, StageState.RUNNING, event.detail)
                continue
            assert isinstance(event, (ProvisionSucceeded, ProvisionFailed))
            return event
