"""Real DS1 peers wired back to back in memory, for protocol tests.

A ``DeviceSession`` and a ``CommissionerSession`` exchange fragments directly;
``LocalCloud`` performs the cloud's computations with the protocol core's
cloud-side functions (what ``cloud/`` calls), keeping one device's registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from protocol import cloudside
from protocol.commissioner_side import (
    Authenticated,
    BindStartNeeded,
    CommissionerEvent,
    CommissionerSession,
)
from protocol.device_side import DeviceEvent, DeviceSession, HelloReceived
from protocol.factory import FactoryRecord
from protocol.framing import Reassembler, fragment
from protocol.handshake import BindStartRequest
from protocol.messages import InnerMessage, decode_inner
from protocol.schedule import transcript_hash


class FakeClock:
    """An injected clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_factory(seed: int = 1, model: str = "Doorstep Lamp L1") -> FactoryRecord:
    rnd = bytes((seed,)) * 16
    return FactoryRecord(rnd, bytes((0xC8, 0x2B, 0x96, 0x1A, seed, 0x42)), os.urandom(32), model)


@dataclass
class CloudAnswer:
    ticket: bytes
    seal: bytes
    session_secret: bytes
    wrapped_identity: bytes
    identity: cloudside.Identity
    th: bytes


@dataclass
class LocalCloud:
    factory: FactoryRecord
    epoch: int = 0
    answers: list[CloudAnswer] = field(default_factory=list)

    def bind_start(self, request: BindStartRequest) -> CloudAnswer:
        cloudside.check_commitment(request.m1, request.commissioner_pub, request.commissioner_nonce)
        challenge = cloudside.parse_challenge(request.m2)
        cloudside.verify_challenge_tag(self.factory.k_init, request.m1, request.m2)
        ticket = b"ticket:" + os.urandom(8)
        th = transcript_hash(
            request.m1, request.m2, request.commissioner_pub, request.commissioner_nonce, ticket
        )
        r = os.urandom(32)
        self.epoch += 1
        identity = cloudside.Identity(os.urandom(16), os.urandom(32), self.epoch)
        seal = cloudside.build_seal(self.factory.k_init, th, challenge.n_d, r, os.urandom(12))
        w = cloudside.build_wrapped_identity(self.factory.k_init, th, identity, os.urandom(12))
        answer = CloudAnswer(ticket, seal, r, w, identity, th)
        self.answers.append(answer)
        return answer

    def complete(self, ack: bytes) -> cloudside.Identity:
        answer = self.answers[-1]
        cloudside.verify_ack(
            answer.identity.k_dev, self.factory.dev_id, answer.identity, answer.th, ack
        )
        return answer.identity


def to_device(com: CommissionerSession, dev: DeviceSession) -> list[DeviceEvent]:
    events: list[DeviceEvent] = []
    for frag in com.data_to_send():
        events += dev.receive_fragment(frag)
    return events


def to_commissioner(dev: DeviceSession, com: CommissionerSession) -> list[CommissionerEvent]:
    events: list[CommissionerEvent] = []
    for frag in dev.data_to_send():
        events += com.receive_fragment(frag)
    return events


@dataclass
class Pair:
    dev: DeviceSession
    com: CommissionerSession
    cloud: LocalCloud
    clock: FakeClock
    answer: CloudAnswer | None = None


def make_pair(
    mtu: int = 23, *, active_epoch: int = 0, cloud_epoch: int = 0, clock: FakeClock | None = None
) -> Pair:
    factory = make_factory()
    clock = clock or FakeClock()
    dev = DeviceSession(
        factory,
        reset_ctr=0,
        active_epoch=active_epoch,
        rng=os.urandom,
        clock=clock,
        max_fragment=mtu - 3,
    )
    com = CommissionerSession(rng=os.urandom, clock=clock, max_fragment=mtu - 3)
    return Pair(dev, com, LocalCloud(factory, epoch=cloud_epoch), clock)


def handshake(pair: Pair) -> tuple[str, str]:
    """Run M1..M4; return (device SAS, commissioner SAS)."""
    pair.com.start()
    events = to_device(pair.com, pair.dev)
    assert events == [HelloReceived()]
    pair.dev.admit()
    (need,) = to_commissioner(pair.dev, pair.com)
    assert isinstance(need, BindStartNeeded)
    pair.answer = pair.cloud.bind_start(need.request)
    pair.com.cloud_answer(
        ticket=pair.answer.ticket,
        seal=pair.answer.seal,
        session_secret=pair.answer.session_secret,
        wrapped_identity=pair.answer.wrapped_identity,
    )
    dev_events = to_device(pair.com, pair.dev)
    com_events = to_commissioner(pair.dev, pair.com)
    assert len(com_events) == 1 and isinstance(com_events[0], Authenticated)
    (dev_auth,) = dev_events
    return dev_auth.sas, com_events[0].sas  # type: ignore[union-attr]


def inject_inner(pair: Pair, inner: bytes) -> list[DeviceEvent]:
    """Send an inner message on the commissioner's real channel, bypassing its checks."""
    assert pair.com._result is not None
    record = pair.com._result.channel.seal(inner)
    events: list[DeviceEvent] = []
    for frag in fragment(record, pair.com.max_fragment):
        events += pair.dev.receive_fragment(frag)
    return events


def read_device_inner(pair: Pair) -> list[InnerMessage]:
    """Open what the device sent, on the commissioner's real channel."""
    assert pair.com._result is not None
    reassembler = Reassembler()
    out: list[InnerMessage] = []
    for frag in pair.dev.data_to_send():
        message = reassembler.feed(frag)
        if message is not None:
            out.append(decode_inner(pair.com._result.channel.open_message(message)))
    return out
