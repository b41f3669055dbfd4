"""In-process entry point: ``async with Simulator() as sim:``.

Starts a private ``dbus-daemon``, serves the simulated BlueZ on it from the
current event loop, and (by default) points ``DBUS_SYSTEM_BUS_ADDRESS`` and
``PATH`` of the current process at it so bleak and bless in the same process
find it. Child processes get the same settings from :meth:`Simulator.env`.

Faults are plain methods (see :class:`Simulator`); ``target`` is a peripheral's
address or its advertised local name.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from types import TracebackType

from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from bluezsim import att
from bluezsim.busd import PrivateBus, child_environment
from bluezsim.service import SimulatedBluez
from bluezsim.timing import TimingModel


class Simulator:
    """A simulated BlueZ on its own private bus, running in this event loop."""

    def __init__(
        self,
        *,
        timing: TimingModel | None = None,
        mtu: int = att.MAX_MTU,
        seed: int = 0,
        rssi_jitter_db: int = 0,
        connect_timeout: float = 20.0,
        patch_environ: bool = True,
    ) -> None:
        self._timing = timing or TimingModel()
        self._mtu = att.check_mtu(mtu)
        self._rng = random.Random(seed)  # noqa: S311  (RSSI jitter, not secrets)
        self._rssi_jitter_db = rssi_jitter_db
        self._connect_timeout = connect_timeout
        self._patch_environ = patch_environ
        self._daemon = PrivateBus()
        self._bus: MessageBus | None = None
        self._service: SimulatedBluez | None = None
        self._saved_environ: dict[str, str | None] = {}

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        address = await self._daemon.start()
        try:
            self._bus = await MessageBus(
                bus_address=address, bus_type=BusType.SYSTEM, negotiate_unix_fd=True
            ).connect()
            self._service = SimulatedBluez(
                self._bus,
                timing=self._timing,
                mtu=self._mtu,
                rng=self._rng,
                connect_timeout=self._connect_timeout,
                environment={
                    "DBUS_SYSTEM_BUS_ADDRESS": address,
                    "BLUEZSIM_SHIM_DIR": self._daemon.shim_dir,
                },
            )
            self._service.rssi_jitter_db = self._rssi_jitter_db
            await self._service.start()
        except BaseException:
            await self.stop()
            raise
        if self._patch_environ:
            for key, value in self.env().items():
                if key in ("DBUS_SYSTEM_BUS_ADDRESS", "PATH"):
                    self._saved_environ[key] = os.environ.get(key)
                    os.environ[key] = value

    async def stop(self) -> None:
        for key, old in self._saved_environ.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._saved_environ.clear()
        if self._service is not None:
            await self._service.stop()
            self._service = None
        if self._bus is not None:
            self._bus.disconnect()
            await self._bus.wait_for_disconnect()
            self._bus = None
        await self._daemon.stop()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---------------------------------------------------------------- access

    @property
    def service(self) -> SimulatedBluez:
        assert self._service is not None, "simulator not started"
        return self._service

    @property
    def bus_address(self) -> str:
        return self._daemon.address

    @property
    def shim_dir(self) -> str:
        return self._daemon.shim_dir

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for child processes: bus address and the bluetoothctl shim."""
        return child_environment(self.bus_address, self.shim_dir, base)

    @property
    def timing(self) -> TimingModel:
        return self.service.timing

    def set_timing(
        self,
        enabled: bool,
        interval_ms: float | None = None,
        adv_interval_ms: float | None = None,
    ) -> None:
        """Switch the timing model (applies to existing links too)."""
        current = self.service.timing
        self.service.set_timing(replace(
            current,
            enabled=enabled,
            interval_ms=interval_ms or current.interval_ms,
            adv_interval_ms=adv_interval_ms or current.adv_interval_ms,
        ))

    def peripherals(self) -> list[tuple[str, str]]:
        """(address, advertised name) of every advertising adapter."""
        return self.service.peripherals()

    # ---------------------------------------------------------------- faults

    def refuse_connect(self, target: str, times: int = 1) -> None:
        """The next ``times`` connects fail: ``Failed: le-connection-abort-by-remote``."""
        self.service.refuse_connect(target, times)

    def delay_connect(self, target: str, seconds: float) -> None:
        """Every connect to ``target`` takes ``seconds`` longer."""
        self.service.delay_connect(target, seconds)

    async def drop_link(self, target: str, when: str = "now") -> None:
        """Drop the link now, or at the next write request ("before-write"/"after-write")."""
        await self.service.drop_link(target, when)

    def att_error_next(self, target: str, code: int = att.UNLIKELY_ERROR) -> None:
        """The next ATT request to ``target`` gets an ATT error response."""
        self.service.att_error_next(target, code)

    def lose_notifications(self, target: str, count: int = 1) -> None:
        """The next ``count`` notifications from ``target`` are lost on air."""
        self.service.lose_notifications(target, count)

    def set_rssi(self, target: str, rssi: int) -> None:
        self.service.set_rssi(target, rssi)

    def set_in_range(self, target: str, in_range: bool) -> None:
        """Out of range: invisible to scans, connects time out, links hit supervision timeout."""
        self.service.set_in_range(target, in_range)

    def supervision_timeout(self, target: str) -> None:
        """Links to ``target`` go silent; disconnect after the supervision timeout."""
        self.service.supervision_timeout(target)

    async def reset(self) -> None:
        """Drop all links, clear faults, forget discovered devices."""
        await self.service.reset()
