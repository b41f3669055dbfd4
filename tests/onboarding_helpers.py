"""Scripted delegates and a local bind service for flow tests (real peers, no mocks)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from device.runtime import CheckinRefused, ConfirmRequest
from ds1_pair import LocalCloud
from phone.commissioner import (
    BindStartAnswer,
    BoundDevice,
    DeviceSummary,
    NetworkChoice,
    Stage,
    StageState,
)
from protocol import cloudside
from protocol.commissioner_side import ProvisionFailed
from protocol.encoding import b64url_encode
from protocol.handshake import BindStartRequest
from protocol.messages import Network


class LocalBindService:
    """The cloud's computations in-process (protocol.cloudside), for flow tests."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.active: set[bytes] = set()
        self.completed: list[BoundDevice] = []

    async def bind_start(self, request: BindStartRequest) -> BindStartAnswer:
        a = self.cloud.bind_start(request)
        return BindStartAnswer(
            attempt=b64url_encode(a.ticket),
            ticket=a.ticket,
            seal=a.seal,
            session_secret=a.session_secret,
            wrapped_identity=a.wrapped_identity,
            dev_id=self.cloud.factory.dev_id,
            model=self.cloud.factory.model,
            expires_in=120,
        )

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice:
        identity = self.cloud.complete(ack)
        bound = BoundDevice(self.cloud.factory.dev_id, identity.identifier, identity.epoch)
        self.completed.append(bound)
        return bound

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        for _ in range(int(timeout / 0.01)):
            if identifier in self.active:
                return True
            await asyncio.sleep(0.01)
        return False

    # the device's side (§6.4): the ack proves the device holds the pending K_dev
    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> None:
        answer = next(a for a in self.cloud.answers if a.identity.identifier == identifier)
        try:
            cloudside.verify_ack(k_dev, self.cloud.factory.dev_id, answer.identity, answer.th, ack)
        except Exception as exc:
            raise CheckinRefused(str(exc)) from exc
        self.active.add(identifier)


@dataclass
class ScriptedCommissioner:
    """A commissioner's user who answers from a script."""

    accept_code: bool = True
    choices: list[NetworkChoice] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    failures: list[ProvisionFailed] = field(default_factory=list)
    seen_networks: tuple[Network, ...] = ()
    stages: list[tuple[Stage, StageState, str]] = field(default_factory=list)

    async def stage_changed(self, stage: Stage, state: StageState, detail: str) -> None:
        self.stages.append((stage, state, detail))

    async def confirm_code(self, device: DeviceSummary, sas: str) -> bool:
        self.codes.append(sas)
        return self.accept_code

    async def choose_network(
        self, networks: tuple[Network, ...], failure: ProvisionFailed | None
    ) -> NetworkChoice | None:
        self.seen_networks = networks
        if failure is not None:
            self.failures.append(failure)
        return self.choices.pop(0) if self.choices else None


@dataclass
class ScriptedDeviceUser:
    """A device's user who answers from a script (None: never answers)."""

    answer: bool | None = True
    requests: list[ConfirmRequest] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    async def confirm(self, request: ConfirmRequest) -> bool:
        self.requests.append(request)
        if self.answer is None:
            await asyncio.Event().wait()
        return bool(self.answer)

    async def show(self, message: str) -> None:
        self.messages.append(message)


class LocalFleetBindService:
    """LocalBindService for many devices at once, routed by the dev_id in M2."""

    def __init__(self) -> None:
        self.by_dev_id: dict[bytes, LocalBindService] = {}
        self._attempts: dict[str, LocalBindService] = {}

    def add(self, cloud: LocalCloud) -> None:
        self.by_dev_id[cloud.factory.dev_id] = LocalBindService(cloud)

    @property
    def completed(self) -> list[BoundDevice]:
        return [b for s in self.by_dev_id.values() for b in s.completed]

    async def bind_start(self, request: BindStartRequest) -> BindStartAnswer:
        service = self.by_dev_id[request.challenge.dev_id]
        answer = await service.bind_start(request)
        self._attempts[answer.attempt] = service
        return answer

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice:
        return await self._attempts[attempt].bind_complete(attempt, ack)

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        return any(identifier in s.active for s in self.by_dev_id.values())

    async def list_devices(self) -> list[BoundDevice]:
        """The owner's view: devices whose bind completed."""
        return self.completed

    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> None:
        for s in self.by_dev_id.values():
            if any(a.identity.identifier == identifier for a in s.cloud.answers):
                await s.checkin(identifier, k_dev, ack)
                return
        raise CheckinRefused("unknown identifier")
