"""``doorstep phone pair --json --yes`` as a process against ``doorstep sim``, ``doorstep cloud
serve`` and a ``doorstep device run --confirm accept`` process (``demo.stack.Stack``).

Everything is a separate process talking over the simulated BlueZ bus and HTTP:
the command finds the device by its advertised name, pairs it through the
real cloud, and its JSON summary, exit code and output are what a script sees.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from demo.stack import Stack, doorstep_cmd
from device_process_helpers import quick_wifi, show

pytestmark = pytest.mark.timeout(180)

PASSPHRASE = "correct horse battery"


async def run_pair(stack: Stack, *args: str, passphrase: str) -> tuple[int, str, str]:
    env = stack.base_env()
    env["HOME_WIFI"] = passphrase
    env["XDG_CONFIG_HOME"] = str(stack.workdir / "config")  # no settings from this machine
    process = await asyncio.create_subprocess_exec(
        *doorstep_cmd("phone", "pair", *args, "--passphrase-env", "HOME_WIFI"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_phone_pair_json_against_sim_cloud_and_device_processes(tmp_path: Path) -> None:
    workdir = tmp_path / "stack"
    workdir.mkdir()
    async with Stack(workdir, timing=False, wifi_file=quick_wifi(workdir)) as stack:
        (device,) = await stack.add_devices(1)
        common = ["--cloud", stack.cloud_url, "--token", stack.token, "--ssid", "DoorstepHome"]

        code, out, err = await run_pair(
            stack, "--device", device.name, *common, "--yes", "--json", "--scan-timeout", "20",
            passphrase="not the passphrase",
        )  # fmt: skip
        assert code == 3, err
        assert json.loads(out)["status_name"] == "wifi_auth_failed"

        code, out, err = await run_pair(
            stack, "--device", device.name, *common, "--yes", "--json", "--scan-timeout", "20",
            passphrase=PASSPHRASE,
        )  # fmt: skip
        assert code == 0, err
        summary = json.loads(out)
        assert summary["status"] == 0 and summary["checked_in"] is True
        assert summary["device"]["name"] == device.name
        assert summary["device"]["model"] == stack.model
        assert "Join Wi-Fi" in summary["timings_s"]
        for text in (out, err):
            assert PASSPHRASE not in text and "not the passphrase" not in text
            assert stack.token not in text
        info = await show(stack, device)  # the device's own view of its identity
        assert info["state"] == "active" and info["network"] == "DoorstepHome"
        assert summary["identifier"].startswith(info["identifier"])  # the device shows 8 hex

        # a device that is not there: the DS1 "timed out" status after the scan timeout
        code, out, _err = await run_pair(
            stack, "--device", "Doorstep-FFFF", *common, "--yes", "--json", "--scan-timeout", "2",
            passphrase=PASSPHRASE,
        )  # fmt: skip
        assert code == 13
        assert json.loads(out)["status_name"] == "timed_out"
