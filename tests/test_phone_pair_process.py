"""``doorstep phone pair`` as a process against ``doorstep sim``, ``doorstep cloud serve`` and
``doorstep device run --confirm accept`` processes (``demo.stack.Stack``).

Everything is a separate process talking over the simulated BlueZ bus and HTTP:
the command finds the device by its advertised name, pairs it through the
real cloud, and its JSON summary, exit code and output are what a script sees.
Without ``--yes`` the code is asked on its stdin, a pipe nobody writes to here:
what happens while that question is up (the device killed, Ctrl-C) is what a
user at a terminal would see.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from ble.bleak_central import BleakCentral
from ble.profile import AdvState
from ble_helpers import bus_environment
from demo.stack import DeviceHandle, Stack, doorstep_cmd
from device_process_helpers import find, quick_wifi, show
from phone_helpers import LINK_LOST, STAGES

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

PASSPHRASE = "correct horse battery"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    workdir = tmp_path_factory.mktemp("phone-pair")
    async with Stack(workdir, timing=False, wifi_file=quick_wifi(workdir)) as running:
        with bus_environment(running.env):  # this process scans too (BleakCentral)
            yield running


def pair_env(stack: Stack, passphrase: str) -> dict[str, str]:
    env = stack.base_env()
    env["HOME_WIFI"] = passphrase
    env["XDG_CONFIG_HOME"] = str(stack.workdir / "config")  # no settings from this machine
    return env


def common(stack: Stack, device: str, *extra: str) -> list[str]:
    return [
        "--device", device, "--cloud", stack.cloud_url, "--token", stack.token,
        "--ssid", "DoorstepHome", "--passphrase-env", "HOME_WIFI", "--scan-timeout", "20",
        *extra,
    ]  # fmt: skip


async def run_pair(stack: Stack, *args: str, passphrase: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *doorstep_cmd("phone", "pair", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=pair_env(stack, passphrase),
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class AskedPairing:
    """``phone pair --json`` without ``--yes``, stopped at the code question."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err = ""

    @classmethod
    async def start(cls, stack: Stack, handle: DeviceHandle) -> AskedPairing:
        process = await asyncio.create_subprocess_exec(
            *doorstep_cmd("phone", "pair", *common(stack, handle.name, "--json")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,  # a terminal nobody types on
            env=pair_env(stack, PASSPHRASE),
        )
        asked = cls(process)
        await asyncio.wait_for(asked._until_asked(), 60)
        return asked

    async def _until_asked(self) -> None:
        assert self.process.stderr is not None
        while "[y/N] " not in self.err:
            chunk = await self.process.stderr.read(4096)
            assert chunk, f"ended before asking: {self.err}"
            self.err += chunk.decode()

    async def outcome(self) -> tuple[int, dict[str, Any], str, str]:
        """Without any answer: exit status, summary, stdout and stderr.

        stdin stays open (nobody types, nobody closes the terminal): ``communicate()``
        closes it on Python 3.12+, which ``phone pair`` would read as the answer "no".
        """
        assert self.process.stdout is not None and self.process.stderr is not None
        out, err = await asyncio.wait_for(
            asyncio.gather(self.process.stdout.read(), self.process.stderr.read()), 60
        )
        await asyncio.wait_for(self.process.wait(), 60)
        assert self.process.returncode is not None
        self.err += err.decode()
        return self.process.returncode, json.loads(out), out.decode(), self.err


async def test_phone_pair_json_against_sim_cloud_and_device_processes(stack: Stack) -> None:
    (device,) = await stack.add_devices(1)

    code, out, err = await run_pair(
        stack, *common(stack, device.name, "--yes", "--json"), passphrase="not the passphrase"
    )
    assert code == 3, err
    summary = json.loads(out)
    assert summary["status_name"] == "wifi_auth_failed"
    # filed under the join, each stage with its own time
    assert summary["stage"] == "Join Wi-Fi"
    assert list(summary["timings_s"]) == STAGES[:6]
    failed = [line for line in err.splitlines() if " FAILED " in line]
    assert len(failed) == 1 and failed[0].startswith("Join Wi-Fi ")

    code, out, err = await run_pair(
        stack, *common(stack, device.name, "--yes", "--json"), passphrase=PASSPHRASE
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["status"] == 0 and summary["checked_in"] is True
    assert summary["device"]["name"] == device.name
    assert summary["device"]["model"] == stack.model
    assert list(summary["timings_s"]) == STAGES
    for text in (out, err):
        assert PASSPHRASE not in text and "not the passphrase" not in text
        assert stack.token not in text
    info = await show(stack, device)  # the device's own view of its identity
    assert info["state"] == "active" and info["network"] == "DoorstepHome"
    assert summary["identifier"].startswith(info["identifier"])  # the device shows 8 hex

    # onboarded, so its pairing window is closed: said like every other outcome
    code, out, err = await run_pair(
        stack, *common(stack, device.name, "--yes", "--json"), passphrase=PASSPHRASE
    )
    assert code == 10, err
    summary = json.loads(out)
    assert summary["status_name"] == "window_closed"
    assert summary["message"] == "The device is not in pairing mode."
    assert summary["device"]["name"] == device.name
    assert summary["device"]["address"] == summary["seen"][-1]["address"]

    # a device that is not there: the DS1 "timed out" status after the scan timeout
    args = common(stack, "Doorstep-FFFF", "--yes", "--scan-timeout", "2")
    code, out, err = await run_pair(stack, *args, "--json", passphrase=PASSPHRASE)
    assert code == 13
    summary = json.loads(out)
    assert summary["status_name"] == "timed_out"
    assert summary["total_s"] >= 2.0
    assert {"name": device.name, "state": "provisioned", "pairing_mode": False}.items() <= (
        next(s for s in summary["seen"] if s["name"] == device.name).items()
    )
    assert err.count("No device 'Doorstep-FFFF' seen within 2 s.") == 1
    code, out, _err = await run_pair(stack, *args, passphrase=PASSPHRASE)
    assert code == 13
    assert "Seen while scanning:" in out
    assert any(
        line.split()[:1] == [device.name] and line.endswith("not in pairing mode")
        for line in out.splitlines()
    )


async def test_a_device_killed_while_the_code_is_asked_ends_the_pairing_at_once(
    stack: Stack,
) -> None:
    (device,) = await stack.add_devices(1)
    asked = await AskedPairing.start(stack, device)
    await stack.stop_device(device, signal.SIGKILL)  # the device loses power
    code, summary, out, err = await asked.outcome()  # no answer was ever typed
    assert code == 11, err
    message = "the device disconnected while the code was being confirmed"
    assert summary["stage"] == "Confirm code"
    assert summary["message"] == message and summary["hint"] == LINK_LOST
    assert list(summary["timings_s"]) == STAGES[:4]
    lines = err.splitlines()
    assert "Traceback" not in err
    assert lines[-3].endswith("[y/N] ")  # the abandoned question's line was ended
    assert lines[-2].startswith("Confirm code ") and lines[-2].endswith(f" s  {message}")
    assert lines[-1] == f"Failed (11 protocol_error): {message} — {LINK_LOST}"
    assert PASSPHRASE not in out + err and stack.token not in out + err


async def test_ctrl_c_at_the_code_question_prints_a_cancelled_summary(stack: Stack) -> None:
    (device,) = await stack.add_devices(1)
    asked = await AskedPairing.start(stack, device)
    asked.process.send_signal(signal.SIGINT)
    code, summary, out, err = await asked.outcome()
    assert code == 130, err
    assert out.endswith("}\n") and out.count('"exit_code"') == 1  # one whole summary
    assert summary["status"] is None and summary["status_name"] == "cancelled"
    assert summary["exit_code"] == 130 and summary["stage"] == "Confirm code"
    assert summary["device"]["name"] == device.name
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "Interrupted during 'Confirm code'; the pairing was cancelled."
    # The session was closed on the way out: the device is back in pairing mode, pairable.
    await find(
        BleakCentral(), device.name, state=AdvState.UNPROVISIONED, window_open=True, free=True
    )
    code, out, err = await run_pair(
        stack, *common(stack, device.name, "--yes", "--json"), passphrase=PASSPHRASE
    )
    assert code == 0, err


@pytest.mark.parametrize("case", ["token refused", "cloud unreachable"])
async def test_cloud_outcomes_exit_20(stack: Stack, case: str) -> None:
    (device,) = await stack.add_devices(1)
    args = common(stack, device.name, "--yes", "--json")
    if case == "token refused":
        args[args.index("--token") + 1] = "dst_not_the_token_at_all"
    else:
        args[args.index("--cloud") + 1] = "http://127.0.0.1:9"  # nothing listens there
    code, out, err = await run_pair(stack, *args, passphrase=PASSPHRASE)
    assert code == 20, err
    summary = json.loads(out)
    assert summary["status"] is None and summary["exit_code"] == 20
    expected = "unauthorized" if case == "token refused" else "cloud_unavailable"
    assert summary["status_name"] == expected
    assert err.splitlines()[-1].startswith(f"Failed ({expected}): ")
    assert stack.token not in out + err and "dst_not_the_token_at_all" not in out + err
