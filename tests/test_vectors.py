"""Every value of the DS1 known-answer vectors reproduced by our code (PROTOCOL.md, vectors/ds1.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import cloudside
from protocol.channel import SecureChannel
from protocol.crypto import EphemeralKey, initial_subkeys
from protocol.encoding import b64url_encode, cbor_decode_map, cbor_encode
from protocol.errors import AuthenticationError
from protocol.factory import FactoryRecord
from protocol.framing import Reassembler, fragment
from protocol.handshake import CommissionerHandshake, DeviceHandshake
from protocol.messages import decode_inner, decode_message
from protocol.schedule import (
    bind_ack,
    challenge_tag,
    commitment,
    key_schedule,
    sas_code,
    transcript_hash,
)
from protocol.signature import parse_authorization, sign_request, verify_request

HERE = Path(__file__).parent
VECTORS = json.loads((HERE / "vectors" / "ds1.json").read_text())
SHARED = HERE.parent.parent / "shared" / "vectors" / "ds1.json"
V = VECTORS["values"]
DRAWS = {d["name"]: bytes.fromhex(d["hex"]) for d in VECTORS["inputs"]["draws"]}


def x(name: str) -> bytes:
    return bytes.fromhex(V[name])


def scripted(*names: str):
    it = iter(names)

    def rng(n: int) -> bytes:
        value = DRAWS[next(it)]
        assert len(value) == n
        return value

    return rng


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not beside this clone")
def test_vector_copy_equals_shared() -> None:
    assert (HERE / "vectors" / "ds1.json").read_bytes() == SHARED.read_bytes()


def test_factory_record_and_subkeys() -> None:
    fr = FactoryRecord.from_json(VECTORS["inputs"]["factory_record"])
    assert fr.k_init.hex() == VECTORS["inputs"]["K_init"]
    assert fr.to_json() == VECTORS["inputs"]["factory_record"]
    k_hello, k_seal, k_wrap = initial_subkeys(fr.k_init)
    assert (k_hello, k_seal, k_wrap) == (x("K_hello"), x("K_seal"), x("K_wrap"))


def test_ephemeral_keys_and_shared_secret() -> None:
    c = EphemeralKey(DRAWS["eSK_C"])
    d = EphemeralKey(DRAWS["eSK_D"])
    assert c.public == x("ePK_C") and d.public == x("ePK_D")
    assert c.exchange(d.public) == d.exchange(c.public) == x("Z")


def test_commitment_tag_th_and_schedule() -> None:
    assert commitment(x("ePK_C"), x("N_C")) == x("Cmt")
    k_hello, _, _ = initial_subkeys(bytes.fromhex(VECTORS["inputs"]["K_init"]))
    assert challenge_tag(k_hello, x("M1"), x("M2_untagged")) == x("tag_D")
    assert x("M2") == x("M2_untagged") + x("tag_D")
    th = transcript_hash(x("M1"), x("M2"), x("ePK_C"), x("N_C"), x("ticket"))
    assert th == x("TH")
    keys = key_schedule(th, x("Z"), x("R"))
    for name in ("fk_C", "fk_D", "k_C2D", "k_D2C", "iv_C2D", "iv_D2C", "Fin_C", "Fin_D"):
        assert getattr(keys, name.lower()) == x(name), name
    assert sas_code(x("M1"), x("M2"), x("ePK_C"), x("N_C"), x("Z")) == V["SAS"]


def test_ticket_is_our_cbor_choice() -> None:
    decoded = VECTORS["inputs"]["ticket_decoded"]
    ticket = cbor_encode(
        {
            1: bytes.fromhex(decoded["1_attempt_id"]),
            2: decoded["2_principal"],
            3: decoded["3_issue_time"],
            4: decoded["4_validity_s"],
            5: decoded["5_flags"],
        }
    )
    assert ticket == x("ticket")
    assert cbor_decode_map(ticket)[2] == "user:1"


def test_seal_w_and_ack() -> None:
    k_init = bytes.fromhex(VECTORS["inputs"]["K_init"])
    identity = cloudside.Identity(DRAWS["identifier"], DRAWS["K_dev"], V["epoch"])
    assert cloudside.build_seal(k_init, x("TH"), x("N_D"), x("R"), DRAWS["seal_nonce"]) == x("seal")
    w = cloudside.build_wrapped_identity(k_init, x("TH"), identity, DRAWS["W_nonce"])
    assert w == x("W")
    # The cloud passes the three sub-keys derived together instead of K_init: same bytes.
    keys = cloudside.InitialKeys.derive(k_init)
    assert (keys.hello, keys.seal, keys.wrap) == (x("K_hello"), x("K_seal"), x("K_wrap"))
    assert repr(keys) == "InitialKeys(…)"
    assert cloudside.build_seal(keys, x("TH"), x("N_D"), x("R"), DRAWS["seal_nonce"]) == x("seal")
    assert cloudside.build_wrapped_identity(keys, x("TH"), identity, DRAWS["W_nonce"]) == w
    cloudside.verify_challenge_tag(keys, x("M1"), x("M2"))
    with pytest.raises(AuthenticationError):
        cloudside.verify_challenge_tag(keys, x("M1"), x("M2")[:-1] + bytes([x("M2")[-1] ^ 1]))
    opened = cloudside.open_wrapped_identity(x("K_wrap"), x("TH"), w, active_epoch=0)
    assert (opened.identifier, opened.k_dev, opened.epoch) == (x("identifier"), x("K_dev"), 1)
    ack = bind_ack(
        x("K_dev"),
        bytes.fromhex(VECTORS["inputs"]["factory_record"]["dev_id"]),
        x("identifier"),
        1,
        x("TH"),
    )
    assert ack == x("Ack")


def test_full_handshake_reproduces_messages() -> None:
    fr = FactoryRecord.from_json(VECTORS["inputs"]["factory_record"])
    com = CommissionerHandshake(scripted("eSK_C", "N_C"))
    dev = DeviceHandshake(fr, reset_ctr=0, fw="1.0.0", rng=scripted("N_D", "eSK_D"))
    assert com.hello() == x("M1")
    assert dev.receive_hello(x("M1")) == x("M2")
    request = com.receive_challenge(x("M2"))
    assert request.to_json() == VECTORS["http"]["bind_start_request"]
    m3 = com.receive_cloud_answer(x("ticket"), x("seal"), x("R"))
    assert m3 == x("M3")
    m4, dev_done = dev.receive_auth(m3)
    assert m4 == x("M4")
    com_done = com.receive_auth_ok(m4)
    assert dev_done.sas == com_done.sas == V["SAS"]


def test_records_both_directions() -> None:
    keys = key_schedule(x("TH"), x("Z"), x("R"))
    com, dev = SecureChannel.for_commissioner(keys), SecureChannel.for_device(keys)
    for rec in VECTORS["records"]:
        sender, receiver = (com, dev) if rec["direction"] == "C2D" else (dev, com)
        inner = bytes.fromhex(rec["inner"])
        record = sender.seal(inner)
        assert record.hex() == rec["record"]
        assert record[:6].hex() == rec["aad"]
        assert receiver.open_message(record) == inner
        assert decode_inner(inner).encode() == inner


def test_messages_reencode_byte_exact() -> None:
    for name in ("M1", "M2", "M3", "M4"):
        assert decode_message(x(name)).encode() == x(name)


def test_fragments_at_mtu_23() -> None:
    frags = fragment(x(VECTORS["fragments"]["message"]), VECTORS["fragments"]["att_mtu"] - 3)
    assert [f.hex() for f in frags] == VECTORS["fragments"]["hex"]
    r = Reassembler()
    assert [r.feed(f) for f in frags][-1] == x("M3")


def test_http_bodies() -> None:
    answer = VECTORS["http"]["bind_start_answer"]
    assert answer["seal"] == b64url_encode(x("seal"))
    assert answer["wrapped_identity"] == b64url_encode(x("W"))
    assert answer["session_secret"] == b64url_encode(x("R"))
    assert answer["ticket"] == b64url_encode(x("ticket"))
    assert answer["attempt"] == b64url_encode(DRAWS["attempt_id"])
    assert VECTORS["http"]["bind_complete_request"]["ack"] == b64url_encode(x("Ack"))


def test_request_signature() -> None:
    rs = VECTORS["request_signature"]
    header = sign_request(
        bytes.fromhex(rs["identifier"]),
        bytes.fromhex(rs["K_dev"]),
        rs["method"],
        rs["path"],
        rs["body"].encode(),
        int(rs["ts"]),
        bytes.fromhex(rs["nonce"]),
    )
    assert header == rs["authorization"]
    auth = parse_authorization(header)
    assert auth.sig.hex() == rs["sig"]
    from protocol.signature import mac_input

    assert (
        mac_input(rs["method"], rs["path"], auth.ts, auth.nonce, rs["body"].encode()).hex()
        == rs["mac_input"]
    )
    verify_request(
        auth,
        bytes.fromhex(rs["K_dev"]),
        rs["method"],
        rs["path"],
        rs["body"].encode(),
        now=int(rs["ts"]) + 299,
    )
