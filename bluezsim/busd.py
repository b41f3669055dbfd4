"""A private ``dbus-daemon`` acting as the system bus, and the ``bluetoothctl`` shim.

The daemon gets its own temporary directory holding the socket, the
configuration and ``bin/bluetoothctl``. The configuration lets anyone own any
name (so the simulator can own ``org.bluez``) and pass unix file descriptors
(``AcquireWrite``/``AcquireNotify``). Beware: dbus-daemon's XML parser rejects
a double hyphen inside a comment, so the configuration carries no comments.

The shim prints ``bluetoothctl: 5.66``: bleak runs ``bluetoothctl --version``
once per process and refuses to connect below 5.55. Processes using the
simulator get the shim directory prepended to ``PATH`` (see
:func:`child_environment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import IO

DBUS_DAEMON = "dbus-daemon"
BLUEZ_VERSION = "5.66"

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow receive_type="*"/>
  </policy>
  <limit name="max_connections_per_user">4096</limit>
  <limit name="max_completed_connections">4096</limit>
  <limit name="max_incomplete_connections">512</limit>
  <limit name="max_match_rules_per_connection">4096</limit>
  <limit name="max_replies_per_connection">4096</limit>
  <limit name="max_incoming_unix_fds">1024</limit>
  <limit name="max_outgoing_unix_fds">1024</limit>
  <limit name="reply_timeout">60000</limit>
</busconfig>
"""

_SHIM = f"""#!/bin/sh
echo "bluetoothctl: {BLUEZ_VERSION}"
"""


def child_environment(
    bus_address: str, shim_dir: str, base: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for a process that should use the simulated BlueZ."""
    env = dict(os.environ if base is None else base)
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    path = env.get("PATH", "")
    env["PATH"] = f"{shim_dir}{os.pathsep}{path}" if path else shim_dir
    return env


def _die_with_parent(parent: int) -> None:
    """In the forked daemon, before exec: SIGTERM when the simulator dies (Linux).

    In its own session it is out of reach of signals sent to the simulator's
    group, so a simulator killed with SIGKILL (no ``stop``) left it running for
    good. Elsewhere, or if refused, it is stopped by ``stop`` only, as before.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the simulator died before the request took effect
        os._exit(0)


_PR_SET_PDEATHSIG = 1


class PrivateBus:
    """Owns one ``dbus-daemon`` process and its temporary directory."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.address: str = ""

    @property
    def shim_dir(self) -> str:
        assert self._dir is not None, "bus not started"
        return str(self._dir / "bin")

    async def start(self) -> str:
        """Start the daemon; returns its address."""
        if shutil.which(DBUS_DAEMON) is None:
            raise RuntimeError("dbus-daemon is not installed (Debian package dbus-daemon)")
        self._dir = Path(tempfile.mkdtemp(prefix="bluezsim-"))
        socket_path = self._dir / "system_bus_socket"
        config = self._dir / "bus.conf"
        config.write_text(_CONFIG.format(socket=socket_path))
        bin_dir = self._dir / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "bluetoothctl"
        shim.write_text(_SHIM)
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        with (self._dir / "dbus-daemon.log").open("wb") as daemon_log:
            self._proc = await self._spawn(config, daemon_log)
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout=10)
        except TimeoutError:
            await self.stop()
            raise RuntimeError("dbus-daemon did not report its address") from None
        self.address = line.decode().strip()
        if not self.address:
            log = (self._dir / "dbus-daemon.log").read_text(errors="replace").strip()
            await self.stop()
            raise RuntimeError(f"dbus-daemon failed to start: {log}")
        return self.address

    @staticmethod
    async def _spawn(config: Path, daemon_log: IO[bytes]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            DBUS_DAEMON,
            f"--config-file={config}",
            "--nofork",
            "--nopidfile",
            "--print-address=1",
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=daemon_log,
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )

    async def stop(self) -> None:
        """Terminate the daemon and remove the temporary directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
