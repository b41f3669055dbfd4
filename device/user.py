"""The device's user: a terminal prompt, or scripted accept/reject (issue 5)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

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
    """``--confirm prompt``: asks on the terminal; ``b`` + Enter is the pairing button."""

    def __init__(self, on_button: Callable[[], None]) -> None:
        self._on_button = on_button
        self._answers: asyncio.Queue[bool] = asyncio.Queue()
        self._waiting = False
        self._reader_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_lines())

    async def _read_lines(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return  # stdin closed: no more answers
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
