"""``doorstep demo``, the README's main job, run as a user runs it (a real process tree)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import termios
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


class _DemoInPty:
    """``doorstep demo --devices 1`` with a pty as its stdin/stdout/stderr.

    The pty is not the processes' controlling terminal: hangups and resizes
    are not exercised.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.workdir = tmp_path / "demo"
        self.env = _env(tmp_path)
        self.env.update(TERM="xterm-256color", COLUMNS="80", LINES="24")
        self.screen = bytearray()
        self.proc: asyncio.subprocess.Process | None = None
        self._controller, self._terminal = os.openpty()
        self._loop = asyncio.get_running_loop()

    def _read_some(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.screen.extend(os.read(self._controller, 65536))

    async def shown(self, text: bytes, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while text not in self.screen:
            assert self._loop.time() < deadline, bytes(self.screen[-600:])
            await asyncio.sleep(0.05)

    def local_modes(self) -> int:
        """The terminal's lflag (ECHO, ICANON, …) as the processes see it."""
        return int(termios.tcgetattr(self._terminal)[3])

    def phone_app(self) -> _Process:
        (app,) = [p for p in _processes(str(self.workdir)) if "doorstep_cli phone" in p.cmdline]
        return app

    async def __aenter__(self) -> _DemoInPty:
        os.set_blocking(self._controller, False)
        self.proc = await asyncio.create_subprocess_exec(
            *doorstep_cmd("demo", "--devices", "1", "--dir", str(self.workdir)),
            stdin=self._terminal,
            stdout=self._terminal,
            stderr=self._terminal,
            env=self.env,
            start_new_session=True,
        )
        self._loop.add_reader(self._controller, self._read_some)
        await self.shown(b"[demo] opening the phone app", 60)
        await self.shown(b"Enter pairs the selected device", 30)  # the app is up, with its list
        return self

    async def stopped(self, timeout: float) -> int:
        """SIGTERM to the demo; its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.sleep(0.2)  # the last bytes
        self._read_some()
        return status

    async def __aexit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._controller)
        try:
            if self.proc is not None:
                await _stop(self.proc, str(self.workdir))
        finally:
            os.close(self._controller)
            os.close(self._terminal)


async def test_demo_stopped_with_sigterm_stops_its_phone_app_and_restores_the_terminal(
    tmp_path: Path,
) -> None:
    """In a terminal the demo opens the phone app; a SIGTERM to the demo ends both, cleanly."""
    async with _DemoInPty(tmp_path) as demo:
        app = demo.phone_app()
        token = app.environ["DOORSTEP_TOKEN"]
        command_lines = [p.cmdline for p in _processes(str(demo.workdir))]
        assert await demo.stopped(30) == 130
    assert _processes(str(demo.workdir)) == []
    # The app left its alternate screen: the terminal is usable again.
    assert b"\x1b[?1049l" in demo.screen
    assert b"Traceback" not in demo.screen
    # The token is on no command line (every user of the machine can read those).
    assert token and all(token not in line for line in command_lines)


async def test_a_phone_app_that_must_be_killed_leaves_a_usable_terminal(tmp_path: Path) -> None:
    """A hung app (stopped here) ignores SIGTERM: the demo kills it, then undoes its screen mode."""
    async with _DemoInPty(tmp_path) as demo:
        assert not demo.local_modes() & termios.ECHO  # the app's raw mode
        os.kill(demo.phone_app().pid, signal.SIGSTOP)
        seen = len(demo.screen)
        assert await demo.stopped(30) == 130
        after = bytes(demo.screen[seen:])
        modes = demo.local_modes()
    assert _processes(str(demo.workdir)) == []
    assert modes & termios.ECHO and modes & termios.ICANON  # typing shows, lines edit
    for undo in (b"\x1b[?1049l", b"\x1b[?25h", b"\x1b[?1000l", b"\x1b[?1003l", b"\x1b[?2004l"):
        assert undo in after  # main screen, cursor, no mouse or paste reports
    assert b"Traceback" not in demo.screen
