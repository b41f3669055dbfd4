"""Full in-memory DS1 sessions, device ↔ commissioner with the cloud-side functions between.

PROTOCOL.md §5.1–§5.6: handshake, PROVISION → RESULT with Ack, a failed join
followed by a retry in the same session, user rejection, epoch rollback,
timers and the M3 back-off, on real peers with an injected clock.
"""

from __future__ import annotations

import os

import pytest

from ds1_pair import (
    FakeClock,
    handshake,
    inject_inner,
    make_factory,
    make_pair,
    read_device_inner,
    to_commissioner,
    to_device,
)
from protocol.commissioner_side import (
    BindStartNeeded,
    CommissionerSessionState,
    ProgressReported,
    ProvisionFailed,
    ProvisionSucceeded,
    ScanResultsReceived,
)
from protocol.commissioner_side import SessionEnded as ComEnded
from protocol.device_side import (
    ConfirmationRequested,
    DeviceSession,
    DeviceSessionState,
    HelloReceived,
    JoinRequested,
    Provisioned,
    ScanRequested,
    SessionEnded,
    StoreRequested,
)
from protocol.errors import AuthenticationError, Status, UnsupportedSecurity, WifiParameterError
from protocol.framing import Reassembler, fragment
from protocol.messages import Error, Hello, Network, Progress, Provision, Result, decode_message
from protocol.pairing import PairingGate, backoff_seconds

SSID = b"DoorstepHome"
PASS = "correct horse battery"


def provision(pair, ssid=SSID, passphrase=PASS, security=1):
    pair.com.provision(ssid, passphrase, security)
    return to_device(pair.com, pair.dev)


@pytest.mark.parametrize("mtu", [23, 247])
def test_happy_path_provision_result_with_ack(mtu: int) -> None:
    pair = make_pair(mtu)
    dev_sas, com_sas = handshake(pair)
    assert dev_sas == com_sas and len(dev_sas) == 6 and dev_sas.isdigit()
    # scan
    pair.com.scan()
    assert to_device(pair.com, pair.dev) == [ScanRequested()]
    nets = [Network(b"DoorstepHome", -40, 1, 6), Network(b"Neighbour", -80, 3, 11)]
    pair.dev.scan_results(nets)
    (res,) = to_commissioner(pair.dev, pair.com)
    assert isinstance(res, ScanResultsReceived) and list(res.networks) == nets
    # provision: user asked with the SAS and SSID
    (confirm,) = provision(pair)
    assert isinstance(confirm, ConfirmationRequested)
    assert confirm.sas == com_sas and confirm.ssid == SSID
    assert to_commissioner(pair.dev, pair.com) == [ProgressReported(1, "awaiting user")]
    (join,) = pair.dev.user_decision(True)
    assert isinstance(join, JoinRequested) and join.credentials.passphrase == PASS
    pair.dev.join_progress(3)
    (store,) = pair.dev.joined()
    assert isinstance(store, StoreRequested)
    assert store.record.identity == pair.answer.identity
    (done,) = pair.dev.stored()
    assert done == Provisioned(pair.answer.identity.identifier)
    events = to_commissioner(pair.dev, pair.com)
    assert [type(e) for e in events] == [ProgressReported, ProgressReported, ProvisionSucceeded]
    assert [e.stage for e in events[:2]] == [2, 3]
    ack = events[-1].ack
    assert pair.cloud.complete(ack) == pair.answer.identity
    # after RESULT 0 only CLOSE is accepted
    pair.com.close(Status.OK)
    (end,) = to_device(pair.com, pair.dev)
    assert isinstance(end, SessionEnded) and end.status is Status.OK and end.accepted_m3
    assert pair.dev.state is DeviceSessionState.CLOSED


def test_fragment_sizes_follow_mtu() -> None:
    pair = make_pair(23)
    pair.com.start()
    frags = pair.com.data_to_send()
    assert all(len(f) <= 20 for f in frags)
    pair247 = make_pair(247)
    pair247.com.start()
    assert len(pair247.com.data_to_send()) == 1


def test_failed_join_then_retry_in_same_session() -> None:
    pair = make_pair()
    handshake(pair)
    provision(pair, passphrase="wrong passphrase")
    pair.dev.user_decision(True)
    pair.dev.join_failed(Status.WIFI_AUTH_FAILED, "wrong passphrase")
    events = to_commissioner(pair.dev, pair.com)
    assert events[-1] == ProvisionFailed(Status.WIFI_AUTH_FAILED, "wrong passphrase")
    assert pair.com.state is CommissionerSessionState.READY
    assert pair.dev.state is DeviceSessionState.SECURE
    # same SSID: the device does not ask its user again (§5.3 step 4)
    (join,) = provision(pair)
    assert isinstance(join, JoinRequested)
    pair.dev.joined()
    pair.dev.stored()
    events = to_commissioner(pair.dev, pair.com)
    assert isinstance(events[-1], ProvisionSucceeded)
    assert pair.cloud.complete(events[-1].ack).epoch == 1


def test_retry_with_different_ssid_asks_user_again() -> None:
    pair = make_pair()
    handshake(pair)
    provision(pair)
    pair.dev.user_decision(True)
    pair.dev.join_failed(Status.NETWORK_NOT_FOUND)
    to_commissioner(pair.dev, pair.com)
    (again,) = provision(pair, ssid=b"OtherNet")
    assert isinstance(again, ConfirmationRequested) and again.ssid == b"OtherNet"


def test_user_rejects_on_device() -> None:
    pair = make_pair()
    handshake(pair)
    provision(pair)
    (end,) = pair.dev.user_decision(False)
    assert isinstance(end, SessionEnded) and end.status is Status.REJECTED_BY_USER
    events = to_commissioner(pair.dev, pair.com)
    assert events[-1] == ComEnded(Status.REJECTED_BY_USER, "rejected by user", by_device=True)


def test_user_silent_for_60s_is_result_1() -> None:
    pair = make_pair()
    handshake(pair)
    provision(pair)
    pair.clock.advance(59.9)
    assert pair.dev.handle_timer() == []
    pair.clock.advance(0.2)
    (end,) = pair.dev.handle_timer()
    assert end.status is Status.REJECTED_BY_USER
    assert to_commissioner(pair.dev, pair.com)[-1].status is Status.REJECTED_BY_USER


def test_commissioner_rejects_code() -> None:
    pair = make_pair()
    handshake(pair)
    pair.com.close(Status.REJECTED_BY_USER)
    (end,) = to_device(pair.com, pair.dev)
    assert isinstance(end, SessionEnded) and end.status is Status.REJECTED_BY_USER
    assert end.accepted_m3  # the M3 was fine: no back-off for a user's no


def test_epoch_rollback_is_result_8() -> None:
    pair = make_pair(active_epoch=3, cloud_epoch=1)  # cloud issues epoch 2 ≤ 3
    handshake(pair)
    (end,) = provision(pair)
    assert isinstance(end, SessionEnded) and end.status is Status.INVALID_IDENTITY
    events = to_commissioner(pair.dev, pair.com)
    assert isinstance(events[-1], ComEnded) and events[-1].status is Status.INVALID_IDENTITY


@pytest.mark.parametrize(
    ("ssid", "security", "passphrase", "status"),
    [
        (b"", 1, PASS, Status.INVALID_WIFI_PARAMETERS),
        (b"x" * 33, 1, PASS, Status.INVALID_WIFI_PARAMETERS),
        (SSID, 9, PASS, Status.UNSUPPORTED_SECURITY),
        (SSID, 1, "short", Status.INVALID_WIFI_PARAMETERS),
        (SSID, 0, "not empty", Status.INVALID_WIFI_PARAMETERS),
        (SSID, 2, "", Status.INVALID_WIFI_PARAMETERS),
    ],
)
def test_bad_wifi_parameters_keep_session_open(ssid, security, passphrase, status) -> None:
    pair = make_pair()
    handshake(pair)
    # the commissioner validates before sending and sends nothing …
    with pytest.raises((WifiParameterError, UnsupportedSecurity)) as info:
        pair.com.provision(ssid, passphrase, security)
    assert info.value.status is status
    assert pair.com.data_to_send() == []
    # … and a device sent such a PROVISION anyway answers RESULT and stays open
    w = pair.answer.wrapped_identity
    assert inject_inner(pair, Provision(ssid, passphrase, security, w).encode()) == []
    (result,) = read_device_inner(pair)
    assert isinstance(result, Result) and result.status == status and result.ack is None
    assert pair.dev.state is DeviceSessionState.SECURE


def test_m3_timeout_sends_error_13_and_counts_for_backoff() -> None:
    pair = make_pair()
    pair.com.start()
    to_device(pair.com, pair.dev)
    pair.dev.admit()
    to_commissioner(pair.dev, pair.com)
    pair.clock.advance(120.1)
    (end,) = pair.dev.handle_timer()
    assert end.status is Status.TIMED_OUT and end.sent_m2 and not end.accepted_m3
    (ended,) = to_commissioner(pair.dev, pair.com)
    assert ended == ComEnded(Status.TIMED_OUT, "timed out", by_device=True)


def test_bad_m3_is_error_12() -> None:
    pair = make_pair()
    pair.com.start()
    to_device(pair.com, pair.dev)
    pair.dev.admit()
    (need,) = to_commissioner(pair.dev, pair.com)
    answer = pair.cloud.bind_start(need.request)
    bad_seal = bytes([answer.seal[0] ^ 1]) + answer.seal[1:]
    pair.com.cloud_answer(
        ticket=answer.ticket,
        seal=bad_seal,
        session_secret=answer.session_secret,
        wrapped_identity=answer.wrapped_identity,
    )
    (end,) = to_device(pair.com, pair.dev)
    assert end.status is Status.AUTHENTICATION_FAILED
    (ended,) = to_commissioner(pair.dev, pair.com)
    assert ended.status is Status.AUTHENTICATION_FAILED and ended.by_device


def test_replayed_m3_from_earlier_session_is_refused() -> None:
    first = make_pair()
    first.com.start()
    to_device(first.com, first.dev)
    first.dev.admit()
    (need,) = to_commissioner(first.dev, first.com)
    answer = first.cloud.bind_start(need.request)
    first.com.cloud_answer(
        ticket=answer.ticket,
        seal=answer.seal,
        session_secret=answer.session_secret,
        wrapped_identity=answer.wrapped_identity,
    )
    recorded_m3 = first.com.data_to_send()  # an attacker records M3 off the air
    # a later session on the same device: the old M3 is for another N_D and M1
    dev = DeviceSession(
        first.cloud.factory, reset_ctr=0, active_epoch=0, rng=os.urandom, clock=first.clock
    )
    for frag in fragment(Hello(os.urandom(32)).encode(), 20):
        dev.receive_fragment(frag)
    dev.admit()
    dev.data_to_send()
    events = []
    for frag in recorded_m3:
        events += dev.receive_fragment(frag)
    (end,) = events
    assert isinstance(end, SessionEnded) and end.status is Status.AUTHENTICATION_FAILED
    (error,) = [decode_message(m) for m in reassemble(dev.data_to_send())]
    assert error == Error(12, "bad_commitment")


def reassemble(frags: list[bytes]) -> list[bytes]:
    r = Reassembler()
    return [m for m in (r.feed(f) for f in frags) if m is not None]


def test_record_replay_skip_and_reorder_rejected() -> None:
    for mutate in ("replay", "skip", "reorder"):
        pair = make_pair()
        handshake(pair)
        ch = pair.com._result.channel
        from protocol.framing import fragment
        from protocol.messages import Scan

        r0 = ch.seal(Scan().encode())
        r1 = ch.seal(Scan().encode())
        seq = {"replay": [r0, r0], "skip": [r1], "reorder": [r1, r0]}[mutate]
        events = []
        for rec in seq:
            for f in fragment(rec, 20):
                events += pair.dev.receive_fragment(f)
            if pair.dev.state is DeviceSessionState.SCANNING:
                pair.dev.scan_results([])
                pair.dev.data_to_send()
        assert isinstance(events[-1], SessionEnded), mutate
        assert events[-1].status is Status.AUTHENTICATION_FAILED
        assert pair.dev.data_to_send() == []  # after M4 nothing is sent (§3)


def test_session_lasts_at_most_10_minutes() -> None:
    pair = make_pair()
    handshake(pair)
    pair.clock.advance(600.1)
    (end,) = pair.dev.handle_timer()
    assert end.status is Status.TIMED_OUT
    assert to_commissioner(pair.dev, pair.com)[-1].status is Status.TIMED_OUT


def test_commissioner_waits_120s_for_result_after_progress_2() -> None:
    pair = make_pair()
    handshake(pair)
    provision(pair)
    pair.dev.user_decision(True)
    to_commissioner(pair.dev, pair.com)
    pair.clock.advance(119)
    assert pair.com.handle_timer() == []
    pair.clock.advance(2)
    (end,) = pair.com.handle_timer()
    assert isinstance(end, ComEnded) and end.status is Status.TIMED_OUT


def test_busy_and_window_closed_answers() -> None:
    pair = make_pair()
    pair.com.start()
    assert to_device(pair.com, pair.dev) == [HelloReceived()]
    (end,) = pair.dev.refuse(Status.WINDOW_CLOSED)
    assert end.status is Status.WINDOW_CLOSED and not end.sent_m2
    (ended,) = to_commissioner(pair.dev, pair.com)
    assert ended.status is Status.WINDOW_CLOSED and ended.by_device


def test_m3_backoff_with_injected_clock() -> None:
    clock = FakeClock()
    gate = PairingGate(clock)
    gate.open_window()
    assert gate.admit() is None
    expected = [1, 2, 4, 8, 16, 32, 64, 64]
    for n, wait in enumerate(expected, start=1):
        gate.session_ended(sent_m2=True, accepted_m3=False)
        assert backoff_seconds(n) == wait
        assert gate.admit() is Status.WINDOW_CLOSED
        clock.advance(wait - 0.01)
        assert gate.admit() is Status.WINDOW_CLOSED
        clock.advance(0.02)
        assert gate.admit() is None
    # n survives a power cycle
    restored = PairingGate.from_json(gate.to_json(), clock)
    restored.session_ended(sent_m2=True, accepted_m3=False)
    assert restored.failures == 9 and restored.admit() is Status.WINDOW_CLOSED
    # an accepted M3 resets n
    clock.advance(64)
    restored.session_ended(sent_m2=True, accepted_m3=True)
    assert restored.failures == 0 and restored.admit() is None
    # a session without M2 does not count
    restored.session_ended(sent_m2=False, accepted_m3=False)
    assert restored.failures == 0


def test_pairing_window_closes_after_10_minutes_and_on_result_0() -> None:
    clock = FakeClock()
    gate = PairingGate(clock)
    assert gate.admit() is Status.WINDOW_CLOSED  # never opened
    gate.button_pressed()
    clock.advance(599)
    assert gate.admit() is None
    clock.advance(2)
    assert gate.admit() is Status.WINDOW_CLOSED
    gate.button_pressed()
    gate.close_window()
    assert gate.admit() is Status.WINDOW_CLOSED


def test_low_order_public_keys_rejected() -> None:
    from protocol.crypto import EphemeralKey

    low_order = [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ]
    key = EphemeralKey(os.urandom(32))
    for point in low_order:
        with pytest.raises(AuthenticationError) as info:
            key.exchange(point)
        assert info.value.code == "low_order_key"


def test_device_m2_with_low_order_key_fails_commissioner() -> None:
    pair = make_pair()
    pair.com.start()
    to_device(pair.com, pair.dev)
    pair.dev.admit()
    (need,) = to_commissioner(pair.dev, pair.com)
    assert isinstance(need, BindStartNeeded)
    # a commissioner handed an M2 whose ePK_D is low order refuses to build M3
    from protocol.commissioner_side import CommissionerSession
    from protocol.framing import fragment
    from protocol.messages import Challenge

    ch = need.request.challenge
    bad = Challenge(**{**ch.__dict__, "epk_d": bytes(32), "tag": ch.tag}).encode()
    com = CommissionerSession(rng=os.urandom)
    com.start()
    com.data_to_send()
    for f in fragment(bad, 20):
        com.receive_fragment(f)
    with pytest.raises(AuthenticationError):
        com.cloud_answer(
            ticket=b"t", seal=bytes(76), session_secret=bytes(32), wrapped_identity=bytes(80)
        )
    assert com.closed


def test_error_message_before_m4_reason_is_clipped() -> None:
    err = Error(11, "x" * 100).encode()
    decoded = decode_message(err)
    assert isinstance(decoded, Error) and len(decoded.reason) == 64


def test_progress_unknown_stage_is_reported() -> None:
    assert Progress.decode_body(Progress(9, "later").encode()[1:]).stage == 9


def test_factory_helper_names() -> None:
    assert make_factory(5).ble_name == "Doorstep-0542"


def test_scan_pipelined_behind_m3_is_one_round_trip() -> None:
    pair = make_pair(247)
    pair.com.start()
    to_device(pair.com, pair.dev)
    pair.dev.admit()
    (need,) = to_commissioner(pair.dev, pair.com)
    answer = pair.cloud.bind_start(need.request)
    pair.answer = answer
    pair.com.cloud_answer(
        ticket=answer.ticket,
        seal=answer.seal,
        session_secret=answer.session_secret,
        wrapped_identity=answer.wrapped_identity,
    )
    pair.com.scan()  # before M4 arrives
    events = to_device(pair.com, pair.dev)  # M3 and SCAN in one write burst
    assert [type(e).__name__ for e in events] == ["Authenticated", "ScanRequested"]
    pair.dev.scan_results([Network(b"DoorstepHome", -40, 1, 6)])
    com_events = to_commissioner(pair.dev, pair.com)  # M4 and SCAN_RESULT together
    assert [type(e).__name__ for e in com_events] == ["Authenticated", "ScanResultsReceived"]
    assert pair.com.state is CommissionerSessionState.READY


def test_pipelined_scan_is_dropped_when_m3_fails() -> None:
    pair = make_pair()
    pair.com.start()
    to_device(pair.com, pair.dev)
    pair.dev.admit()
    (need,) = to_commissioner(pair.dev, pair.com)
    answer = pair.cloud.bind_start(need.request)
    pair.com.cloud_answer(
        ticket=answer.ticket + b"x",  # TH mismatch: the seal does not open
        seal=answer.seal,
        session_secret=answer.session_secret,
        wrapped_identity=answer.wrapped_identity,
    )
    pair.com.scan()
    events = to_device(pair.com, pair.dev)
    assert [type(e).__name__ for e in events] == ["SessionEnded"]
    assert events[0].status is Status.AUTHENTICATION_FAILED
