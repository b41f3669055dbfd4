"""An in-memory "air" implementing the transport interface, for fast tests.

Same semantics as the BlueZ adapters where a test would notice: devices are
seen with name/state/flags/RSSI, a connected device takes one commissioner at
a time, writes are delivered in order, a disconnect on either side is seen by
the other, and the link MTU bounds fragment sizes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ble.errors import ConnectFailed, DeviceNotFound, Disconnected, LinkError, LinkTimeout
from ble.profile import DeviceInfo, DeviceStatus, Sighting
from ble.transport import FragmentIn, LinkDown, LinkUp, PeripheralEvent

DEFAULT_MTU = 247


@dataclass
class MemoryAir:
    """Joins in-memory peripherals and centrals."""

    mtu: int = DEFAULT_MTU
    peripherals: dict[str, MemoryPeripheral] = field(default_factory=dict)

    def central(self) -> MemoryCentral:
        return MemoryCentral(self)

    def peripheral(self, address: str, rssi: int = -50) -> MemoryPeripheral:
        p = MemoryPeripheral(self, address, rssi)
        return p


class MemoryLink:
    """The commissioner's end of an in-memory connection."""

    def __init__(self, peripheral: MemoryPeripheral, mtu: int) -> None:
        self.address = peripheral.address
        self._peripheral = peripheral
        self._mtu = mtu
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.connected = True

    @property
    def max_fragment(self) -> int:
        return self._mtu - 3

    async def read_info(self) -> DeviceInfo:
        self._check()
        return DeviceInfo.parse(self._peripheral.info_value())

    async def write(self, fragment: bytes) -> None:
        self._check()
        if len(fragment) > 512:
            raise LinkError("value longer than 512 bytes", code="att_invalid_length")
        self._peripheral.deliver(FragmentIn(bytes(fragment)))
        await asyncio.sleep(0)

    async def receive(self, timeout: float | None = None) -> bytes:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise LinkTimeout("no notification from the device in time") from None
        if item is None:
            self.connected = False
            raise Disconnected("the device disconnected")
        return item

    async def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self._peripheral.link_dropped(self)

    def _check(self) -> None:
        if not self.connected:
            raise Disconnected("not connected")

    # called by the peripheral
    def notified(self, fragment: bytes) -> None:
        self._inbox.put_nowait(fragment)

    def dropped(self) -> None:
        self.connected = False
        self._inbox.put_nowait(None)


class MemoryCentral:
    def __init__(self, air: MemoryAir) -> None:
        self._air = air

    async def scan(self, *, timeout: float | None = None) -> AsyncIterator[Sighting]:
        for p in list(self._air.peripherals.values()):
            if p.advertising:
                yield Sighting(p.address, p.name, p.rssi, p.status)
        if timeout:
            await asyncio.sleep(timeout)

    async def connect(self, address: str, *, timeout: float = 20.0) -> MemoryLink:
        p = self._air.peripherals.get(address)
        if p is None or not p.advertising:
            raise DeviceNotFound(f"no device {address} in range")
        if p.link is not None:
            raise ConnectFailed("the device already has a connection")
        link = MemoryLink(p, self._air.mtu)
        p.link_up(link)
        await asyncio.sleep(0)
        return link


class MemoryPeripheral:
    """A device's end: advertises, takes one link, notifies fragments."""

    def __init__(self, air: MemoryAir, address: str, rssi: int) -> None:
        self._air = air
        self.address = address
        self.rssi = rssi
        self.name = ""
        self.dev_id = b""
        self.status = DeviceStatus(0, 0)  # type: ignore[arg-type]
        self.advertising = False
        self.link: MemoryLink | None = None
        self._events: asyncio.Queue[PeripheralEvent] = asyncio.Queue()
        self._largest_fragment = 20

    @property
    def max_fragment(self) -> int:
        return self._largest_fragment

    def info_value(self) -> bytes:
        return self.status.info_value(self.dev_id)

    async def start(self, *, name: str, dev_id: bytes, status: DeviceStatus) -> None:
        self.name, self.dev_id, self.status = name, dev_id, status
        self.advertising = True
        self._air.peripherals[self.address] = self

    async def set_status(self, status: DeviceStatus) -> None:
        self.status = status

    async def next_event(self) -> PeripheralEvent:
        return await self._events.get()

    async def notify(self, fragment: bytes) -> None:
        if self.link is not None:
            self.link.notified(bytes(fragment))
        await asyncio.sleep(0)

    async def disconnect(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.dropped()
            self._events.put_nowait(LinkDown())

    async def stop(self) -> None:
        self.advertising = False
        await self.disconnect()
        self._air.peripherals.pop(self.address, None)

    # called by links
    def link_up(self, link: MemoryLink) -> None:
        self.link = link
        self._largest_fragment = 20
        self._events.put_nowait(LinkUp())

    def deliver(self, event: FragmentIn) -> None:
        # ATT_MTU is one value per link: a fragment of n bytes proves n fit.
        self._largest_fragment = max(self._largest_fragment, len(event.data))
        self._events.put_nowait(event)

    def link_dropped(self, link: MemoryLink) -> None:
        if self.link is link:
            self.link = None
            self._events.put_nowait(LinkDown())
