"""``doorstep demo``, the README's main job, run as a user runs it (a real process tree)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

import pytest

import doorstep_cli
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


# ---- the command line and the work directory: in-process, nothing starts ----------------

_REFUSED_DIR = (
    "doorstep demo: {} is not empty and was not made by the demo (no .doorstep-demo in it); "
    "refusing to delete what is in it: choose a new or empty --dir\n"
)


@pytest.fixture
def nothing_can_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No dbus-daemon on PATH: a demo let through by mistake stops before starting anything,
    and the default work directory is under ``tmp_path``."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def _users_directory(path: Path) -> dict[str, str]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "y").write_text("y\n")
    return _files(path)


@pytest.mark.usefixtures("nothing_can_start")
def test_demo_refuses_a_directory_of_the_users_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mywork = tmp_path / "mywork"
    before = _users_directory(mywork)
    argv = ["demo", "--headless", "--devices", "1", "--dir", str(mywork)]
    assert doorstep_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == _REFUSED_DIR.format(mywork)
    assert captured.out == ""
    assert _files(mywork) == before  # not even a marker or a logs/ added


@pytest.mark.usefixtures("nothing_can_start")
def test_demo_refuses_a_default_directory_holding_something_it_did_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "data" / "doorstep" / "demo"
    (default / "logs").mkdir(parents=True)
    (default / "cloud.db").write_text("an earlier demo's\n")
    (default / "notes.txt").write_text("mine\n")
    before = _files(default)
    assert doorstep_cli.main(["demo", "--headless"]) == 2
    assert capsys.readouterr().err == _REFUSED_DIR.format(default)
    assert _files(default) == before


@pytest.mark.usefixtures("nothing_can_start")
@pytest.mark.parametrize("below", ["", "sub"])
def test_demo_refuses_a_file_as_its_directory(
    below: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    somefile = tmp_path / "somefile"
    somefile.write_text("keep me\n")
    assert doorstep_cli.main(["demo", "--headless", "--dir", str(somefile / below)]) == 2
    err = capsys.readouterr().err
    where = "" if not below else f" (in --dir {somefile / below})"
    assert err == f"doorstep demo: {somefile} is not a directory{where}\n"
    assert somefile.read_text() == "keep me\n"


@pytest.mark.usefixtures("nothing_can_start")
@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["--interval-ms", "-1"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got -1",
        ),
        (
            ["--interval-ms", "0"],
            "--interval-ms must be in 7.5..4000 ms (BLE's connection interval range), got 0",
        ),
        (
            ["--adv-interval-ms", "0"],
            "--adv-interval-ms must be in 20..10240 ms (BLE's advertising interval range), got 0",
        ),
        (
            ["--adv-interval-ms", "20000"],
            "--adv-interval-ms must be in 20..10240 ms (BLE's advertising interval range), "
            "got 20000",
        ),
        (["--mtu", "5"], "MTU must be in 23..517, got 5"),
    ],
)
def test_demo_refuses_out_of_range_options_before_touching_its_directory(
    argv: list[str], error: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "new"
    assert doorstep_cli.main(["demo", "--headless", "--dir", str(workdir), *argv]) == 2
    assert capsys.readouterr().err == f"doorstep demo: {error}\n"
    assert not workdir.exists()


def _an_earlier_demos_files(workdir: Path) -> None:
    for name in ("logs", "factory", "devices/0a1b2c3d", "config/doorstep"):
        (workdir / name).mkdir(parents=True)
    (workdir / "logs" / "sim.log").write_text("…\n")
    (workdir / "factory" / "0a1b2c3d.json").write_text("{}\n")
    (workdir / "cloud.db").write_text("…\n")
    (workdir / "kek").write_text("…\n")


def test_a_directory_the_demo_made_is_emptied_for_the_next_run(tmp_path: Path) -> None:
    """Every demo starts factory-fresh, in a new, an empty, or its own directory."""
    from demo.cli import MARKER, prepare_workdir

    new = tmp_path / "a" / "new"
    prepare_workdir(new)
    assert [p.name for p in new.iterdir()] == [MARKER]
    _an_earlier_demos_files(new)
    (new / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("keep\n")
    prepare_workdir(new)
    assert [p.name for p in new.iterdir()] == [MARKER]
    assert (tmp_path / "outside" / "keep").read_text() == "keep\n"  # links are not followed

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    assert [p.name for p in empty.iterdir()] == [MARKER]


def test_the_default_directory_of_an_earlier_version_is_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions before the marker wrote none: their default directory is still emptied,
    but the same files in any other directory are refused."""
    from demo.cli import MARKER, WorkdirError, data_dir, prepare_workdir

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = data_dir()
    _an_earlier_demos_files(default)
    prepare_workdir(default)
    assert [p.name for p in default.iterdir()] == [MARKER]

    other = tmp_path / "other"
    _an_earlier_demos_files(other)
    before = _files(other)
    with pytest.raises(WorkdirError):
        prepare_workdir(other)
    assert _files(other) == before


@pytest.mark.parametrize("redirected", ["", "stdin", "stdout", "stderr"])
def test_the_app_runs_only_with_all_three_streams_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, redirected: str
) -> None:
    """``doorstep demo 2>log`` started the app, which draws on stderr, into the log."""
    import pty

    from demo.cli import interactive_terminal

    leader, follower = pty.openpty()
    read_end, write_end = os.pipe()
    with contextlib.ExitStack() as stack:
        for fd in (leader, follower, read_end, write_end):
            stack.callback(os.close, fd)
        for name in ("stdin", "stdout", "stderr"):
            fd = write_end if name == redirected else follower
            stream = stack.enter_context(open(fd, "w" if name != "stdin" else "r", closefd=False))
            monkeypatch.setattr(sys, name, stream)
        assert interactive_terminal() is (redirected == "")
