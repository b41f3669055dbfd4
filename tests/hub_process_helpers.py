"""A hub as its own ``doorstep hub run`` process on a ``demo.stack.Stack``, and how to read it.

``HubProcess`` makes the hub's factory record (``doorstep cloud factory new
--model "Doorstep Hub H1"``), starts and kills the hub, and reads what a user
would read: ``doorstep hub devices --json``, ``doorstep device show --json``.
``pair_hub`` onboards the hub with ``doorstep phone pair`` as the phone owner
would. Also used by ``bench/hub_throughput.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bluezsim.process import SimControl
from demo.stack import Proc, Stack, StackError, doorstep_cmd
from protocol.factory import FactoryRecord

HUB_MODEL = "Doorstep Hub H1"
HOME_SSID = "DoorstepHome"
HOME_PASSPHRASE = "correct horse battery"
PASSPHRASE_VAR = "DOORSTEP_TEST_WIFI_PASSPHRASE"

T = TypeVar("T")


async def stop_peers(stack: Stack, timeout: float = 10) -> None:
    """SIGTERM every hub and device at once and wait, before the simulator goes.

    ``Stack.stop`` signals the simulator together with the devices; a device
    whose bus vanishes first then ignores SIGTERM until ``Stack.stop`` kills
    it 8 s later, one device after another (reported as a product bug).
    """
    peers = [
        p for p in stack._procs if p.name not in ("sim", "cloud") and p.process.returncode is None
    ]
    for p in peers:
        p.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.process.pid, signal.SIGTERM)
    waits = [asyncio.wait_for(p.process.wait(), timeout) for p in peers]
    await asyncio.gather(*waits, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_stack(workdir: Path, **options: Any) -> AsyncIterator[Stack]:
    """A ``Stack`` whose hubs and devices stop before its simulator and cloud."""
    async with Stack(workdir, **options) as stack:
        try:
            yield stack
        finally:
            await stop_peers(stack)


@contextlib.asynccontextmanager
async def sim_control(stack: Stack) -> AsyncIterator[SimControl]:
    """The fault controls of the stack's ``doorstep sim`` (its ``org.doorstep.Sim1``)."""
    control = await SimControl.connect(stack.env["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        yield control
    finally:
        await control.close()


async def sim_address(stack: Stack, control: SimControl, name: str, timeout: float = 10) -> str:
    """The address the simulator gave the peripheral advertising as ``name``."""
    listed = await poll(
        control.peripherals,
        lambda ps: name in [n for _a, n in ps],
        timeout,
        what=f"{name} advertising in the simulator",
        stack=stack,
    )
    return next(a for a, n in listed if n == name)


async def poll(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float,
    *,
    every: float = 0.25,
    what: str = "condition",
    stack: Stack | None = None,
) -> T:
    """Call ``probe`` until ``done(result)``; the last result in the error otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if stack is not None:
            stack.check_alive()
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s; last: {value!r}")
        await asyncio.sleep(every)


async def run_cli(stack: Stack, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run one ``doorstep`` command against the stack: (exit code, stdout); stderr goes to the log."""
    full_env = stack.base_env()
    if env:
        full_env.update(env)
    log = stack.workdir / "logs" / "cli.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        handle.write(f"$ doorstep {' '.join(args)}\n".encode())
        handle.flush()
        process = await asyncio.create_subprocess_exec(
            *doorstep_cmd(*args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=handle,
            env=full_env,
        )
        out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def device_show(stack: Stack, state_dir: Path) -> dict[str, Any]:
    code, out = await run_cli(stack, "device", "show", "--state", str(state_dir), "--json")
    if code != 0:
        raise StackError(f"`doorstep device show` exited {code}")
    return dict(json.loads(out))


def write_wifi(path: Path, *, join_delay_ms: int = 0, dhcp_failure: bool = False) -> Path:
    """The shipped home (``device/default_wifi.json``) with this join delay and DHCP fault."""
    from importlib import resources

    env = json.loads(resources.files("device").joinpath("default_wifi.json").read_text("utf-8"))
    env["faults"].update(join_delay_ms=join_delay_ms, dhcp_failure=dhcp_failure)
    path.write_text(json.dumps(env))
    return path


class HubProcess:
    """One hub: its factory record, its state directory, its process (restartable)."""

    def __init__(self, stack: Stack, name: str = "hub") -> None:
        self.stack = stack
        self.name = name
        self.state_dir = stack.workdir / name / "state"
        self.factory_file: Path | None = None
        self.factory: FactoryRecord | None = None
        self.proc: Proc | None = None
        self.runs = 0

    @property
    def ble_name(self) -> str:
        assert self.factory is not None
        return self.factory.ble_name

    async def make_factory(self) -> FactoryRecord:
        out = self.stack.workdir / self.name / "factory"
        await self.stack._run(
            "cloud", "factory", "new", "--count", "1", "--out", str(out),
            "--model", HUB_MODEL, "--db", self.stack.db_url,
        )  # fmt: skip
        (self.factory_file,) = sorted(out.glob("*.json"))
        self.factory = FactoryRecord.loads(self.factory_file.read_text())
        return self.factory

    async def start(
        self,
        *,
        confirm: str = "accept",
        max_parallel: int = 4,
        attempts: int = 3,
        wifi: Path | None = None,
    ) -> Proc:
        if self.factory_file is None:
            await self.make_factory()
        assert self.factory_file is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "hub", "run", "--factory", str(self.factory_file), "--state", str(self.state_dir),
            "--confirm", confirm, "--max-parallel", str(max_parallel),
            "--attempts", str(attempts), "--cloud", self.stack.cloud_url,
        ]  # fmt: skip
        if wifi is not None:
            args += ["--wifi", str(wifi)]
        self.runs += 1
        self.proc = await self.stack._spawn(
            f"{self.name}-{self.runs}", doorstep_cmd(*args), self.stack.base_env()
        )
        return self.proc

    def log_text(self) -> str:
        return "" if self.proc is None else self.proc.log.read_text(errors="replace")

    async def wait_line(self, text: str, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            self.stack.check_alive()
            if time.monotonic() > deadline:
                tail = "\n  ".join(self.log_text().splitlines()[-8:])
                raise AssertionError(f"hub did not print {text!r} within {timeout:g} s:\n  {tail}")
            await asyncio.sleep(0.1)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        self.proc.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.process.pid, sig)
        await asyncio.wait_for(self.proc.process.wait(), 10)

    async def devices(self) -> list[dict[str, Any]]:
        """``doorstep hub devices --json`` (the latest row per device); [] before the first row."""
        if not (self.state_dir / "hub.db").exists():
            return []
        code, out = await run_cli(
            self.stack, "hub", "devices", "--state", str(self.state_dir), "--json"
        )
        if code != 0:
            raise StackError(f"`doorstep hub devices` exited {code}")
        return list(json.loads(out))

    async def rows(self) -> list[dict[str, Any]]:
        """Every attempt the hub recorded (the registry itself; the CLI shows only the latest)."""
        from hub.registry import HubRegistry

        if not (self.state_dir / "hub.db").exists():
            return []
        async with HubRegistry(self.state_dir / "hub.db") as registry:
            return [r.__dict__ for r in await registry.all()]


async def pair_hub(stack: Stack, hub: HubProcess, *, timeout: float = 60) -> dict[str, Any]:
    """``doorstep phone pair --json --yes`` for the hub with the demo user's token; its summary."""
    env = {
        PASSPHRASE_VAR: HOME_PASSPHRASE,
        "XDG_CONFIG_HOME": str(stack.workdir / "phone-config"),
        "DOORSTEP_CLOUD_URL": stack.cloud_url,
        "DOORSTEP_TOKEN": stack.token,
    }
    argv = [
        "phone", "pair", "--device", hub.ble_name, "--ssid", HOME_SSID,
        "--passphrase-env", PASSPHRASE_VAR, "--yes", "--json", "--scan-timeout", "30",
    ]  # fmt: skip
    code, out = await asyncio.wait_for(run_cli(stack, *argv, env=env), timeout)
    try:
        summary = dict(json.loads(out))
    except json.JSONDecodeError:
        raise AssertionError(f"`doorstep phone pair` exited {code} without a summary") from None
    summary["_exit_code"] = code
    return summary


async def onboarded_hub(
    stack: Stack, *, confirm: str = "accept", max_parallel: int = 4, attempts: int = 3
) -> HubProcess:
    """A hub started factory-fresh, paired by the phone, and now accepting devices."""
    hub = HubProcess(stack)
    await hub.start(confirm=confirm, max_parallel=max_parallel, attempts=attempts)
    await hub.wait_line("advertising as a device", timeout=30)
    summary = await pair_hub(stack, hub)
    assert summary["_exit_code"] == 0, summary
    await hub.wait_line("accepting devices", timeout=30)
    return hub


async def advertised(central: Any, seconds: float = 2.0) -> dict[str, Any]:
    """What a phone scanning for ``seconds`` sees: the latest sighting per advertised name."""
    seen: dict[str, Any] = {}
    async for sighting in central.scan(timeout=seconds):
        seen[sighting.name] = sighting
    return seen


def stored_state(state_dir: Path) -> str:
    """The ``state`` field of ``doorstep device show``, read from the device's store directly.

    The same read-only load the command does, without a process per poll.
    """
    from device.storage import DeviceStore

    state = DeviceStore(state_dir).load()
    return "active" if state.active else ("pending" if state.pending else "unprovisioned")
