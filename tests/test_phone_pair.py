"""``doorstep phone pair``: argument errors, exit codes, JSON summary, and no passphrase in output.

The pairing runs against a real ``DeviceRuntime`` on the in-memory air with the
cloud's computations in-process (``tests/phone_helpers.py``); the command's
async core (``phone.cli.pair_main``) takes the central and cloud it would
otherwise build from BlueZ and ``phone.cloudlink``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

import doorstep_cli
from ble.memory import MemoryAir
from onboarding_helpers import ScriptedDeviceUser
from phone.cli import EXIT_USAGE, pair_main
from phone_helpers import DEVICE_ADDRESS, DEVICE_NAME, HOME_PASSPHRASE, memory_rig
from protocol.errors import Status


def parse(*argv: str) -> argparse.Namespace:
    return doorstep_cli.build_parser().parse_args(["phone", "pair", *argv])


@pytest.fixture
def no_saved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DOORSTEP_CLOUD_URL", raising=False)
    monkeypatch.delenv("DOORSTEP_TOKEN", raising=False)
    return tmp_path


def secret_file(tmp_path: Path, passphrase: str) -> Path:
    path = tmp_path / "wifi-passphrase"
    path.write_text(passphrase + "\n")
    return path


# ---- argument errors (exit 2, clear message) -------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--ssid", "DoorstepHome", "--passphrase-env", "X"],  # no --device
        ["--device", "Doorstep-0142", "--passphrase-env", "X"],  # no --ssid
        ["--device", "D", "--ssid", "S"],  # no passphrase source
        ["--device", "D", "--ssid", "S", "--passphrase-env", "X", "--passphrase-file", "f"],
        ["--device", "D", "--ssid", "S", "--passphrase-env", "X", "--security", "wpa2"],
    ],
)
def test_argument_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        doorstep_cli.main(["phone", "pair", *argv])
    assert exit_info.value.code == 2
    assert "usage: doorstep phone pair" in capsys.readouterr().err


async def test_missing_passphrase_file(no_saved_config: Path) -> None:
    args = parse(
        "--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-file", "/nonexistent/pw"
    )
    out, err = io.StringIO(), io.StringIO()
    assert await pair_main(args, out, err) == EXIT_USAGE
    assert err.getvalue() == (
        "doorstep phone pair: passphrase file /nonexistent/pw does not exist\n"
    )
    assert out.getvalue() == ""


async def test_missing_passphrase_env(no_saved_config: Path) -> None:
    args = parse("--device", DEVICE_NAME, "--ssid", "S", "--passphrase-env", "DOORSTEP_NO_SUCH")
    err = io.StringIO()
    assert await pair_main(args, io.StringIO(), err) == EXIT_USAGE
    assert "environment variable DOORSTEP_NO_SUCH is not set" in err.getvalue()


async def test_ssid_too_long(no_saved_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    args = parse("--device", DEVICE_NAME, "--ssid", "x" * 33, "--passphrase-env", "PW")
    err = io.StringIO()
    assert await pair_main(args, io.StringIO(), err) == EXIT_USAGE
    assert "--ssid must be 1–32 bytes" in err.getvalue()


async def test_no_cloud_configured(no_saved_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    args = parse("--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW")
    err = io.StringIO()
    assert await pair_main(args, io.StringIO(), err) == EXIT_USAGE
    assert "no cloud configured" in err.getvalue()
    assert HOME_PASSPHRASE not in err.getvalue()


# ---- pairing against a real device ----------------------------------------------------------


async def test_json_success_never_prints_the_passphrase(tmp_path: Path) -> None:
    async with memory_rig(tmp_path) as rig:
        args = parse(
            "--device", DEVICE_NAME, "--ssid", "DoorstepHome",
            "--passphrase-file", str(secret_file(tmp_path, HOME_PASSPHRASE)),
            "--yes", "--json", "--wait-checkin", "5",
        )  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        code = await pair_main(args, out, err, central=rig.central, cloud=rig.cloud)
        assert code == 0, err.getvalue()
        summary = json.loads(out.getvalue())  # stdout holds only the summary
        assert summary["status"] == 0 and summary["exit_code"] == 0
        assert summary["identifier"] == rig.runtime.state.active.identifier.hex()  # type: ignore[union-attr]
        assert summary["checked_in"] is True
        assert summary["device"]["model"] == "Doorstep Lamp L1"
        assert [s["stage"] for s in summary["stages"]] == [
            "Connect",
            "Verify with cloud",
            "Secure session",
            "Confirm code",
            "Choose network",
            "Join Wi-Fi",
            "Device check-in",
            "Done",
        ]
        lines = err.getvalue().splitlines()  # the stage lines went to stderr
        stage_lines = [
            line for line in lines if line.split("  ")[0].strip() in summary["timings_s"]
        ]
        assert len(stage_lines) == 8
        assert all(" ok " in line for line in stage_lines)
        assert "DoorstepHome" in err.getvalue()
        for text in (out.getvalue(), err.getvalue()):
            assert HOME_PASSPHRASE not in text
            assert "horse" not in text


async def test_wrong_passphrase_exits_with_wifi_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME_WIFI", "definitely wrong")
    async with memory_rig(tmp_path) as rig:
        args = parse(
            "--device", DEVICE_ADDRESS.lower(), "--ssid", "DoorstepHome",
            "--passphrase-env", "HOME_WIFI", "--yes", "--json",
        )  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        code = await pair_main(args, out, err, central=rig.central, cloud=rig.cloud)
        assert code == Status.WIFI_AUTH_FAILED == 3
        summary = json.loads(out.getvalue())
        assert summary["status_name"] == "wifi_auth_failed"
        assert summary["hint"] == "Check the passphrase and try again."
        assert "Join Wi-Fi" in err.getvalue() and "FAILED" in err.getvalue()
        for text in (out.getvalue(), err.getvalue()):
            assert "definitely wrong" not in text
        assert rig.runtime.state.pending is None and rig.runtime.state.active is None


async def test_security_comes_from_the_devices_scan(tmp_path: Path) -> None:
    # "Hendersons" is WPA3 in the device's scan; --security (default 1) is not used.
    async with memory_rig(tmp_path) as rig:
        args = parse(
            "--device", DEVICE_NAME, "--ssid", "Hendersons",
            "--passphrase-file", str(secret_file(tmp_path, "blue-teapot-7781")),
            "--yes", "--wait-checkin", "0",
        )  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        assert await pair_main(args, out, err, central=rig.central, cloud=rig.cloud) == 0
        assert "Onboarded Doorstep-0142" in out.getvalue()  # no --json: all on stdout
        assert err.getvalue() == ""
        stored = rig.runtime.state.pending or rig.runtime.state.active
        assert stored is not None


async def test_invalid_passphrase_for_the_security_is_refused_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", "short")
    async with memory_rig(tmp_path) as rig:
        args = parse(
            "--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW", "--yes"
        )
        out = io.StringIO()
        code = await pair_main(args, out, io.StringIO(), central=rig.central, cloud=rig.cloud)
        assert code == Status.INVALID_WIFI_PARAMETERS
        assert "8–63 printable ASCII" in out.getvalue()
        assert rig.user.requests == []  # nothing reached the device's user


async def test_code_asked_on_the_terminal_and_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path, user=ScriptedDeviceUser()) as rig:
        args = parse("--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW")
        out = io.StringIO()
        code = await pair_main(
            args, out, io.StringIO(), central=rig.central, cloud=rig.cloud, stdin=io.StringIO("n\n")
        )
        assert code == Status.REJECTED_BY_USER
        assert "does it show the code" in out.getvalue()
        assert "Doorstep Lamp L1" in out.getvalue()


async def test_device_not_found_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig:
        args = parse(
            "--device", "Doorstep-FFFF", "--ssid", "DoorstepHome", "--passphrase-env", "PW",
            "--yes", "--json", "--scan-timeout", "0.3",
        )  # fmt: skip
        out, err = io.StringIO(), io.StringIO()
        code = await pair_main(args, out, err, central=rig.central, cloud=rig.cloud)
        assert code == Status.TIMED_OUT
        summary = json.loads(out.getvalue())
        assert "Doorstep-FFFF" in summary["message"]


async def test_nothing_on_the_air(monkeypatch: pytest.MonkeyPatch) -> None:
    from phone.pair import find_device

    assert await find_device(MemoryAir().central(), DEVICE_NAME, 0.1) is None
