"""``doorstep sim``'s command line as a user meets it: ``--help`` and values it must refuse.

Everything here runs in-process and starts no simulator: bad values are refused
before anything starts. (With ``PATH`` emptied, a simulator started by mistake
fails at once on the missing dbus-daemon instead of serving until a signal.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

import doorstep_cli
from bluezsim import cli as sim_cli

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _nothing_can_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--interval-ms", "-5"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got -5",
        ),
        (
            ["--interval-ms", "0"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got 0",
        ),
        (
            ["--timing", "--interval-ms", "5000"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got 5000",
        ),
        (
            ["--interval-ms", "nan"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got nan",
        ),
        (
            ["--adv-interval-ms", "0"],
            "--adv-interval-ms must be in 20..10240 ms (BLE's advertising interval range), got 0",
        ),
        (
            ["--no-timing", "--adv-interval-ms", "-100"],
            "--adv-interval-ms must be in 20..10240 ms (BLE's advertising interval range), "
            "got -100",
        ),
        (
            ["--supervision-timeout-ms", "0"],
            "--supervision-timeout-ms must be in 100..32000 ms "
            "(BLE's supervision timeout range), got 0",
        ),
        (
            ["--supervision-timeout-ms", "-2000"],
            "--supervision-timeout-ms must be in 100..32000 ms "
            "(BLE's supervision timeout range), got -2000",
        ),
        (
            ["--rssi-jitter-db", "-3"],
            "--rssi-jitter-db must be in 0..147 dB (RSSI spans -127..20 dBm), got -3",
        ),
        (["--connect-timeout", "0"], "--connect-timeout must be more than 0 s, got 0"),
    ],
)
def test_nonsense_values_are_refused_in_one_line_with_status_2(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert doorstep_cli.main(["sim", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"doorstep sim: {error}\n"
    assert captured.out == ""  # no DBUS_SYSTEM_BUS_ADDRESS: nothing is served


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        if argv[0] == "sim":
            doorstep_cli.main(argv)
        else:
            sim_cli.main(argv)  # python -m bluezsim
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # as read, whatever the wrapping


@pytest.mark.parametrize("argv", [["sim", "--help"], ["--help"]])
def test_help_is_plain_text_and_says_the_timing_model_is_off_by_default(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(argv, capsys)
    assert "``" not in text
    description = text.split("options:")[0]
    assert "Run a simulated BlueZ (org.bluez on a private D-Bus) until SIGINT/SIGTERM." in (
        description
    )
    assert (
        "Unless --timing or an interval option is given, the timing model is off" in description
    )
    # Not "default 30": without the option there is no 30 ms interval unless the model is on.
    assert "default 30" not in text and "default 100" not in text
    assert "Without it: 30 ms while the model is on" in text


def test_every_option_has_a_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["sim", "--help"], capsys)
    for shown in (
        "--mtu MTU ATT MTU negotiated on every link (23..517)",
        "--supervision-timeout-ms SUPERVISION_TIMEOUT_MS how long a link that went silent "
        "takes to drop, 100..32000 ms (default 2000)",
        "--rssi-jitter-db RSSI_JITTER_DB vary each sighting's RSSI randomly by up to ± this "
        "many dB, 0..147 (default 0: no jitter)",
    ):
        assert shown in text
