"""Run the simulator as a subprocess and drive it over D-Bus.

``async with SimProcess(timing=True, interval_ms=30) as sim:`` starts
``python -m bluezsim`` (the code behind ``doorstep sim``), reads its
``DBUS_SYSTEM_BUS_ADDRESS=`` line, and connects a :class:`SimControl` to the
``org.doorstep.Sim1`` interface at ``/org/doorstep/sim`` (bus name
``org.bluez``). :meth:`SimProcess.env` gives the environment for further
child processes (bus address + ``bluetoothctl`` shim on ``PATH``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from types import TracebackType
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from bluezsim import att
from bluezsim.busd import child_environment

CONTROL_NAME = "org.bluez"
CONTROL_PATH = "/org/doorstep/sim"
CONTROL_IFACE = "org.doorstep.Sim1"


class SimControlError(RuntimeError):
    """A control call failed; ``name`` is the D-Bus error name."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name


class SimControl:
    """Client of ``org.doorstep.Sim1`` (same fault names as :class:`~bluezsim.Simulator`)."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus

    @classmethod
    async def connect(cls, bus_address: str) -> SimControl:
        bus = await MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect()
        return cls(bus)

    async def close(self) -> None:
        self._bus.disconnect()
        with contextlib.suppress(Exception):
            await self._bus.wait_for_disconnect()

    async def _call(self, member: str, signature: str = "", body: list[Any] | None = None) -> Any:
        reply = await self._bus.call(
            Message(destination=CONTROL_NAME, path=CONTROL_PATH, interface=CONTROL_IFACE,
                    member=member, signature=signature, body=body or [])
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise SimControlError(reply.error_name or "", str(reply.body[0] if reply.body else ""))
        return reply.body

    async def reset(self) -> None:
        await self._call("Reset")

    async def environment(self) -> dict[str, str]:
        return dict((await self._call("GetEnvironment"))[0])

    async def peripherals(self) -> list[tuple[str, str]]:
        return [(a, n) for a, n in (await self._call("ListPeripherals"))[0]]

    async def refuse_connect(self, target: str, times: int = 1) -> None:
        await self._call("RefuseConnect", "su", [target, times])

    async def delay_connect(self, target: str, seconds: float) -> None:
        await self._call("DelayConnect", "sd", [target, seconds])

    async def drop_link(self, target: str, when: str = "now") -> None:
        await self._call("DropLink", "ss", [target, when])

    async def att_error_next(self, target: str, code: int = att.UNLIKELY_ERROR) -> None:
        await self._call("AttErrorNext", "sy", [target, code])

    async def lose_notifications(self, target: str, count: int = 1) -> None:
        await self._call("LoseNotifications", "su", [target, count])

    async def set_rssi(self, target: str, rssi: int) -> None:
        await self._call("SetRssi", "sn", [target, rssi])

    async def set_in_range(self, target: str, in_range: bool) -> None:
        await self._call("SetInRange", "sb", [target, in_range])

    async def supervision_timeout(self, target: str) -> None:
        await self._call("SupervisionTimeout", "s", [target])

    async def set_timing(
        self, enabled: bool, interval_ms: float = 0.0, adv_interval_ms: float = 0.0
    ) -> None:
        """Switch the timing model; 0 keeps the current interval."""
        await self._call("SetTiming", "bdd", [enabled, interval_ms, adv_interval_ms])


class SimProcess:
    """``doorstep sim`` in a subprocess, with its control proxy."""

    def __init__(
        self,
        *,
        timing: bool | None = None,
        interval_ms: float | None = None,
        adv_interval_ms: float | None = None,
        mtu: int = att.MAX_MTU,
        extra_args: list[str] | None = None,
    ) -> None:
        args = ["--mtu", str(mtu)]
        if interval_ms is not None:
            args += ["--interval-ms", str(interval_ms)]
        if adv_interval_ms is not None:
            args += ["--adv-interval-ms", str(adv_interval_ms)]
        if timing is not None:
            args.append("--timing" if timing else "--no-timing")
        self._args = args + list(extra_args or [])
        self._proc: asyncio.subprocess.Process | None = None
        self.bus_address = ""
        self.shim_dir = ""
        self._control: SimControl | None = None

    @property
    def control(self) -> SimControl:
        assert self._control is not None, "simulator process not started"
        return self._control

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return child_environment(self.bus_address, self.shim_dir, base)

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bluezsim", *self._args,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout=20)
        except TimeoutError:
            await self.stop()
            raise RuntimeError("doorstep sim did not start") from None
        text = line.decode().strip()
        if not text.startswith("DBUS_SYSTEM_BUS_ADDRESS="):
            await self.stop()
            raise RuntimeError(f"doorstep sim failed to start: {text!r}")
        self.bus_address = text.split("=", 1)[1]
        self._control = await SimControl.connect(self.bus_address)
        self.shim_dir = (await self._control.environment())["BLUEZSIM_SHIM_DIR"]

    async def stop(self) -> int | None:
        if self._control is not None:
            await self._control.close()
            self._control = None
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        return proc.returncode

    async def __aenter__(self) -> SimProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
