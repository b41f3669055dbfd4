"""Start and stop the real processes of a Doorstep system on one machine.

``Stack`` runs ``doorstep sim`` (BLE), ``doorstep cloud serve`` on SQLite, and
any number of ``doorstep device run`` processes, each a separate OS process
as on real hardware. It is what ``doorstep demo``, ``bench/onboarding.py`` and
the multi-process tests use. Every process it starts is stopped on exit, also
when one of them dies or on Ctrl-C; nothing it starts outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from protocol.factory import FactoryRecord


def doorstep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "doorstep_cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StackError(Exception):
    """A process of the stack failed to start or died; the message says which and why."""


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path
    expected_exit: bool = False


@dataclass
class DeviceHandle:
    factory: FactoryRecord
    factory_file: Path
    state_dir: Path
    proc: Proc | None = None

    @property
    def name(self) -> str:
        return self.factory.ble_name


@dataclass
class Stack:
    workdir: Path
    timing: bool = True
    interval_ms: float = 30.0
    adv_interval_ms: float = 100.0
    mtu: int = 247
    wifi_file: Path | None = None
    device_confirm: str = "accept"
    model: str = "Doorstep Lamp L1"
    say: Callable[[str], None] = lambda _m: None
    env: dict[str, str] = field(default_factory=dict)
    cloud_url: str = ""
    token: str = ""
    devices: list[DeviceHandle] = field(default_factory=list)
    _procs: list[Proc] = field(default_factory=list)

    async def __aenter__(self) -> Stack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- processes -------------------------------------------------------------

    async def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=handle,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: we stop all of it
        )
        handle.close()
        proc = Proc(name, process, log)
        self._procs.append(proc)
        return proc

    async def _run(self, *args: str) -> str:
        """Run a one-shot ``doorstep`` command; its output, or StackError with its words."""
        process = await asyncio.create_subprocess_exec(
            *doorstep_cmd(*args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.base_env(),
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise StackError(f"`doorstep {' '.join(args[:3])}` failed: {err.decode().strip()}")
        return out.decode()

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["DOORSTEP_KEK_FILE"] = str(self.workdir / "kek")
        env["DOORSTEP_CLOUD_DB"] = self.db_url
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.workdir / 'cloud.db'}"

    def dead(self) -> list[Proc]:
        return [p for p in self._procs if p.process.returncode is not None and not p.expected_exit]

    def check_alive(self) -> None:
        dead = self.dead()
        if dead:
            p = dead[0]
            tail = p.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise StackError(
                f"{p.name} exited with status {p.process.returncode}:\n  " + "\n  ".join(tail)
            )

    # ---- start ---------------------------------------------------------------------

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.start_sim()
        await self.start_cloud()

    async def start_sim(self) -> None:
        args = ["sim", "--mtu", str(self.mtu)]
        if self.timing:
            args += [
                "--timing",
                "--interval-ms",
                str(self.interval_ms),
                "--adv-interval-ms",
                str(self.adv_interval_ms),
            ]
        else:
            args += ["--no-timing"]
        proc = await self._spawn("sim", doorstep_cmd(*args), self.base_env())
        address = await self._wait_for_line(proc, "DBUS_SYSTEM_BUS_ADDRESS=", timeout=20)
        self.env["DBUS_SYSTEM_BUS_ADDRESS"] = address.split("=", 1)[1]
        shim = await self._wait_for_line(proc, "BLUEZSIM_SHIM_DIR=", timeout=5, required=False)
        if shim:
            self.env["PATH"] = shim.split("=", 1)[1] + os.pathsep + os.environ.get("PATH", "")
        self.say(
            f"BLE simulator up (MTU {self.mtu}, "
            + (
                f"interval {self.interval_ms:g} ms, advertising {self.adv_interval_ms:g} ms)"
                if self.timing
                else "timing model off)"
            )
        )

    async def _wait_for_line(
        self, proc: Proc, prefix: str, timeout: float, required: bool = True
    ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in proc.log.read_text(errors="replace").splitlines():
                if prefix in line:
                    return line[line.index(prefix) :].strip()
            if proc.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if required:
            self.check_alive()
            raise StackError(f"{proc.name} did not print {prefix!r} within {timeout:.0f} s")
        return ""

    async def start_cloud(self) -> None:
        if not (self.workdir / "kek").exists():
            await self._run("cloud", "kek", "new", "--out", str(self.workdir / "kek"))
        await self._run("cloud", "migrate", "--db", self.db_url)
        out = await self._run("cloud", "user", "add", "demo", "--db", self.db_url)
        self.token = out.strip().splitlines()[-1].strip()
        port = free_port()
        self.cloud_url = f"http://127.0.0.1:{port}"
        await self._spawn(
            "cloud",
            doorstep_cmd("cloud", "serve", "--db", self.db_url, "--port", str(port)),
            self.base_env(),
        )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while True:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.cloud_url}/v1/health")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise StackError("the cloud did not answer /v1/health within 30 s")
                await asyncio.sleep(0.1)
        self.say(f"cloud up at {self.cloud_url} (SQLite at {self.workdir / 'cloud.db'})")

    async def add_devices(self, count: int, *, start: bool = True) -> list[DeviceHandle]:
        out_dir = self.workdir / "factory"
        before = set(out_dir.glob("*.json")) if out_dir.exists() else set()
        await self._run(
            "cloud",
            "factory",
            "new",
            "--count",
            str(count),
            "--out",
            str(out_dir),
            "--model",
            self.model,
            "--db",
            self.db_url,
        )
        new = sorted(set(out_dir.glob("*.json")) - before)
        handles = []
        for path in new:
            record = FactoryRecord.loads(path.read_text())
            handle = DeviceHandle(record, path, self.workdir / "devices" / record.dev_id.hex()[:8])
            handles.append(handle)
            self.devices.append(handle)
        if start:
            for handle in handles:
                await self.start_device(handle)
            await self.wait_devices_ready(handles)
        return handles

    async def start_device(self, handle: DeviceHandle, confirm: str | None = None) -> None:
        args = [
            "device",
            "run",
            "--factory",
            str(handle.factory_file),
            "--state",
            str(handle.state_dir),
            "--confirm",
            confirm or self.device_confirm,
            "--cloud",
            self.cloud_url,
        ]
        if self.wifi_file is not None:
            args += ["--wifi", str(self.wifi_file)]
        handle.state_dir.mkdir(parents=True, exist_ok=True)
        handle.proc = await self._spawn(
            f"device-{handle.name}", doorstep_cmd(*args), self.base_env()
        )

    async def wait_devices_ready(self, handles: list[DeviceHandle], timeout: float = 30) -> None:
        for handle in handles:
            assert handle.proc is not None
            await self._wait_for_line(handle.proc, "[device]", timeout)
        self.say(f"{len(handles)} device(s) advertising: " + ", ".join(h.name for h in handles))

    async def stop_device(self, handle: DeviceHandle, sig: int = signal.SIGTERM) -> None:
        if handle.proc is None:
            return
        handle.proc.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.proc.process.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle.proc.process.wait(), 10)

    # ---- stop --------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop everything in waves: devices and hubs, then the cloud, then the simulator.

        Each wave is signalled together and waited for before the next, so no
        device loses its D-Bus while it shuts down; stragglers get SIGKILL.
        """
        rank = {"sim": 2, "cloud": 1}
        for wave in (0, 1, 2):
            procs = [p for p in self._procs if rank.get(p.name, 0) == wave]
            for p in procs:
                p.expected_exit = True
                if p.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.process.pid, signal.SIGTERM)
            await asyncio.gather(*(self._reap(p) for p in procs))
        self._procs.clear()

    @staticmethod
    async def _reap(p: Proc, grace: float = 8.0) -> None:
        try:
            await asyncio.wait_for(p.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.process.pid, signal.SIGKILL)
            await p.process.wait()

    def describe(self) -> dict[str, object]:
        return {
            "cloud_url": self.cloud_url,
            "dbus": self.env.get("DBUS_SYSTEM_BUS_ADDRESS"),
            "devices": [h.name for h in self.devices],
            "logs": str(self.workdir / "logs"),
        }


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2)
