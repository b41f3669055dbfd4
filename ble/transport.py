"""The transport interface both roles program against (STYLE.md §6).

Commissioners use a ``Central`` to scan and connect, getting a
``CentralLink``; devices use a ``Peripheral``. Implementations: ``memory``
(in-process pair), ``bleak_central`` and ``bless_peripheral`` (BlueZ).
Fragments are §3 fragments; the protocol core does the framing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ble.profile import DeviceInfo, DeviceStatus, Sighting


class CentralLink(Protocol):
    """One connection from a commissioner to a device."""

    address: str

    @property
    def max_fragment(self) -> int:
        """ATT_MTU − 3 for this link."""
        ...

    async def read_info(self) -> DeviceInfo: ...

    async def write(self, fragment: bytes) -> None:
        """Write-with-response to ``rx``."""
        ...

    async def receive(self, timeout: float | None = None) -> bytes:
        """The next ``tx`` notification; raises ``Disconnected``/``LinkTimeout``."""
        ...

    async def disconnect(self) -> None: ...


class Central(Protocol):
    """A commissioner's radio."""

    def scan(self, *, timeout: float | None = None) -> AsyncIterator[Sighting]:
        """Doorstep devices as they are seen (repeated sightings update RSSI)."""
        ...

    async def connect(self, address: str, *, timeout: float = 20.0) -> CentralLink:
        """Connect, enable ``tx`` notifications, learn the MTU."""
        ...


@dataclass(frozen=True)
class LinkUp:
    """A commissioner connected (subscribed to ``tx``)."""


@dataclass(frozen=True)
class FragmentIn:
    data: bytes


@dataclass(frozen=True)
class LinkDown:
    """The commissioner disconnected."""


PeripheralEvent = LinkUp | FragmentIn | LinkDown


class Peripheral(Protocol):
    """A device's radio: GATT server plus advertiser."""

    async def start(self, *, name: str, dev_id: bytes, status: DeviceStatus) -> None: ...

    async def set_status(self, status: DeviceStatus) -> None:
        """Update ``info`` and the advertisement's manufacturer data."""
        ...

    async def next_event(self) -> PeripheralEvent: ...

    async def notify(self, fragment: bytes) -> None:
        """Notify one fragment on ``tx``."""
        ...

    async def disconnect(self) -> None:
        """Drop the current commissioner's link (the session closed)."""
        ...

    async def stop(self) -> None: ...

    @property
    def max_fragment(self) -> int:
        """The largest fragment the current link is known to carry."""
        ...


FragmentSink = Callable[[bytes], None]
