"""``doorstep demo``, the README's main job, run as a user runs it (a real process tree)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from demo.stack import doorstep_cmd

pytestmark = pytest.mark.timeout(120)


def _still_running(marker: str) -> list[str]:
    """Command lines of live processes whose command line or environment mention ``marker``
    (the demo's work directory: the phone app has it only in its environment)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or marker in environ):
            found.append(cmdline)
    return found


async def test_demo_without_a_terminal_onboards_every_device_and_stops_everything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    proc = await asyncio.create_subprocess_exec(
        *doorstep_cmd("demo", "--devices", "2", "--dir", str(workdir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:  # stuck: stop it as Ctrl-C would, everything with it
            proc.terminate()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    # Not a terminal (stdin and stdout are not): the scripted run, not a phone app waiting for keys.
    assert "[demo] not a terminal: running the scripted demo (--headless)" in text
    assert "[demo] 2/2 devices onboarded" in text
    summary = text.split("\nsummary\n", 1)[1].splitlines()[:2]
    assert all(" ok " in line and "checked in: yes" in line for line in summary), summary
    assert "Traceback" not in text
    assert _still_running(str(workdir)) == []


async def test_demo_stopped_with_sigterm_stops_its_phone_app_and_restores_the_terminal(
    tmp_path: Path,
) -> None:
    """In a terminal the demo opens the phone app; a SIGTERM to the demo ends both, cleanly."""
    workdir = tmp_path / "demo"
    env = dict(os.environ)
    env.update(
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        TERM="xterm-256color",
        COLUMNS="80",
        LINES="24",
    )
    controller, terminal = os.openpty()
    proc = await asyncio.create_subprocess_exec(
        *doorstep_cmd("demo", "--devices", "1", "--dir", str(workdir)),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        start_new_session=True,  # the terminal's own session, as in a real one
    )
    os.close(terminal)
    screen = bytearray()
    loop = asyncio.get_running_loop()

    def read_some() -> None:
        with contextlib.suppress(OSError):  # EIO once every writer closed it
            screen.extend(os.read(controller, 65536))

    loop.add_reader(controller, read_some)
    try:

        async def shown(text: bytes, timeout: float) -> None:
            deadline = loop.time() + timeout
            while text not in screen:
                assert loop.time() < deadline, bytes(screen[-600:])
                await asyncio.sleep(0.05)

        await shown(b"[demo] opening the phone app", 60)
        await shown(b"Enter pairs the selected device", 30)  # the app is up, with its list
        app_running = _still_running(str(workdir))
        assert any("doorstep_cli phone" in line for line in app_running), app_running
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 130
        await asyncio.sleep(0.2)  # the last bytes
        read_some()
    finally:
        loop.remove_reader(controller)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(controller)
    assert _still_running(str(workdir)) == []
    # The app left its alternate screen: the terminal is usable again.
    assert b"\x1b[?1049l" in screen
    assert b"Traceback" not in screen
    # The token never appears on a command line (every user of the machine sees those).
    assert all("--token" not in line for line in app_running)
