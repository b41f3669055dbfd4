"""The device's user: a terminal prompt, or scripted accept/reject (issue 5)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from device.runtime import ConfirmRequest


class ScriptedUser:
    """``--confirm accept`` or ``--confirm reject``: answers at once, prints what it saw."""

    def __init__(self, accept: bool, out: Callable[[str], None] = print) -> None:
        self.accept = accept
        self.out = out

    async def confirm(self, request: ConfirmRequest) -> bool:
        verdict = "accepting" if self.accept else "rejecting"
        self.out(f"[device] join {request.ssid!r}? code {request.sas} — {verdict} (scripted)")
        return self.accept

    async def show(self, message: str) -> None:
        self.out(f"[device] {message}")


class TerminalUser:
    """``--confirm prompt``: asks on the terminal; ``b`` + Enter is the pairing button.

    The terminal is read with the event loop's reader, never by a thread blocked in
    ``readline``: asyncio.run waits for its executor's threads at exit, so such a
    thread kept a stopped device (Ctrl-C) running until Enter was pressed.
    """

    def __init__(self, on_button: Callable[[], None]) -> None:
        self._on_button = on_button
        self._answers: asyncio.Queue[bool] = asyncio.Queue()
        self._waiting = False
        self._reader_task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_lines())

    def stop(self) -> None:
        """Stop reading the terminal (whatever reads it next gets what is typed)."""
        if self._reader_task is not None:
            self._reader_task.cancel()

    def stop_with(self, stopped: asyncio.Event) -> None:
        """Stop reading once ``stopped`` is set (the device runtime's, when it stops)."""

        async def watch() -> None:
            await stopped.wait()
            self.stop()

        self._watcher = asyncio.ensure_future(watch())

    async def _read_lines(self) -> None:
        async for line in _lines(sys.stdin):
            word = line.strip().lower()
            if word in ("b", "button"):
                self._on_button()
            elif self._waiting and word in ("y", "yes", "a", "accept"):
                self._answers.put_nowait(True)
            elif self._waiting and word in ("n", "no", "r", "reject"):
                self._answers.put_nowait(False)
            elif word:
                print("[device] type y (accept), n (reject) or b (pairing button)", flush=True)

    async def confirm(self, request: ConfirmRequest) -> bool:
        print(
            f"\n[device] A commissioner wants this device to join Wi-Fi {request.ssid!r}.\n"
            f"[device] Code on this device: {request.sas[:3]} {request.sas[3:]} — does the phone show it?\n"
            f"[device] Accept? [y/n] (you have {request.deadline_s:.0f} s)",
            flush=True,
        )
        while not self._answers.empty():
            self._answers.get_nowait()
        self._waiting = True
        try:
            return await self._answers.get()
        finally:
            self._waiting = False

    async def show(self, message: str) -> None:
        print(f"[device] {message}", flush=True)


async def _lines(source: TextIO) -> AsyncIterator[str]:
    """The lines typed on ``source`` until end of input; cancellable at any moment.

    A terminal or a pipe is waited on with the loop's reader; a source that cannot
    be polled (a regular file, an in-memory stream) never blocks and is read directly.
    """
    try:
        fd = source.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: no file descriptor
        fd = -1
    loop = asyncio.get_running_loop()
    pending = bytearray()
    while True:
        if fd < 0:
            line = source.readline()
            if not line:
                return
            yield line
            continue
        readable: asyncio.Future[None] = loop.create_future()

        def wake(ready: asyncio.Future[None] = readable) -> None:
            if not ready.done():
                ready.set_result(None)

        try:
            loop.add_reader(fd, wake)
        except (OSError, ValueError, NotImplementedError):  # cannot be polled: never blocks
            fd = -1
            continue
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 1024)
        except BlockingIOError:  # woken, but another reader took it
            continue
        except OSError:  # the terminal went away (EIO after a hang-up): no more answers
            return
        if not chunk:
            if pending:
                yield pending.decode("utf-8", "replace")
            return  # stdin closed: no more answers
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line_bytes, pending = bytes(pending[: end + 1]), pending[end + 1 :]
            yield line_bytes.decode("utf-8", "replace")
