"""``doorstep demo``, the README's main job, run as a user runs it (a real process tree)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.stack import doorstep_cmd

pytestmark = pytest.mark.timeout(150)


@dataclass(frozen=True)
class _Process:
    pid: int
    cmdline: str
    environ: dict[str, str]


def _processes(marker: str) -> list[_Process]:
    """Live processes whose command line or environment mention ``marker`` (the demo's
    work directory: the phone app has it only in its environment)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            raw_environ = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = raw_cmdline.replace(b"\0", b" ").decode(errors="replace")
        environ = raw_environ.decode(errors="replace")
        if state != "Z" and (marker in cmdline or marker in environ):
            pairs = (item.partition("=") for item in environ.split("\0") if item)
            found.append(_Process(int(pid), cmdline, {k: v for k, _, v in pairs}))
    return found


async def _stop(proc: asyncio.subprocess.Process, marker: str) -> None:
    """After a failure: stop the demo as Ctrl-C would (it stops its stack), then make sure."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    for leftover in _processes(marker):
        with contextlib.suppress(OSError):
            os.kill(leftover.pid, signal.SIGKILL)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    return env


async def test_demo_without_a_terminal_onboards_every_device_and_stops_everything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    proc = await asyncio.create_subprocess_exec(
        *doorstep_cmd("demo", "--devices", "2", "--dir", str(workdir)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await _stop(proc, str(workdir))
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    # Not a terminal (stdin and stdout are not): the scripted run, not a phone app waiting for keys.
    assert "[demo] not a terminal: running the scripted demo (--headless)" in text
    assert "[demo] 2/2 devices onboarded" in text
    summary = text.split("\nsummary\n", 1)[1].splitlines()[:2]
    assert all(" ok " in line and "checked in: yes" in line for line in summary), summary
    assert "Traceback" not in text
    assert _processes(str(workdir)) == []


async def test_demo_stopped_with_sigterm_stops_its_phone_app_and_restores_the_terminal(
    tmp_path: Path,
) -> None:
    """In a terminal the demo opens the phone app; a SIGTERM to the demo ends both, cleanly.

    The pty is the processes' stdin/stdout/stderr (so they see a terminal),
    not their controlling terminal: hangups and resizes are not exercised.
    """
    workdir = tmp_path / "demo"
    env = _env(tmp_path)
    env.update(TERM="xterm-256color", COLUMNS="80", LINES="24")
    loop = asyncio.get_running_loop()
    screen = bytearray()
    controller, terminal = os.openpty()
    proc: asyncio.subprocess.Process | None = None

    def read_some() -> None:
        try:
            screen.extend(os.read(controller, 65536))
        except OSError:  # EIO once every writer closed it: stop watching
            loop.remove_reader(controller)

    async def shown(text: bytes, timeout: float) -> None:
        deadline = loop.time() + timeout
        while text not in screen:
            assert loop.time() < deadline, bytes(screen[-600:])
            await asyncio.sleep(0.05)

    try:
        proc = await asyncio.create_subprocess_exec(
            *doorstep_cmd("demo", "--devices", "1", "--dir", str(workdir)),
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=env,
            start_new_session=True,
        )
        os.close(terminal)
        terminal = -1
        loop.add_reader(controller, read_some)
        await shown(b"[demo] opening the phone app", 60)
        await shown(b"Enter pairs the selected device", 30)  # the app is up, with its list
        (app,) = [p for p in _processes(str(workdir)) if "doorstep_cli phone" in p.cmdline]
        token = app.environ["DOORSTEP_TOKEN"]
        command_lines = [p.cmdline for p in _processes(str(workdir))]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 130
        await asyncio.sleep(0.2)  # the last bytes
        read_some()
    finally:
        loop.remove_reader(controller)
        if proc is not None:
            await _stop(proc, str(workdir))
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert _processes(str(workdir)) == []
    # The app left its alternate screen: the terminal is usable again.
    assert b"\x1b[?1049l" in screen
    assert b"Traceback" not in screen
    # The token is on no command line (every user of the machine can read those).
    assert token and all(token not in line for line in command_lines)
