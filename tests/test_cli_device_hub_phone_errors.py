"""``doorstep device``, ``hub`` and ``phone pair`` given bad input or no Bluetooth, as a user sees it.

Each case is one line on stderr with the command's prefix, the command's exit
status, no traceback, and nothing written where it should not be. No BLE
simulation: "no Bluetooth" is a ``DBUS_SYSTEM_BUS_ADDRESS`` pointing nowhere,
the state of a machine without ``bluetoothd`` (or with ``doorstep sim`` not
exported). A missing adapter on a working bus is in ``test_device_process``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import doorstep_cli
from device.storage import DeviceState, DeviceStore, StoredIdentity, StoredWifi
from ds1_pair import make_factory
from phone.pair import not_found_report, summary

DOORSTEP = [sys.executable, "-m", "doorstep_cli"]
HINT = (
    "(is bluetoothd running? for the simulator, start `doorstep sim` and export the "
    "DBUS_SYSTEM_BUS_ADDRESS it prints)"
)
NO_BUS = "no usable Bluetooth adapter: the D-Bus system bus is not reachable"
CLOUD = "http://127.0.0.1:9"  # never reached: every case fails before pairing
PASSPHRASE = "correct horse battery"


@pytest.fixture(autouse=True)
def no_bluetooth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    address = f"unix:path={tmp_path}/no-such-bus"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no saved phone settings
    monkeypatch.delenv("DOORSTEP_CLOUD_URL", raising=False)
    monkeypatch.delenv("DOORSTEP_TOKEN", raising=False)
    monkeypatch.setenv("PW", PASSPHRASE)
    return address


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    path = tmp_path / "factory.json"
    path.write_text(make_factory(7).dumps())
    return path


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "firmware.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = doorstep_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- no Bluetooth ------------------------------------------------------------------------------


@pytest.mark.parametrize("saved", [False, True], ids=["first-start", "saved-state"])
def test_device_run_without_bluetooth(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path, saved: bool
) -> None:
    """One line, and the state as it was: it used to save a first-boot state (its pairing
    window already running) before the radio was tried, so the next start got only the
    rest of that window."""
    state = tmp_path / "state"
    if saved:
        DeviceStore(state, owner=True).save(
            DeviceState(reset_ctr=3, gate={"window_until": 0.0, "failures": 2})
        )
        before = {p.name: p.read_bytes() for p in state.iterdir()}
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(state),
        "--confirm", "accept", "--cloud", CLOUD,
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep device: {NO_BUS} {HINT}"
    if not saved:
        assert not state.exists()  # nothing left behind
        return
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    kept = DeviceStore(state).load()
    assert kept.reset_ctr == 3 and kept.gate == {"window_until": 0.0, "failures": 2}


def test_device_run_at_a_terminal_without_bluetooth_ends_without_waiting_for_input(
    factory: Path, tmp_path: Path
) -> None:
    """``--confirm prompt`` (the default) used to read stdin first: it hung until Enter."""
    controller, terminal = os.openpty()
    argv = ["device", "run", "--factory", str(factory), "--state", str(tmp_path / "s")]
    process = subprocess.Popen(
        [*DOORSTEP, *argv, "--cloud", CLOUD],
        stdin=terminal,  # a terminal nobody types on
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        code = process.wait(timeout=30)
    finally:
        process.kill()
        _out, err = process.communicate()
        os.close(controller)
        os.close(terminal)
    assert code == 2
    assert one_line(err) == f"doorstep device: {NO_BUS} {HINT}"


def test_a_device_without_a_cloud_url_says_it_will_not_check_in(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(tmp_path / "s"),
        "--confirm", "accept",
    )  # fmt: skip
    assert code == 2  # no Bluetooth here; the warning came first
    first, last = err.splitlines()
    assert first == (
        "doorstep device: warning: no cloud URL (--cloud or DOORSTEP_CLOUD_URL): this device "
        "will not check in, so its pairings stay pending in the cloud"
    )
    assert last == f"doorstep device: {NO_BUS} {HINT}"


def test_hub_run_without_bluetooth(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys, "hub", "run", "--factory", str(factory), "--state", str(tmp_path / "hub"),
        "--cloud", CLOUD, "--confirm", "accept",
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep hub: {NO_BUS} {HINT}"
    assert "not onboarded yet" in out
    assert not (tmp_path / "hub").exists()  # nothing a later start would take for its own


def test_onboarded_hub_without_bluetooth(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    """The hub's second phase (a commissioner) says so before it opens its console."""
    state = tmp_path / "hub"
    DeviceStore(state, owner=True).save(
        DeviceState(
            active=StoredIdentity(bytes(16), bytes(32), 1),
            wifi=StoredWifi(b"DoorstepHome", 1, PASSPHRASE),
        )
    )
    code, out, err = run(
        capsys, "hub", "run", "--factory", str(factory), "--state", str(state),
        "--cloud", CLOUD, "--confirm", "accept",
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep hub: {NO_BUS} {HINT}"
    assert "accepting devices" not in out
    assert not (state / "hub.db").exists()


def pair_args(*extra: str) -> list[str]:
    return [
        "phone", "pair", "--cloud", CLOUD, "--token", "dst_test_token", "--device",
        "Doorstep-0742", "--ssid", "DoorstepHome", "--passphrase-env", "PW", "--yes",
        "--scan-timeout", "1", *extra,
    ]  # fmt: skip


def test_phone_pair_without_bluetooth(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *pair_args())
    assert code == 20
    assert one_line(err) == f"doorstep phone pair: {NO_BUS} {HINT}"
    assert out == "Scanning for Doorstep-0742…\n"


def test_phone_pair_json_without_bluetooth_reports_the_failure_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, *pair_args("--json"))
    assert code == 20
    assert f"doorstep phone pair: {NO_BUS} {HINT}" in err and "Traceback" not in err
    body = json.loads(out)  # stdout holds only the summary
    assert set(body) == set(summary(not_found_report("x", 1.0), "x"))  # the usual shape
    assert body["status"] is None
    assert body["status_name"] == "bluetooth_unavailable"
    assert body["exit_code"] == 20
    assert body["message"] == NO_BUS
    assert body["hint"] == HINT[1:-1]
    assert body["query"] == "Doorstep-0742"
    assert PASSPHRASE not in out + err and "dst_test_token" not in out + err


# ---- bad input: factory record, Wi-Fi file, state directory, firmware version ----------------


@pytest.mark.parametrize("role", ["device", "hub"])
@pytest.mark.parametrize("case", ["binary factory file", "prompt without a terminal"])
def test_refused_at_start_with_no_state_made(
    capsys: pytest.CaptureFixture[str],
    binary: Path,
    factory: Path,
    tmp_path: Path,
    role: str,
    case: str,
) -> None:
    """A binary file is no factory record; and with no terminal (stdin is pytest's) nobody
    could answer a prompt: each pairing waited 60 s and failed as "rejected by the user"."""
    state = tmp_path / "state"
    record = binary if case == "binary factory file" else factory
    code, _out, err = run(
        capsys, role, "run", "--factory", str(record), "--state", str(state), "--cloud", CLOUD
    )
    assert code == 2
    if case == "binary factory file":
        assert one_line(err) == f"doorstep {role}: {binary}: factory record is not valid JSON"
    else:
        assert one_line(err).endswith(
            "(stdin is not one): pass --confirm accept or --confirm reject"
        )
    assert not state.exists()


@pytest.mark.parametrize("role", ["device", "hub"])
def test_a_missing_wifi_file_is_one_line_and_no_state_is_made(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path, role: str
) -> None:
    state, wifi = tmp_path / "state", tmp_path / "nofile.json"
    code, _out, err = run(
        capsys, role, "run", "--factory", str(factory), "--state", str(state),
        "--wifi", str(wifi), "--cloud", CLOUD,
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep {role}: {wifi}: cannot read (No such file or directory)"
    assert not state.exists()


def test_hub_state_that_is_a_file(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _out, err = run(
        capsys, "hub", "run", "--factory", str(factory), "--state", str(notes), "--cloud", CLOUD,
        "--confirm", "accept",
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep hub: {notes} is not a directory"
    assert notes.read_text() == "my notes\n"


def test_a_hub_registry_that_is_no_database_is_one_line_and_the_command_ends(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``hub devices`` (and ``hub run``, which opens it the same way once it has Bluetooth)
    printed a traceback, then never exited: the registry's connection thread stayed."""
    state = tmp_path / "hub"
    state.mkdir()
    (state / "hub.db").write_text("garbage\n")
    threads = threading.active_count()
    code, _out, err = run(capsys, "hub", "devices", "--state", str(state))
    assert code == 2
    assert one_line(err) == (
        f"doorstep hub: {state / 'hub.db'} is not a usable hub registry: file is not a database"
    )
    assert threading.active_count() == threads  # nothing left to keep the process alive
    assert (state / "hub.db").read_text() == "garbage\n"


def test_a_restarted_hub_that_only_has_to_check_in_says_so(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    """It said "not onboarded yet: advertising as a device for the phone app", and the
    next line said it was provisioned."""
    from device.storage import DeviceState, DeviceStore, PendingBind, StoredIdentity, StoredWifi

    state = tmp_path / "hub"
    pending = PendingBind(
        wifi=StoredWifi(b"Home", 1, "correct horse"),
        identity=StoredIdentity(b"\x01" * 16, b"\x02" * 32, 1),
        ack=b"\x03" * 32,
        th=b"\x04" * 32,
        stored_at=1.0,
    )
    DeviceStore(state, owner=True).save(DeviceState(pending=pending))
    code, out, _err = run(
        capsys, "hub", "run", "--factory", str(factory), "--state", str(state), "--cloud", CLOUD,
        "--confirm", "accept",
    )  # fmt: skip
    assert code == 2  # no Bluetooth here
    assert out.splitlines()[0] == (
        "[hub] onboarded, not checked in yet: checking in with the cloud before accepting devices"
    )


def test_hub_refuses_another_devices_state(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    """A hub given a device's state directory booted as that device (no dev_id check)."""
    from device.storage import DeviceState, DeviceStore

    other = make_factory(8)
    state = tmp_path / "state"
    DeviceStore(state, owner=True, dev_id=other.dev_id).save(DeviceState(reset_ctr=2))
    code, out, err = run(
        capsys, "hub", "run", "--factory", str(factory), "--state", str(state), "--cloud", CLOUD,
        "--confirm", "accept",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert one_line(err).startswith(
        f"doorstep hub: state directory {state} belongs to device {other.dev_id.hex()}, not to "
        f"this factory record's {make_factory(7).dev_id.hex()}"
    )
    assert DeviceStore(state).load().dev_id == other.dev_id  # left as it was


@pytest.mark.parametrize("command", ["run", "show"])
def test_device_state_that_is_a_file_is_not_a_directory(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path, command: str
) -> None:
    """It used to say "state directory … is unusable: File exists"."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    argv = ["--factory", str(factory), "--confirm", "accept"] if command == "run" else []
    code, out, err = run(capsys, "device", command, "--state", str(notes), *argv)
    assert code == 2
    assert one_line(err) == f"doorstep device: {notes} is not a directory"
    assert out == ""
    assert notes.read_text() == "my notes\n"


def test_device_state_under_a_file_names_the_file(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    state = notes / "device1"
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(state),
        "--confirm", "accept",
    )  # fmt: skip
    assert code == 2
    assert one_line(err) == f"doorstep device: {notes} is not a directory (in --state {state})"


@pytest.mark.parametrize(("fw", "size"), [("x" * 100, 100), ("1.0.0-é" * 3, 24)])
def test_device_fw_longer_than_m2_carries_is_refused_at_start(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path, fw: str, size: int
) -> None:
    state = tmp_path / "state"
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(state), "--fw", fw
    )
    assert code == 2
    assert one_line(err) == (
        "doorstep device: --fw must be at most 16 bytes of UTF-8 "
        f"(the firmware version sent in M2), got {size}"
    )
    assert not state.exists()


def test_device_fw_of_16_bytes_is_accepted(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(tmp_path / "s"),
        "--confirm", "accept", "--fw", "1.0.0-beta.12345", "--cloud", CLOUD,
    )  # fmt: skip
    assert code == 2  # it got as far as the radio
    assert one_line(err) == f"doorstep device: {NO_BUS} {HINT}"


CLOUD_URL_RULE = "must be an http:// or https:// URL with a host, e.g. https://cloud.example"


@pytest.mark.parametrize("url", ["notaurl", "https:///v1", "ftp://cloud.example", "http://h:99999"])
@pytest.mark.parametrize("source", ["--cloud", "$DOORSTEP_CLOUD_URL"])
def test_device_run_refuses_a_cloud_url_that_is_not_one(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    factory: Path,
    tmp_path: Path,
    url: str,
    source: str,
) -> None:
    """It was accepted, and every check-in then failed, unseen (words as ``phone pair``'s)."""
    state = tmp_path / "state"
    argv = ["device", "run", "--factory", str(factory), "--state", str(state)]
    if source == "--cloud":
        argv += ["--cloud", url]
    else:
        monkeypatch.setenv("DOORSTEP_CLOUD_URL", url)
    code, out, err = run(capsys, *argv, "--confirm", "accept")
    assert code == 2
    assert one_line(err) == f"doorstep device: {source} {CLOUD_URL_RULE}"
    assert out == ""
    assert not state.exists()


# ---- device reset ----------------------------------------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_reset_of_a_state_directory_that_does_not_exist_refuses_like_show(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, force: list[str]
) -> None:
    nodir = tmp_path / "nodir"
    code, out, err = run(capsys, "device", "reset", "--state", str(nodir), *force)
    assert code == 2
    assert one_line(err) == f"doorstep device: {nodir} does not exist"
    assert out == ""
    assert not nodir.exists()
    assert run(capsys, "device", "show", "--state", str(nodir))[2] == err  # the same words


def test_forced_reset_of_a_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _out, err = run(capsys, "device", "reset", "--state", str(notes), "--force")
    assert code == 2
    assert one_line(err) == f"doorstep device: {notes} is not a directory"
    assert notes.read_text() == "my notes\n"


def test_reset_of_an_existing_device_still_works(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    DeviceStore(state, owner=True).save(DeviceState(reset_ctr=4))
    code, out, _err = run(capsys, "device", "reset", "--state", str(state))
    assert code == 0
    assert out == "factory reset done: identity and Wi-Fi erased, reset counter 5\n"


def test_a_reset_state_stays_its_devices(
    capsys: pytest.CaptureFixture[str], factory: Path, tmp_path: Path
) -> None:
    """A reset erases what commissioners gave; another device still cannot boot from it."""
    state, other = tmp_path / "state", make_factory(8).dev_id
    DeviceStore(state, owner=True, dev_id=other).save(DeviceState(reset_ctr=4))
    assert run(capsys, "device", "reset", "--state", str(state))[0] == 0
    code, _out, err = run(
        capsys, "device", "run", "--factory", str(factory), "--state", str(state),
        "--confirm", "accept", "--cloud", CLOUD,
    )  # fmt: skip
    assert code == 2  # before the radio is tried
    assert one_line(err) == (
        f"doorstep device: state directory {state} belongs to device {other.hex()}, not to "
        f"this factory record's {make_factory(7).dev_id.hex()}: pass that device's factory "
        "record, or another state directory"
    )
    assert DeviceStore(state).load().reset_ctr == 5


# ---- phone pair options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "passphrase", "message"),
    [
        (
            ["--security", "9"],
            PASSPHRASE,
            "--security must be one of 0 (open), 1 (WPA2), 2 (WPA3), 3 (WPA2/WPA3); got 9",
        ),
        (
            ["--scan-timeout", "-1"],
            PASSPHRASE,
            "--scan-timeout must be a number of seconds above 0",
        ),
        (
            ["--scan-timeout", "nan"],
            PASSPHRASE,
            "--scan-timeout must be a number of seconds above 0",
        ),
        (
            ["--wait-checkin", "-1"],
            PASSPHRASE,
            "--wait-checkin must be a number of seconds, 0 or more",
        ),
        (
            ["--cloud", "notaurl"],
            PASSPHRASE,
            "--cloud must be an http:// or https:// URL with a host, e.g. https://cloud.example",
        ),
        (
            ["--cloud", "https:///v1"],
            PASSPHRASE,
            "--cloud must be an http:// or https:// URL with a host, e.g. https://cloud.example",
        ),
        (
            ["--security", "1"],
            "hello",
            "a WPA2 passphrase must be 8–63 printable ASCII characters or 64 hex digits "
            "(--security 1: WPA2)",
        ),
        (
            ["--security", "3"],
            "x" * 64,
            "a WPA2 passphrase must be 8–63 printable ASCII characters or 64 hex digits "
            "(--security 3: WPA2/WPA3)",
        ),
        (
            ["--security", "0"],
            PASSPHRASE,
            "an open network takes no passphrase (--security 0: open)",
        ),
    ],
)
def test_phone_pair_refuses_bad_options_before_doing_anything(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    passphrase: str,
    message: str,
) -> None:
    monkeypatch.setenv("PW", passphrase)
    code, out, err = run(capsys, *pair_args("--json", *extra))
    assert code == 2
    assert one_line(err) == f"doorstep phone pair: {message}"  # no scan started
    body = json.loads(out)  # --json: the usage error's summary, and only that
    assert (body["status"], body["status_name"], body["exit_code"]) == (None, "usage_error", 2)
    assert body["message"] == message
    assert passphrase not in out + err


@pytest.mark.parametrize("command", ["pair", "app"])
def test_phone_refuses_a_cloud_url_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The app opened and scanned with a malformed $DOORSTEP_CLOUD_URL."""
    monkeypatch.setenv("DOORSTEP_CLOUD_URL", "cloud.example")
    argv = [a for a in pair_args() if a not in ("--cloud", CLOUD)] if command == "pair" else []
    code, _out, err = run(capsys, *(argv or ["phone"]))
    assert code == 2
    who = "doorstep phone pair" if command == "pair" else "doorstep phone"
    assert one_line(err) == (
        f"{who}: $DOORSTEP_CLOUD_URL must be an http:// or https:// URL with a "
        "host, e.g. https://cloud.example"
    )


@pytest.mark.parametrize(
    ("extra", "passphrase"),
    [
        (["--security", "2"], "hello"),  # WPA3 takes 1–128 bytes
        (["--security", "0"], ""),  # an open network
        ([], "hello"),  # no --security: checked against what the device's scan says, later
        ([], "ab" * 32),  # 64 hex digits: a WPA2 PSK
        (["--cloud", "https://cloud.example:8443/base"], PASSPHRASE),
    ],
)
def test_phone_pair_accepts_good_options(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    passphrase: str,
) -> None:
    monkeypatch.setenv("PW", passphrase)
    code, _out, err = run(capsys, *pair_args(*extra))
    assert code == 20  # it got as far as the radio
    assert one_line(err) == f"doorstep phone pair: {NO_BUS} {HINT}"
