"""Helpers for the BlueZ adapter tests: a device process, a factory file, scanning by name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from ble.bleak_central import BleakCentral, BleakLink
from ble.profile import AdvState, Sighting
from ds1_pair import LocalCloud, make_factory
from onboarding_helpers import LocalBindService, ScriptedCommissioner
from phone.commissioner import NetworkChoice, Onboarding, OnboardingReport
from protocol.factory import FactoryRecord

DEVICE_PROC = str(Path(__file__).with_name("ble_device_proc.py"))
GOOD = NetworkChoice(b"DoorstepHome", "correct horse battery", 1)


def write_factory(directory: Path, seed: int = 1) -> tuple[FactoryRecord, Path]:
    factory = make_factory(seed)
    path = directory / f"factory-{seed}.json"
    path.write_text(factory.dumps())
    return factory, path


class DeviceProcess:
    """``tests/ble_device_proc.py`` as a subprocess (async context manager)."""

    def __init__(self, env: dict[str, str], factory_path: Path, state_dir: Path) -> None:
        self.env = env
        self.factory_path = factory_path
        self.state_dir = state_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self.name = ""
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DeviceProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.lines.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            DEVICE_PROC,
            str(self.factory_path),
            str(self.state_dir),
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        line = await self.wait_line("READY", timeout=30)
        _, self.address, self.name = line.split()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                self._new_line.set()
                return
            self.lines.append(raw.decode().strip())
            self._new_line.set()

    async def wait_line(self, prefix: str, *, timeout: float = 10, after: int = 0) -> str:
        """The first output line (index ≥ ``after``) starting with ``prefix``."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[after:]:
                    if line.startswith(prefix):
                        return line
                if self.proc is None or (self._reader is not None and self._reader.done()):
                    raise RuntimeError(f"device process ended; output {self.lines!r}")
                self._new_line.clear()
                await self._new_line.wait()

    async def command(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        mark = len(self.lines)
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        await self.wait_line(f"OK {text}", after=mark)

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


async def find(
    central: BleakCentral, name: str, *, state: AdvState | None = None, timeout: float = 10
) -> Sighting:
    """Scan until ``name`` is seen (in ``state`` if given)."""
    async with contextlib.aclosing(central.scan(timeout=timeout)) as sightings:
        async for sighting in sightings:
            if sighting.name == name and (state is None or sighting.status.state is state):
                return sighting
    raise AssertionError(f"{name} not seen{'' if state is None else f' in state {state.name}'}")


async def onboard(
    central: BleakCentral,
    factory: FactoryRecord,
    address: str,
    *,
    delegate: ScriptedCommissioner | None = None,
) -> tuple[OnboardingReport, LocalBindService]:
    cloud = LocalBindService(LocalCloud(factory))
    delegate = delegate or ScriptedCommissioner(choices=[GOOD])
    report = await Onboarding(central, cloud, delegate, wait_checkin_s=0).run(address)
    return report, cloud


@contextlib.asynccontextmanager
async def scanning(central: BleakCentral) -> AsyncIterator[list[Sighting]]:
    """Scan in the background; yields the list the sightings accumulate in."""
    seen: list[Sighting] = []

    async def run() -> None:
        async for s in central.scan():
            seen.append(s)

    task = asyncio.create_task(run())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class RecordingCentral(BleakCentral):
    """A ``BleakCentral`` that keeps the links it made (to check fragment sizes)."""

    def __init__(self, adapter: str | None = None, **kwargs: Any) -> None:
        super().__init__(adapter, **kwargs)
        self.links: list[BleakLink] = []

    async def connect(self, address: str, *, timeout: float = 20.0) -> BleakLink:
        link = await super().connect(address, timeout=timeout)
        self.links.append(link)
        return link


@contextlib.contextmanager
def bus_environment(env: dict[str, str]) -> Iterator[None]:
    """Point this process's bleak at a simulator (bus address and bluetoothctl shim)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


CENTRAL_PROC = str(Path(__file__).with_name("ble_central_proc.py"))


async def central_process(
    env: dict[str, str], address: str, mode: str, timeout: float = 10.0
) -> asyncio.subprocess.Process:
    """Start ``tests/ble_central_proc.py`` (another process, hence another BlueZ adapter)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        CENTRAL_PROC,
        address,
        mode,
        str(timeout),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )


async def read_line(proc: asyncio.subprocess.Process, timeout: float = 15) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
