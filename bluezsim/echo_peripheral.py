"""A reference DS1-shaped bless peripheral for tests, benchmarks and demos.

It hosts the DS1 service ``a86b0001-…`` with:

* ``rx`` (``…0002``, write / write-without-response): every write is echoed
  back as a notification on ``tx`` (the request/response pattern DS1 uses);
* ``tx`` (``…0003``, read / notify);
* ``info`` (``…0004``, read): a fixed 19-byte value;
* ``long`` (``…0005``, read): a value longer than a 23-byte MTU allows in one
  read, to exhibit bless's long-read quirk (it ignores ``offset``).

It advertises the DS1 advertisement: flags, the 128-bit service UUID and
manufacturer data for company 0xFFFF (3 bytes), 28 bytes in all, with the
local name ``Doorstep-XXXX`` in the scan response. bless has no public API for
manufacturer data, so :func:`start_advertising` repeats bless's own
``start()`` steps with the property set before registration.

Run ``python -m bluezsim.echo_peripheral --count N`` to host N peripherals,
each with its own bless server and bus connection (hence its own simulated
adapter). It prints ``READY <name>`` per peripheral, then serves until
SIGTERM/SIGINT or until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

DS1_SERVICE = "a86b0001-afb3-421f-8c9f-85123f56ad4a"
RX_CHAR = "a86b0002-afb3-421f-8c9f-85123f56ad4a"
TX_CHAR = "a86b0003-afb3-421f-8c9f-85123f56ad4a"
INFO_CHAR = "a86b0004-afb3-421f-8c9f-85123f56ad4a"
LONG_CHAR = "a86b0005-afb3-421f-8c9f-85123f56ad4a"
COMPANY_ID = 0xFFFF
INFO_VALUE = b"DS1 echo peripheral"  # 19 bytes
LONG_VALUE = bytes(range(40))


class EchoPeripheral:
    """One bless server (one bus connection, one simulated adapter)."""

    def __init__(
        self,
        name: str,
        *,
        manufacturer_data: bytes = b"\x01\x02\x03",
        service_uuid: str = DS1_SERVICE,
        on_write: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name
        self.manufacturer_data = manufacturer_data
        self.service_uuid = service_uuid
        self.writes: list[bytes] = []
        self._on_write = on_write
        self.server: Any = None

    async def start(self) -> None:
        from bless import (  # type: ignore[attr-defined]
            BlessServer,
            GATTAttributePermissions,
            GATTCharacteristicProperties,
        )

        from ble.bless_peripheral import place_application

        server = BlessServer(name=self.name)
        self.server = server
        await server.setup_task
        place_application(server.app, self.name)  # out of /org/bluez, as our device's
        server.read_request_func = self._read
        server.write_request_func = self._write
        props = GATTCharacteristicProperties
        perms = GATTAttributePermissions
        await server.add_new_service(self.service_uuid)
        await server.add_new_characteristic(
            self.service_uuid, RX_CHAR,
            props.write | props.write_without_response, None, perms.writeable,
        )
        await server.add_new_characteristic(
            self.service_uuid, TX_CHAR, props.read | props.notify, bytearray(), perms.readable,
        )
        await server.add_new_characteristic(
            self.service_uuid, INFO_CHAR, props.read, bytearray(INFO_VALUE), perms.readable,
        )
        await server.add_new_characteristic(
            self.service_uuid, LONG_CHAR, props.read, bytearray(LONG_VALUE), perms.readable,
        )
        await start_advertising(server, {COMPANY_ID: self.manufacturer_data})

    async def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop()
            with contextlib.suppress(Exception):
                self.server.bus.disconnect()

    def _read(self, characteristic: Any, **_kwargs: Any) -> bytearray:
        return bytearray(characteristic.value)

    def _write(self, characteristic: Any, value: Any, **_kwargs: Any) -> None:
        characteristic.value = value
        if str(characteristic.uuid).lower() != RX_CHAR:
            return
        data = bytes(value)
        self.writes.append(data)
        if self._on_write is not None:
            self._on_write(data)
        tx = self.server.get_characteristic(TX_CHAR)
        tx.value = bytearray(data)
        self.server.update_value(self.service_uuid, TX_CHAR)


async def start_advertising(server: Any, manufacturer_data: dict[int, bytes]) -> None:
    """bless's ``start()`` with manufacturer data added to the advertisement."""
    from bless.backends.bluezdbus.dbus.advertisement import (  # type: ignore[import-untyped]
        BlueZLEAdvertisement,
        Type,
    )
    from dbus_next.signature import Variant  # type: ignore[import-untyped]

    await server.setup_task
    server.bus.export(server.app.path, server.app)
    await server.app.register(server.adapter)
    app = server.app
    await app.set_name(server.adapter, app.app_name)
    advertisement = BlueZLEAdvertisement(Type.PERIPHERAL, len(app.advertisements) + 1, app)
    app.advertisements.append(advertisement)
    advertisement._service_uuids.append(app.services[0].UUID)
    advertisement._manufacturer_data = {
        company: Variant("ay", bytes(data)) for company, data in manufacturer_data.items()
    }
    server.bus.export(advertisement.path, advertisement)
    iface = server.adapter.get_interface("org.bluez.LEAdvertisingManager1")
    await iface.call_register_advertisement(advertisement.path, {})


def peripheral_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:04X}"


async def serve(count: int, prefix: str, first: int, manufacturer_data: bytes) -> int:
    peripherals = [
        EchoPeripheral(peripheral_name(prefix, first + i), manufacturer_data=manufacturer_data)
        for i in range(count)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(sys.stdin.fileno(), _stdin_watch(stop))
    try:
        for peripheral in peripherals:
            await peripheral.start()
            print(f"READY {peripheral.name}", flush=True)
        print("ALL READY", flush=True)
        await stop.wait()
    finally:
        loop.remove_reader(sys.stdin.fileno())
        for peripheral in peripherals:
            await peripheral.stop()
    return 0


def _stdin_watch(stop: asyncio.Event) -> Callable[[], None]:
    def on_readable() -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            stop.set()

    return on_readable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--prefix", default="Doorstep-")
    parser.add_argument("--first", type=lambda s: int(s, 0), default=1)
    parser.add_argument("--mfr", default="010203", help="manufacturer data (hex)")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.count, args.prefix, args.first, bytes.fromhex(args.mfr)))


if __name__ == "__main__":
    sys.exit(main())


class EchoPeripheralProcess:
    """``python -m bluezsim.echo_peripheral`` as a subprocess (async context manager)."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        count: int = 1,
        prefix: str = "Doorstep-",
        first: int = 1,
        manufacturer_data: bytes = b"\x01\x02\x03",
    ) -> None:
        self._env = env
        self._args = [
            "--count", str(count), "--prefix", prefix, "--first", str(first),
            "--mfr", manufacturer_data.hex(),
        ]
        self.names = [peripheral_name(prefix, first + i) for i in range(count)]
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> EchoPeripheralProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bluezsim.echo_peripheral", *self._args,
            env=self._env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=60)
            if not line:
                raise RuntimeError("echo peripheral process exited before it was ready")
            if line.strip() == b"ALL READY":
                return self

    async def __aexit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
