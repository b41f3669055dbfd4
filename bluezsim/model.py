"""The simulated world: adapters (controllers), what they advertise and host,
and what each adapter's owner sees of the others.

Everything here is plain data; :mod:`bluezsim.service` mutates it and emits
the matching D-Bus signals. Object paths follow BlueZ:
``/org/bluez/hci0/dev_XX_XX_XX_XX_XX_XX/serviceXXXX/charXXXX/descXXXX`` with
handles in hex (bleak parses the last four digits as the handle, and strips
21 characters from a characteristic path to find its device).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from bluezsim.addata import AdvertisementContent
from bluezsim.link import Link

ADAPTER_PATH = "/org/bluez/hci0"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"
#: Handles 0x0001…0x0009 belong to the GAP and GATT services BlueZ hosts itself.
FIRST_APP_HANDLE = 0x000A

DEFAULT_RSSI = -55


def device_path(address: str) -> str:
    return f"{ADAPTER_PATH}/dev_{address.replace(':', '_')}"


@dataclass
class Advertisement:
    """A registered ``LEAdvertisement1`` object and what it puts on air."""

    owner: str
    path: str
    content: AdvertisementContent
    interval: float


@dataclass
class AppDescriptor:
    path: str
    uuid: str
    flags: list[str]
    handle: int = 0


@dataclass
class AppCharacteristic:
    path: str
    uuid: str
    flags: list[str]
    descriptors: list[AppDescriptor] = field(default_factory=list)
    handle: int = 0  # declaration handle
    value_handle: int = 0
    cccd_handle: int | None = None

    @property
    def notifiable(self) -> bool:
        return "notify" in self.flags or "indicate" in self.flags


@dataclass
class AppService:
    path: str
    uuid: str
    primary: bool
    characteristics: list[AppCharacteristic] = field(default_factory=list)
    handle: int = 0


@dataclass
class GattApplication:
    """A GATT application registered with ``GattManager1.RegisterApplication``."""

    owner: str
    root: str
    services: list[AppService]

    def assign_handles(self, first: int) -> int:
        """Allocate ATT handles like BlueZ's database; returns the next free handle."""
        handle = first
        for service in self.services:
            service.handle = handle
            handle += 1
            for char in service.characteristics:
                char.handle = handle
                char.value_handle = handle + 1
                handle += 2
                if char.notifiable:
                    char.cccd_handle = handle
                    handle += 1
                for desc in char.descriptors:
                    desc.handle = handle
                    handle += 1
        return handle

    def characteristic(self, path: str) -> AppCharacteristic | None:
        for service in self.services:
            for char in service.characteristics:
                if char.path == path:
                    return char
        return None


@dataclass
class PeripheralFaults:
    """Faults armed against one peripheral adapter (any central)."""

    refuse_connect: int = 0
    connect_delay: float = 0.0
    drop_on_write: str | None = None  # "before-write" | "after-write"
    att_error: int | None = None
    lose_notifications: int = 0
    in_range: bool = True
    rssi: int = DEFAULT_RSSI


@dataclass
class RemoteDescriptor:
    path: str
    uuid: str
    char_path: str
    app: AppDescriptor | None  # None: the CCCD BlueZ adds itself
    value: bytes = b""


@dataclass
class RemoteCharacteristic:
    path: str
    service_path: str
    app: AppCharacteristic
    value: bytes = b""
    notify_sessions: set[str] = field(default_factory=set)
    notify_fd: int | None = None
    write_fd: int | None = None
    reading: bool = False
    writing: bool = False

    @property
    def notifying(self) -> bool:
        return bool(self.notify_sessions) or self.notify_fd is not None


@dataclass
class RemoteService:
    path: str
    device_path: str
    app: AppService


@dataclass
class RemoteDevice:
    """What one adapter's owner sees of another adapter (``Device1``)."""

    view: Adapter
    address: str
    name: str | None = None
    uuids: list[str] = field(default_factory=list)
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    rssi: int | None = None
    connected: bool = False
    services_resolved: bool = False
    paired: bool = False
    trusted: bool = False
    blocked: bool = False
    alias_override: str | None = None
    link: Link | None = None
    connecting: asyncio.Task[None] | None = None
    services: dict[str, RemoteService] = field(default_factory=dict)
    characteristics: dict[str, RemoteCharacteristic] = field(default_factory=dict)
    descriptors: dict[str, RemoteDescriptor] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return device_path(self.address)

    @property
    def alias(self) -> str:
        if self.alias_override:
            return self.alias_override
        return self.name or self.address.replace(":", "-")

    def properties(self) -> dict[str, Variant]:
        props: dict[str, Variant] = {
            "Address": Variant("s", self.address),
            "AddressType": Variant("s", "public"),
            "Alias": Variant("s", self.alias),
            "Paired": Variant("b", self.paired),
            "Bonded": Variant("b", self.paired),
            "Trusted": Variant("b", self.trusted),
            "Blocked": Variant("b", self.blocked),
            "LegacyPairing": Variant("b", False),
            "Connected": Variant("b", self.connected),
            "UUIDs": Variant("as", list(self.uuids)),
            "Adapter": Variant("o", ADAPTER_PATH),
            "ManufacturerData": Variant(
                "a{qv}", {k: Variant("ay", v) for k, v in self.manufacturer_data.items()}
            ),
            "ServiceData": Variant(
                "a{sv}", {k: Variant("ay", v) for k, v in self.service_data.items()}
            ),
            "ServicesResolved": Variant("b", self.services_resolved),
            "AdvertisingFlags": Variant("ay", b"\x06"),
        }
        if self.name is not None:
            props["Name"] = Variant("s", self.name)
        if self.rssi is not None:
            props["RSSI"] = Variant("n", self.rssi)
        return props


@dataclass
class Adapter:
    """A simulated controller; it also holds its owner's view of the air."""

    serial: int
    address: str
    owner: str
    created: float
    alias: str = ""
    powered: bool = True
    discoverable: bool = False
    pairable: bool = True
    discovery_sessions: set[str] = field(default_factory=set)
    discovery_filter: dict[str, Any] = field(default_factory=dict)
    advertisements: dict[tuple[str, str], Advertisement] = field(default_factory=dict)
    applications: dict[tuple[str, str], GattApplication] = field(default_factory=dict)
    devices: dict[str, RemoteDevice] = field(default_factory=dict)
    links: set[Link] = field(default_factory=set)
    faults: PeripheralFaults = field(default_factory=PeripheralFaults)
    next_handle: int = FIRST_APP_HANDLE
    adv_phase: float = 0.0
    pending_sightings: set[asyncio.TimerHandle] = field(default_factory=set)

    @property
    def path(self) -> str:
        return ADAPTER_PATH

    @property
    def name(self) -> str:
        return f"bluezsim-{self.serial}"

    @property
    def discovering(self) -> bool:
        return bool(self.discovery_sessions)

    def advertisement(self) -> Advertisement | None:
        """The advertisement a scanner sees (the first registered one)."""
        for adv in self.advertisements.values():
            return adv
        return None

    def advertised_name(self) -> str | None:
        adv = self.advertisement()
        if adv is None:
            return None
        return adv.content.scan_response_name()[0] or None

    def adapter_properties(self) -> dict[str, Variant]:
        return {
            "Address": Variant("s", self.address),
            "AddressType": Variant("s", "public"),
            "Name": Variant("s", self.name),
            "Alias": Variant("s", self.alias or self.name),
            "Class": Variant("u", 0),
            "Powered": Variant("b", self.powered),
            "PowerState": Variant("s", "on" if self.powered else "off"),
            "Discoverable": Variant("b", self.discoverable),
            "DiscoverableTimeout": Variant("u", 180),
            "Pairable": Variant("b", self.pairable),
            "PairableTimeout": Variant("u", 0),
            "Discovering": Variant("b", self.discovering),
            "UUIDs": Variant("as", []),
            "Modalias": Variant("s", "usb:v1D6Bp0246d0542"),
            "Roles": Variant("as", ["central", "peripheral"]),
        }

    def advertising_manager_properties(self) -> dict[str, Variant]:
        return {
            "ActiveInstances": Variant("y", len(self.advertisements)),
            "SupportedInstances": Variant("y", max(0, 4 - len(self.advertisements))),
            "SupportedIncludes": Variant("as", ["tx-power", "appearance", "local-name"]),
            "SupportedSecondaryChannels": Variant("as", []),
        }


def plain(value: Any) -> Any:
    """Recursively unwrap dbus-fast Variants."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
