"""``doorstep phone pair``: argument errors, exit codes, JSON summary, and no passphrase in output.

The pairing runs against a real ``DeviceRuntime`` on the in-memory air with the
cloud's computations in-process (``tests/phone_helpers.py``); the command's
async core (``phone.cli.pair_main``) takes the central and cloud it would
otherwise build from BlueZ and ``phone.cloudlink``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pty
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest

import doorstep_cli
from ble.memory import MemoryAir
from ble.profile import AdvState
from cloud.settings import Settings
from cloud_helpers import (
    SimDevice,
    add_user,
    bearer,
    in_process_cloud,
    new_factory_record,
    register,
    start_session,
)
from onboarding_helpers import ScriptedDeviceUser
from phone.cli import EXIT_ENVIRONMENT, EXIT_INTERRUPTED, EXIT_USAGE, pair_main
from phone.cloudlink import CloudLink
from phone.pair import not_found_report
from phone.pair import summary as summary_of
from phone_helpers import (
    DEVICE_ADDRESS,
    DEVICE_NAME,
    HOME_PASSPHRASE,
    LINK_LOST,
    STAGES,
    WatchedOutput,
    add_idle_device,
    memory_rig,
    silent_stdin,
)
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


# ---- usage errors with --json: one summary too ----------------------------------------------

CLOUD_URL_RULE = "must be an http:// or https:// URL with a host, e.g. https://cloud.example"
SAVED = "{tmp}/config/doorstep/phone.json"
WITH_CLOUD = ["--cloud", "https://cloud.example", "--token", "dst_test_token"]
PW = ["--passphrase-env", "PW"]


@pytest.mark.parametrize("device", ["", "  "])
async def test_an_empty_device_name_is_a_usage_error(
    no_saved_config: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """``--device ""`` scanned for a device without a name, for the whole scan timeout."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    args = parse("--device", device, "--ssid", "Home", *PW, *WITH_CLOUD, "--yes")
    out, err = io.StringIO(), io.StringIO()
    assert await pair_main(args, out, err) == EXIT_USAGE
    assert err.getvalue() == (
        "doorstep phone pair: --device must be a device's advertised name or BLE address\n"
    )
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("argv", "cloud_url_env", "saved", "message"),
    [
        (["--ssid", "x" * 33, *PW, *WITH_CLOUD], None, None, "--ssid must be 1–32 bytes of UTF-8"),
        (
            ["--ssid", "Home", "--passphrase-env", "DOORSTEP_NO_SUCH", *WITH_CLOUD],
            None,
            None,
            "environment variable DOORSTEP_NO_SUCH is not set",
        ),
        (
            ["--ssid", "Home", "--passphrase-file", "/nonexistent/pw", *WITH_CLOUD],
            None,
            None,
            "passphrase file /nonexistent/pw does not exist",
        ),
        (
            ["--ssid", "Home", "--passphrase-file", "{tmp}", *WITH_CLOUD],
            None,
            None,
            "cannot read passphrase file {tmp}: Is a directory",
        ),
        (
            ["--ssid", "Home", "--passphrase-file", "{tmp}/latin1", *WITH_CLOUD],
            None,
            None,
            "passphrase file {tmp}/latin1 is not UTF-8 text",
        ),
        (
            ["--ssid", "Home", *PW, "--security", "0", *WITH_CLOUD],
            None,
            None,
            "an open network takes no passphrase (--security 0: open)",
        ),
        (
            ["--ssid", "Home", *PW, "--security", "9", *WITH_CLOUD],
            None,
            None,
            "--security must be one of 0 (open), 1 (WPA2), 2 (WPA3), 3 (WPA2/WPA3); got 9",
        ),
        (
            ["--ssid", "Home", *PW, "--scan-timeout", "0", *WITH_CLOUD],
            None,
            None,
            "--scan-timeout must be a number of seconds above 0",
        ),
        (
            ["--ssid", "Home", *PW, "--cloud", "cloud.example", "--token", "dst_test_token"],
            None,
            None,
            f"--cloud {CLOUD_URL_RULE}",
        ),
        (
            ["--ssid", "Home", *PW, "--token", "dst_test_token"],
            "cloud.example",
            None,
            f"$DOORSTEP_CLOUD_URL {CLOUD_URL_RULE}",
        ),
        (
            ["--ssid", "Home", *PW, "--token", "dst_test_token"],
            None,
            '{"cloud_url": "ftp://cloud.example"}',
            f"cloud_url in {SAVED} {CLOUD_URL_RULE}",
        ),
        (["--ssid", "Home", *PW], None, "[1]", f"{SAVED} must hold a JSON object"),
        (
            ["--ssid", "Home", *PW, "--cloud", "https://cloud.example"],
            None,
            None,
            "no cloud configured: pass --cloud and --token (or set DOORSTEP_CLOUD_URL and "
            "DOORSTEP_TOKEN)",
        ),
    ],
    ids=[
        "ssid-too-long",
        "passphrase-variable-unset",
        "passphrase-file-missing",
        "passphrase-file-a-directory",
        "passphrase-file-not-utf8",
        "passphrase-unfit-for-security",
        "bad-security",
        "bad-scan-timeout",
        "bad-cloud-flag",
        "bad-cloud-url-variable",
        "bad-saved-cloud-url",
        "saved-settings-not-an-object",
        "no-token",
    ],
)
async def test_a_usage_error_with_json_is_one_summary(
    no_saved_config: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    cloud_url_env: str | None,
    saved: str | None,
    message: str,
) -> None:
    """With --json every outcome is one summary on stdout: a usage error (among them an
    unreadable passphrase file and a bad cloud URL) printed only its line on stderr, and
    a script reading stdout had nothing to parse."""
    tmp = str(no_saved_config)
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    (no_saved_config / "latin1").write_bytes("pâssphrase".encode("latin-1"))
    if cloud_url_env is not None:
        monkeypatch.setenv("DOORSTEP_CLOUD_URL", cloud_url_env)
    if saved is not None:
        path = Path(SAVED.format(tmp=tmp))
        path.parent.mkdir(parents=True)
        path.write_text(saved)
    args = parse("--device", DEVICE_NAME, *[a.format(tmp=tmp) for a in argv], "--yes", "--json")
    out, err = io.StringIO(), io.StringIO()
    assert await pair_main(args, out, err) == EXIT_USAGE
    expected = message.format(tmp=tmp)
    assert err.getvalue() == f"doorstep phone pair: {expected}\n"  # the human line stays
    summary = json.loads(out.getvalue())  # one whole summary, nothing else
    assert set(summary) == set(summary_of(not_found_report("x", 1.0), "x"))  # the usual shape
    assert summary["status"] is None
    assert summary["status_name"] == "usage_error"
    assert summary["exit_code"] == EXIT_USAGE
    assert summary["message"] == expected
    assert summary["query"] == DEVICE_NAME
    assert summary["device"] is None and summary["stages"] == [] and summary["seen"] == []
    assert HOME_PASSPHRASE not in out.getvalue() + err.getvalue()
    assert "dst_test_token" not in out.getvalue() + err.getvalue()


async def test_a_usage_error_without_json_prints_only_its_line(
    no_saved_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    args = parse("--device", DEVICE_NAME, "--ssid", "x" * 33, *PW)
    out, err = io.StringIO(), io.StringIO()
    assert await pair_main(args, out, err) == EXIT_USAGE
    assert out.getvalue() == ""
    assert err.getvalue() == "doorstep phone pair: --ssid must be 1–32 bytes of UTF-8\n"


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
        assert [s["stage"] for s in summary["stages"]] == STAGES
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
        # The failure is the join's, under its own stage, with every stage's time kept.
        assert summary["stage"] == "Join Wi-Fi"
        assert [s["stage"] for s in summary["stages"]] == STAGES[:6]
        assert list(summary["timings_s"]) == STAGES[:6]
        # The stages fit in the total, up to the rounding of each figure to 0.1 ms.
        timings = summary["timings_s"].values()
        assert sum(timings) <= summary["total_s"] + 0.00005 * (len(timings) + 1)
        failed = [line for line in err.getvalue().splitlines() if " FAILED " in line]
        assert len(failed) == 1
        assert failed[0].startswith("Join Wi-Fi ")
        assert failed[0].endswith("  The Wi-Fi passphrase was not accepted.")
        assert err.getvalue().splitlines()[-1] == (
            "Failed (3 wifi_auth_failed): The Wi-Fi passphrase was not accepted. "
            "— Check the passphrase and try again."
        )
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
    """It says so once, with the time it really spent, and lists what it saw instead."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    air = MemoryAir()
    await add_idle_device(air, "C8:2B:96:1A:07:10", "Doorstep-0710", -60, AdvState.PROVISIONED, 0)
    async with memory_rig(tmp_path, air=air) as rig:
        argv = ["--device", "Doorstep-FFFF", "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        argv += ["--yes", "--scan-timeout", "0.3"]
        out, err = io.StringIO(), io.StringIO()
        code = await pair_main(
            parse(*argv, "--json"), out, err, central=rig.central, cloud=rig.cloud
        )
        assert code == Status.TIMED_OUT
        summary = json.loads(out.getvalue())
        message = "No device 'Doorstep-FFFF' seen within 0.3 s."
        assert summary["message"] == message
        assert summary["device"] is None
        assert summary["total_s"] >= 0.3  # it scanned until the timeout, and says so
        assert summary["scan_s"] == summary["total_s"]
        assert summary["seen"] == [
            {
                "name": "Doorstep-0142",
                "address": DEVICE_ADDRESS,
                "rssi": -48,
                "state": "unprovisioned",
                "pairing_mode": True,
            },
            {
                "name": "Doorstep-0710",
                "address": "C8:2B:96:1A:07:10",
                "rssi": -60,
                "state": "provisioned",
                "pairing_mode": False,
            },
        ]
        assert err.getvalue().count(message) == 1

        out = io.StringIO()
        code = await pair_main(
            parse(*argv), out, io.StringIO(), central=rig.central, cloud=rig.cloud
        )
        assert code == Status.TIMED_OUT
        assert out.getvalue().splitlines() == [
            "Scanning for Doorstep-FFFF…",
            "Seen while scanning:",
            f"  Doorstep-0142      {DEVICE_ADDRESS}   -48 dBm  in pairing mode",
            "  Doorstep-0710      C8:2B:96:1A:07:10   -60 dBm  not in pairing mode",
            f"Failed (13 timed_out): {message} — Check that the device is powered and in "
            "pairing mode, and nearby.",
        ]


async def test_peer_names_are_shown_without_control_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name is whatever a device advertises: listed, it cannot drive the terminal."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    air = MemoryAir()
    hostile = "Doorstep-\x1b]0;owned\x07\x1b[2J"
    await add_idle_device(air, "C8:2B:96:1A:0E:01", hostile, -50, AdvState.UNPROVISIONED, 1)
    async with memory_rig(tmp_path, air=air) as rig:
        argv = ["--device", "Doorstep-FFFF", "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        out, err = io.StringIO(), io.StringIO()
        args = parse(*argv, "--yes", "--json", "--scan-timeout", "0.1")
        assert await pair_main(args, out, err, central=rig.central, cloud=rig.cloud) == 13
    assert "\x1b" not in out.getvalue() + err.getvalue()
    assert "\x07" not in out.getvalue() + err.getvalue()
    seen = json.loads(out.getvalue())["seen"]
    assert [d["name"] for d in seen] == ["Doorstep-0142", "Doorstep-?]0;owned??[2J"]
    assert "  Doorstep-?]0;owned??[2J C8:2B:96:1A:0E:01" in err.getvalue()


async def test_nothing_on_the_air(monkeypatch: pytest.MonkeyPatch) -> None:
    from phone.pair import find_device

    assert await find_device(MemoryAir().central(), DEVICE_NAME, 0.1) is None


# ---- the device goes away while the code is asked; Ctrl-C ------------------------------------


async def _at_the_code_question(
    rig: Any, out: io.StringIO, err: WatchedOutput, stdin: TextIO
) -> asyncio.Task[int]:
    """``phone pair --json`` (passphrase in $PW) started, its code question on screen."""
    argv = ["--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
    pairing = asyncio.create_task(
        pair_main(
            parse(*argv, "--json"), out, err, central=rig.central, cloud=rig.cloud, stdin=stdin
        )
    )
    await err.wait_for("[y/N] ")
    return pairing


async def test_a_device_that_goes_away_during_the_code_question_ends_it_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody answers the question: the pairing still ends, in "Confirm code", when the
    device does. It used to wait for the answer, then fail as a protocol error later."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig:
        out, err = io.StringIO(), WatchedOutput()
        with silent_stdin() as stdin:
            pairing = await _at_the_code_question(rig, out, err, stdin)
            await rig.stop()  # the device loses power while its code is on screen
            code = await pairing
    assert code == Status.PROTOCOL_ERROR == 11
    message = "the device disconnected while the code was being confirmed"
    summary = json.loads(out.getvalue())
    assert summary["status_name"] == "protocol_error"
    assert summary["stage"] == "Confirm code"
    assert summary["message"] == message
    assert summary["hint"] == LINK_LOST
    assert summary["device"]["model"] == "Doorstep Lamp L1"
    assert list(summary["timings_s"]) == STAGES[:4]
    lines = err.getvalue().splitlines()
    prompt = next(i for i, line in enumerate(lines) if "does it show the code" in line)
    assert lines[prompt].endswith("[y/N] ")  # the abandoned question's line is ended
    assert lines[prompt + 1].startswith("Confirm code ")
    assert " FAILED " in lines[prompt + 1] and lines[prompt + 1].endswith(f" s  {message}")
    assert lines[-1] == f"Failed (11 protocol_error): {message} — {LINK_LOST}"
    assert HOME_PASSPHRASE not in out.getvalue() + err.getvalue()


async def test_ctrl_c_at_the_code_question_prints_a_cancelled_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C is ``asyncio.run`` cancelling the command's task: the summary says how far it
    got, the exit status is 130, and the device is left ready to pair again."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig:
        out, err = io.StringIO(), WatchedOutput()
        with silent_stdin() as stdin:
            pairing = await _at_the_code_question(rig, out, err, stdin)
            pairing.cancel()
            code = await pairing
        assert code == EXIT_INTERRUPTED == 130
        summary = json.loads(out.getvalue())  # one whole summary, nothing else
        assert summary["status"] is None
        assert summary["status_name"] == "cancelled"
        assert summary["exit_code"] == 130
        assert summary["stage"] == "Confirm code"
        assert summary["message"] == "Interrupted during 'Confirm code'; the pairing was cancelled."
        assert summary["device"]["name"] == DEVICE_NAME
        assert list(summary["timings_s"]) == STAGES[:4]
        lines = err.getvalue().splitlines()
        assert lines[-2].endswith("[y/N] ")
        assert lines[-1] == "Interrupted during 'Confirm code'; the pairing was cancelled."

        # The session was closed: the same device pairs right away.
        out = io.StringIO()
        argv = ["--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        again = parse(*argv, "--yes", "--json", "--wait-checkin", "5")
        assert await pair_main(again, out, io.StringIO(), central=rig.central, cloud=rig.cloud) == 0
        assert json.loads(out.getvalue())["checked_in"] is True


async def test_ctrl_c_while_scanning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig:
        argv = ["--device", "Doorstep-FFFF", "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        out, err = io.StringIO(), WatchedOutput()
        pairing = asyncio.create_task(
            pair_main(
                parse(*argv, "--yes", "--json"), out, err, central=rig.central, cloud=rig.cloud
            )
        )
        await err.wait_for("Scanning for Doorstep-FFFF…\n")
        pairing.cancel()
        assert await pairing == EXIT_INTERRUPTED
    summary = json.loads(out.getvalue())
    assert summary["status_name"] == "cancelled" and summary["exit_code"] == 130
    assert (
        summary["message"] == "Interrupted while scanning for 'Doorstep-FFFF'; nothing was paired."
    )
    assert summary["device"] is None and summary["stages"] == []
    assert err.getvalue().splitlines()[-1] == summary["message"]


def test_a_second_ctrl_c_while_the_pairing_winds_down_does_not_cut_it_short(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first Ctrl-C cancels; one pressed while the session closes only says so.

    ``cmd_pair`` runs for real, with its signal handling; the pairing itself is a
    stand-in that, once cancelled, takes its time to close (as closing the session
    with a device does) and then reports. Before the fix the second press was a
    KeyboardInterrupt that ended the command without that report.
    """
    import signal
    import threading
    import time

    import phone.cli

    started, second_pressed = threading.Event(), threading.Event()
    cancellations: list[str] = []

    async def pairing(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancellations.append("cancelled")
        while not second_pressed.is_set():  # still closing the session
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the loop sees the second press meanwhile
        print("the cancelled summary", file=stdout)
        return EXIT_INTERRUPTED

    def press_ctrl_c_twice() -> None:
        if not started.wait(10):
            return  # never pressed at a test that did not get that far
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # a user's second press, not one merged with the first
        os.kill(os.getpid(), signal.SIGINT)
        second_pressed.set()

    monkeypatch.setattr(phone.cli, "pair_main", pairing)
    presser = threading.Thread(target=press_ctrl_c_twice)
    presser.start()
    try:
        args = parse("--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW")
        code = phone.cli.cmd_pair(args)
    finally:
        presser.join(10)
    out, err = capsys.readouterr()
    assert code == EXIT_INTERRUPTED and cancellations == ["cancelled"]
    assert out == "the cancelled summary\n"
    assert err == "doorstep phone pair: stopping; closing the session first\n"


# ---- a refusal names its device; outcomes outside DS1 exit 20 ----------------------------------


async def test_window_closed_is_written_like_the_other_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig:
        argv = ["--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        argv += ["--yes", "--json", "--wait-checkin", "0"]
        first = io.StringIO()
        assert (
            await pair_main(
                parse(*argv), first, io.StringIO(), central=rig.central, cloud=rig.cloud
            )
            == 0
        )
        # Onboarded: its pairing window is closed now.
        out, err = io.StringIO(), io.StringIO()
        code = await pair_main(parse(*argv), out, err, central=rig.central, cloud=rig.cloud)
    assert code == Status.WINDOW_CLOSED == 10
    summary = json.loads(out.getvalue())
    assert summary["status"] == 10 and summary["status_name"] == "window_closed"
    assert summary["message"] == "The device is not in pairing mode."
    assert summary["hint"] == "Press the device's pairing button, then try again."
    assert summary["device"] == {
        "name": DEVICE_NAME,
        "address": DEVICE_ADDRESS,
        "model": None,  # the cloud was never asked
        "dev_id": None,
    }
    assert err.getvalue().splitlines()[-1] == (
        "Failed (10 window_closed): The device is not in pairing mode. "
        "— Press the device's pairing button, then try again."
    )


@pytest.mark.parametrize("cloud_case", ["token refused", "cloud unreachable", "rate limited"])
async def test_cloud_outcomes_exit_20_not_a_device_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cloud_case: str
) -> None:
    """The cloud refusing the token (was exit 12, "device not verified"), out of reach
    (was 13, "timed out") or limiting this user's rate (was 9, "the device is busy with
    another phone") is not about the device: exit 20, named by its cause."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    settings = Settings(database_url="sqlite:///:memory:", rate_per_user=1)
    async with (
        memory_rig(tmp_path) as rig,
        in_process_cloud(settings.database_url, settings=settings) as c,
    ):
        other = new_factory_record()
        await register(c.registry, c.kek, [rig.runtime.factory, other])
        token = await add_user(c.registry, "alice")
        transport = httpx.ASGITransport(app=c.app)
        if cloud_case == "token refused":
            link = CloudLink("http://cloud.test", "dst_not_the_token", transport=transport)
        elif cloud_case == "cloud unreachable":
            link = CloudLink("http://127.0.0.1:9", token)  # nothing listens on the discard port
        else:
            first = start_session(SimDevice(other)).request  # this user's one bind/start
            answer = await c.client.post("/v1/bind/start", json=first, headers=bearer(token))
            assert answer.status_code == 201
            link = CloudLink("http://cloud.test", token, transport=transport)
        argv = ["--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        out, err = io.StringIO(), io.StringIO()
        try:
            code = await pair_main(
                parse(*argv, "--yes", "--json"), out, err, central=rig.central, cloud=link
            )
        finally:
            await link.aclose()
    assert code == EXIT_ENVIRONMENT == 20
    summary = json.loads(out.getvalue())
    assert summary["status"] is None and summary["exit_code"] == 20
    assert summary["stage"] == "Verify with cloud"
    assert summary["device"]["name"] == DEVICE_NAME
    if cloud_case == "token refused":
        assert summary["status_name"] == "unauthorized"
        assert summary["message"] == "The cloud did not accept your token."
        assert err.getvalue().splitlines()[-1] == (
            "Failed (unauthorized): The cloud did not accept your token. — Check the token: "
            "Settings in the app, --token or DOORSTEP_TOKEN for a script."
        )
    elif cloud_case == "rate limited":
        assert summary["status_name"] == "rate_limited"
        assert summary["message"].startswith("Too many attempts; try again in ")
    else:
        assert summary["status_name"] == "cloud_unavailable"
        assert summary["message"] == "Cannot reach the cloud."
        assert (
            err.getvalue()
            .splitlines()[-1]
            .startswith(
                "Failed (cloud_unavailable): Cannot reach the cloud. — Check this machine's network"
            )
        )
    assert token not in out.getvalue() + err.getvalue()


class _CompleteUnreachable:
    """A cloud that answers bind/start, and is gone before bind/complete."""

    def __init__(self, reachable: CloudLink, gone: CloudLink) -> None:
        self.reachable, self.gone = reachable, gone

    async def bind_start(self, request: Any) -> Any:
        return await self.reachable.bind_start(request)

    async def bind_complete(self, attempt: str, ack: bytes) -> Any:
        return await self.gone.bind_complete(attempt, ack)

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        return await self.gone.wait_active(identifier, timeout)


async def test_a_pairing_the_cloud_could_not_be_told_of_exits_20(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device joined; only bind/complete could not reach the cloud (was exit 13)."""
    monkeypatch.setenv("PW", HOME_PASSPHRASE)
    async with memory_rig(tmp_path) as rig, in_process_cloud("sqlite:///:memory:") as c:
        await register(c.registry, c.kek, [rig.runtime.factory])
        token = await add_user(c.registry, "alice")
        up = CloudLink("http://cloud.test", token, transport=httpx.ASGITransport(app=c.app))
        down = CloudLink("http://127.0.0.1:9", token)  # nothing listens on the discard port
        argv = ["--device", DEVICE_NAME, "--ssid", "DoorstepHome", "--passphrase-env", "PW"]
        out, err = io.StringIO(), io.StringIO()
        try:
            code = await pair_main(
                parse(*argv, "--yes", "--json"),
                out,
                err,
                central=rig.central,
                cloud=_CompleteUnreachable(up, down),
            )
        finally:
            await up.aclose()
            await down.aclose()
    assert code == EXIT_ENVIRONMENT
    summary = json.loads(out.getvalue())
    assert summary["status"] is None and summary["status_name"] == "completion_unconfirmed"
    assert summary["stage"] == "Join Wi-Fi"
    assert summary["hint"] == (
        "Check your devices in a minute; pair it again only if it does not appear."
    )
    assert (
        err.getvalue()
        .splitlines()[-1]
        .startswith(
            "Failed (completion_unconfirmed): The device joined the network with its new identity"
        )
    )


def test_help_lists_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        doorstep_cli.main(["phone", "pair", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "exit status:" in text
    for line in (
        "  0         onboarded",
        "  20        outside DS1: the cloud unreachable or failing, the token refused,",
        '  130       interrupted (--json: status null, status_name "cancelled")',
    ):
        assert line in text.splitlines()


async def test_an_abandoned_code_question_leaves_no_typed_answer_for_the_shell() -> None:
    """The user typed "yes" but the device went away before Enter: the question is
    abandoned, and "yes" must not stay on the terminal for the shell to run."""
    from phone.commissioner import DeviceSummary
    from phone.pair import terminal_ask

    master, slave = pty.openpty()
    try:
        with os.fdopen(os.dup(slave), "r") as terminal:
            out = io.StringIO()
            ask = terminal_ask(out, terminal)
            question = asyncio.create_task(ask(DeviceSummary("Lamp", "AA", "L1", b""), "123456"))
            while not out.getvalue().endswith("[y/N] "):
                await asyncio.sleep(0)
            os.write(master, b"yes")  # typed; Enter not pressed yet
            question.cancel()  # the device went away
            with pytest.raises(asyncio.CancelledError):
                await question
            assert out.getvalue().endswith("[y/N] \n")  # the question's line is ended
            os.write(master, b"\n")  # now Enter
            assert os.read(slave, 64) == b"\n"  # what the next reader (the shell) gets
    finally:
        os.close(master)
        os.close(slave)


def test_the_pairing_objects_never_show_the_passphrase() -> None:
    from phone.pair import Pairing, ScriptedPairing

    delegate = ScriptedPairing(b"DoorstepHome", HOME_PASSPHRASE, 1, None, io.StringIO())
    pairing = Pairing(
        MemoryAir().central(), None, DEVICE_NAME, "DoorstepHome", HOME_PASSPHRASE,
        yes=True, out=io.StringIO(),
    )  # fmt: skip
    for shown in (repr(delegate), repr(pairing), str(delegate)):
        assert HOME_PASSPHRASE not in shown and "DoorstepHome" in shown
