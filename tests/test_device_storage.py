"""Tests for device.storage: two checksummed slots, atomic saves, recovery (PROTOCOL.md §5.3, §5.6).

What a user would notice: a device that forgets its pending bind or its
``reset_ctr`` after a power cut, or comes back with a half-written state.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.storage import (
    FORMAT_VERSION,
    SAVE_STEPS,
    SLOT_NAMES,
    DeviceState,
    DeviceStore,
    PendingBind,
    StorageError,
    StoredIdentity,
    StoredWifi,
    _checksum,
    encode_slot,
)
from device_storage_crasher import EXIT_CODE, next_state
from protocol.pairing import PairingGate

REPO = Path(__file__).resolve().parent.parent
CRASHER = Path(__file__).resolve().parent / "device_storage_crasher.py"

K_DEV = bytes(range(100, 132))
PASSPHRASE = "correct horse battery"


def full_state(n: int = 1) -> DeviceState:
    active = StoredIdentity(bytes([n]) * 16, K_DEV, n)
    wifi = StoredWifi(b"DoorstepHome", 1, PASSPHRASE)
    newer = StoredIdentity(bytes([n + 1]) * 16, bytes(reversed(K_DEV)), n + 1)
    pending = PendingBind(
        StoredWifi("Café".encode(), 2, "sæt 🔑"), newer, b"\xaa" * 32, b"\x55" * 32, 1700000123.125
    )
    gate = PairingGate(clock=lambda: 1000.0, failures=3, backoff_until=1004.0, window_until=1600.0)
    return DeviceState(
        reset_ctr=n, active=active, wifi=wifi, pending=pending, gate=gate.to_json(), checkins=n
    )


def slot(directory: Path, index: int) -> Path:
    return directory / SLOT_NAMES[index]


def newest_slot(directory: Path) -> Path:
    generations = {
        path: json.loads(path.read_bytes())["generation"]
        for path in (slot(directory, 0), slot(directory, 1))
        if path.exists()
    }
    return max(generations, key=lambda p: generations[p])


def two_saves(directory: Path) -> tuple[DeviceStore, DeviceState, DeviceState]:
    store = DeviceStore(directory)
    older, newer = full_state(1), full_state(2)
    store.save(older)
    store.save(newer)
    return store, older, newer


# --- round trip, modes, generations -------------------------------------------------


def test_fresh_directory_loads_the_default_state(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path / "state")
    assert store.load() == DeviceState()
    assert not store.last_recovered_from_corruption


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    state = full_state(5)
    DeviceStore(tmp_path / "state").save(state)
    loaded = DeviceStore(tmp_path / "state").load()  # a new store: as after a reboot
    assert loaded == state
    assert loaded.pending is not None and loaded.pending.wifi.passphrase == "sæt 🔑"
    gate = PairingGate.from_json(loaded.gate, clock=lambda: 1000.0)
    assert (gate.failures, gate.backoff_until, gate.window_until) == (3, 1004.0, 1600.0)


def test_with_replaces_fields() -> None:
    state = full_state(1)
    assert state.with_(pending=None, reset_ctr=9) == DeviceState(
        9, state.active, state.wifi, None, state.gate, state.checkins
    )


def test_slot_format_is_versioned_json_with_checksum(tmp_path: Path) -> None:
    DeviceStore(tmp_path).save(full_state(1))
    record = json.loads(slot(tmp_path, 0).read_bytes())
    assert record["format"] == FORMAT_VERSION == 1
    assert record["generation"] == 1
    assert record["sha256"] == _checksum(1, 1, record["state"])
    assert record["state"]["active"]["identifier"] == "01" * 16


def test_directory_is_0700_and_both_slots_are_0600(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "state"
    two_saves(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for index in (0, 1):
        assert stat.S_IMODE(slot(directory, index).stat().st_mode) == 0o600


def test_an_existing_loose_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    os.chmod(directory, 0o750)  # noqa: S103 - deliberately loose, the store must tighten it
    DeviceStore(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_file_where_the_directory_should_be_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(StorageError) as info:
        DeviceStore(tmp_path / "state")
    assert info.value.code == "state_dir_unusable"


def test_saves_alternate_slots_and_the_highest_generation_wins(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path)
    for n in range(1, 12):
        store.save(full_state(n))
        assert store.load() == full_state(n)
        assert DeviceStore(tmp_path).load().reset_ctr == n
        written = slot(tmp_path, (n - 1) % 2)
        assert json.loads(written.read_bytes())["generation"] == n
    generations = sorted(json.loads(slot(tmp_path, i).read_bytes())["generation"] for i in (0, 1))
    assert generations == [10, 11]
    assert {p.name for p in tmp_path.iterdir()} == set(SLOT_NAMES)


def test_save_writes_over_a_corrupt_slot_not_the_good_one(tmp_path: Path) -> None:
    store, older, _ = two_saves(tmp_path)
    newest_slot(tmp_path).write_bytes(b"garbage")
    store.save(full_state(3))  # must not overwrite the only good slot (older)
    assert DeviceStore(tmp_path).load() == full_state(3)
    slot(tmp_path, 1).write_bytes(b"x")  # damage the just-written one
    assert DeviceStore(tmp_path).load() == older


# --- torn and corrupt slots ----------------------------------------------------------


def test_torn_newest_slot_falls_back_at_every_length(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, older, _ = two_saves(tmp_path)
    newest = newest_slot(tmp_path)
    data = newest.read_bytes()
    assert data.endswith(b"}\n")
    for length in range(len(data) - 1):  # a torn write may stop after any byte
        newest.write_bytes(data[:length])
        assert store.load() == older
        assert store.last_recovered_from_corruption
    assert newest.name in caplog.text
    newest.write_bytes(data)
    assert store.load() == full_state(2)
    assert not store.last_recovered_from_corruption


def test_a_flipped_byte_is_caught_by_the_checksum(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, older, _ = two_saves(tmp_path)
    newest = newest_slot(tmp_path)
    data = newest.read_bytes()
    position = data.index(b'"reset_ctr":2') + len(b'"reset_ctr":')
    corrupted = data[:position] + b"3" + data[position + 1 :]  # still valid JSON
    newest.write_bytes(corrupted)
    with caplog.at_level(logging.WARNING, logger="device.storage"):
        assert store.load() == older
    assert store.last_recovered_from_corruption
    assert f"{newest.name} is unusable (checksum mismatch)" in caplog.text


def test_every_single_bit_flip_gives_old_or_new(tmp_path: Path) -> None:
    store, older, newer = two_saves(tmp_path)
    newest = newest_slot(tmp_path)
    data = newest.read_bytes()
    for position in range(0, len(data), 3):
        for bit in (0x01, 0x20):
            flipped = bytearray(data)
            flipped[position] ^= bit
            newest.write_bytes(bytes(flipped))
            assert store.load() in (older, newer)


def test_both_slots_corrupt_is_a_storage_error(tmp_path: Path) -> None:
    store, _, _ = two_saves(tmp_path)
    slot(tmp_path, 0).write_bytes(b"\x00" * 40)
    slot(tmp_path, 1).write_bytes(slot(tmp_path, 1).read_bytes()[:-30])
    with pytest.raises(StorageError) as info:
        store.load()
    assert info.value.code == "state_corrupt"


def test_a_single_corrupt_slot_and_no_other_is_not_a_fresh_device(tmp_path: Path) -> None:
    # Returning DeviceState() here would roll reset_ctr back and lose the identity.
    store = DeviceStore(tmp_path)
    store.save(full_state(4))
    slot(tmp_path, 0).write_bytes(slot(tmp_path, 0).read_bytes()[:10])
    with pytest.raises(StorageError) as info:
        store.load()
    assert info.value.code == "state_corrupt"


def test_a_checksummed_slot_with_an_unknown_format_is_not_used(tmp_path: Path) -> None:
    store, older, _ = two_saves(tmp_path)
    newest = newest_slot(tmp_path)
    record = json.loads(newest.read_bytes())
    record["format"] = 2
    record["sha256"] = _checksum(2, record["generation"], record["state"])
    newest.write_text(json.dumps(record))
    assert store.load() == older


def test_save_refuses_a_state_load_would_refuse(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path)
    bad = [
        DeviceState(reset_ctr=-1),
        DeviceState(active=StoredIdentity(b"short", K_DEV, 1)),
        DeviceState(wifi=StoredWifi(b"", 1, PASSPHRASE)),
        DeviceState(gate={"failures": float("nan")}),
        DeviceState(wifi=StoredWifi("DoorstepHome", 1, PASSPHRASE)),  # type: ignore[arg-type]
    ]
    for state in bad:
        with pytest.raises(StorageError) as info:
            store.save(state)
        assert info.value.code == "state_invalid"
        assert PASSPHRASE not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- power loss at every step of a save ------------------------------------------------


def run_crasher(directory: Path, step: str, mode: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(CRASHER.parent)]))
    done = subprocess.run(
        [sys.executable, str(CRASHER), str(directory), step, mode],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.stderr == b"", done.stderr.decode(errors="replace")
    return done.returncode


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
@pytest.mark.parametrize("step", SAVE_STEPS)
def test_power_loss_at_every_step_leaves_old_or_new(tmp_path: Path, step: str, mode: str) -> None:
    directory = tmp_path / "state"
    _, _, old = two_saves(directory)
    new = next_state(old)
    returncode = run_crasher(directory, step, mode)
    assert returncode == (-9 if mode == "sigkill" else EXIT_CODE)

    store = DeviceStore(directory, owner=True)  # the reboot
    assert set(os.listdir(directory)) == set(SLOT_NAMES)  # stale temp file cleaned up
    loaded = store.load()
    assert loaded in (old, new)
    # A process kill keeps the page cache: after the rename the new state is there.
    assert loaded == (new if SAVE_STEPS.index(step) >= SAVE_STEPS.index("renamed") else old)
    assert not store.last_recovered_from_corruption

    store.save(full_state(9))  # and the device carries on
    assert DeviceStore(directory).load() == full_state(9)


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_power_loss_during_the_very_first_save(tmp_path: Path, step: str) -> None:
    directory = tmp_path / "state"
    assert run_crasher(directory, step, "sigkill") == -9
    loaded = DeviceStore(directory).load()
    assert loaded in (DeviceState(), next_state(DeviceState()))


def test_crasher_without_a_crash_saves(tmp_path: Path) -> None:
    _, _, old = two_saves(tmp_path)
    assert run_crasher(tmp_path, "none", "exit") == 0
    assert DeviceStore(tmp_path).load() == next_state(old)


def test_crash_points_are_called_in_order(tmp_path: Path) -> None:
    steps: list[str] = []
    DeviceStore(tmp_path, crash_point=steps.append).save(full_state(1))
    assert tuple(steps) == SAVE_STEPS


# --- whose state it is ---------------------------------------------------------------------

DEVICE_A, DEVICE_B = bytes.fromhex("aa" * 16), bytes.fromhex("bb" * 16)


def legacy_slot(state: DeviceState, generation: int = 1) -> bytes:
    """A slot as saved before the state kept its device's ``dev_id`` (no such key)."""
    envelope = json.loads(encode_slot(state, generation))
    del envelope["state"]["dev_id"]
    envelope["sha256"] = _checksum(FORMAT_VERSION, generation, envelope["state"])
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_a_store_for_one_device_refuses_another_devices_state(tmp_path: Path) -> None:
    """Device B's factory record on device A's state directory used to boot as A."""
    DeviceStore(tmp_path, dev_id=DEVICE_A).save(full_state(1))
    with pytest.raises(StorageError) as info:
        DeviceStore(tmp_path, owner=True, dev_id=DEVICE_B).load()
    assert info.value.code == "state_other_device"
    assert str(info.value) == (
        f"state directory {tmp_path} belongs to device {'aa' * 16}, not to this factory "
        f"record's {'bb' * 16}: pass that device's factory record, or another state directory"
    )
    for secret in (PASSPHRASE, K_DEV.hex(), "sæt 🔑"):
        assert secret not in str(info.value)
    kept = DeviceStore(tmp_path).load()  # a reader (device show) still reads it
    assert kept == full_state(1).with_(dev_id=DEVICE_A)
    assert DeviceStore(tmp_path, dev_id=DEVICE_A).load() == kept


def test_a_state_saved_before_dev_id_was_kept_is_read_and_then_adopted(tmp_path: Path) -> None:
    slot(tmp_path, 0).write_bytes(legacy_slot(full_state(1)))
    store = DeviceStore(tmp_path, owner=True, dev_id=DEVICE_B)
    state = store.load()
    assert state == full_state(1)  # every field as it was, and no dev_id
    assert state.dev_id is None
    store.save(state)  # the device's next save makes the state its own
    assert DeviceStore(tmp_path).load() == full_state(1).with_(dev_id=DEVICE_B)
    with pytest.raises(StorageError):
        DeviceStore(tmp_path, dev_id=DEVICE_A).load()


def test_a_store_without_a_dev_id_keeps_the_states_own(tmp_path: Path) -> None:
    """Readers and the hub's store (no dev_id given) write a state as it is."""
    DeviceStore(tmp_path).save(full_state(1).with_(dev_id=DEVICE_A))
    assert DeviceStore(tmp_path).load().dev_id == DEVICE_A
    DeviceStore(tmp_path).save(full_state(2))
    assert DeviceStore(tmp_path).load().dev_id is None


# --- secrets -----------------------------------------------------------------------------


def test_secrets_stay_out_of_repr_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = full_state(1)
    assert state.pending is not None
    secrets = [
        PASSPHRASE,
        "sæt 🔑",
        K_DEV.hex(),
        repr(K_DEV),
        state.pending.identity.k_dev.hex(),
        repr(state.pending.identity.k_dev),
    ]
    text = repr(state) + str(state)
    assert "DoorstepHome" in text  # the ssid is not a secret
    with caplog.at_level(logging.DEBUG):
        store, _, _ = two_saves(tmp_path)
        newest_slot(tmp_path).write_bytes(b"{" + b"x" * 100)
        store.load()
        for index in (0, 1):
            slot(tmp_path, index).write_bytes(b'{"format": 1, "state": "' + PASSPHRASE.encode())
        with pytest.raises(StorageError) as info:
            store.load()
    text += caplog.text + str(info.value)
    for secret in secrets:
        assert secret not in text


# --- hostile slot contents -----------------------------------------------------------


def _json_values() -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text()
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def slot_bytes(draw: st.DrawFn) -> bytes:
    """Raw junk, a damaged real slot, or a well-checksummed envelope around junk."""
    kind = draw(st.sampled_from(["raw", "damaged", "envelope", "field"]))
    real = encode_slot(full_state(3), 3)
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "damaged":
        data = bytearray(real)
        for _ in range(draw(st.integers(1, 4))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])
    generation = draw(st.integers(-2, 2**64) | st.sampled_from([True, 1.5, "7"]))
    if kind == "envelope":
        state = draw(_json_values())
    else:  # a real state with one field replaced, correctly checksummed
        state = json.loads(real)["state"]
        target = state
        path = draw(st.sampled_from(["reset_ctr", "active", "wifi", "pending", "gate", "checkins"]))
        if isinstance(state[path], dict) and draw(st.booleans()):
            target = state[path]
            path = draw(st.sampled_from(sorted(target)))
        target[path] = draw(_json_values())
    envelope = {
        "format": 1,
        "generation": generation,
        "state": state,
        "sha256": _checksum(1, generation, state),
    }
    return json.dumps(envelope).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=slot_bytes(), second=slot_bytes() | st.none())
def test_arbitrary_slot_bytes_give_a_valid_state_or_storage_error(
    first: bytes, second: bytes | None
) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        store = DeviceStore(directory)
        good = full_state(1)
        if second is None:
            store.save(good)  # slot a holds a good generation-1 state
            slot(directory, 1).write_bytes(first)
        else:
            slot(directory, 0).write_bytes(first)
            slot(directory, 1).write_bytes(second)
        try:
            loaded = store.load()
        except StorageError as exc:
            assert second is not None and exc.code == "state_corrupt"
            return
        assert isinstance(loaded, DeviceState)
        if second is None and store.last_recovered_from_corruption:
            assert loaded == good
        # Whatever load() returns can be saved and loaded again unchanged.
        store.save(loaded)
        assert DeviceStore(directory).load() == loaded
