"""The DS1 BLE profile (PROTOCOL.md §2): UUIDs, the ``info`` value and advertisement contents."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

SERVICE_UUID = "a86b0001-afb3-421f-8c9f-85123f56ad4a"
INFO_UUID = "a86b0002-afb3-421f-8c9f-85123f56ad4a"
RX_UUID = "a86b0003-afb3-421f-8c9f-85123f56ad4a"
TX_UUID = "a86b0004-afb3-421f-8c9f-85123f56ad4a"
COMPANY_ID = 0xFFFF  # unassigned / test
PROFILE_VERSION = 1


class AdvState(IntEnum):
    UNPROVISIONED = 0
    PROVISIONED = 1
    BUSY = 2


FLAG_WINDOW_OPEN = 0x01
FLAG_BUTTON_NEEDED = 0x02


@dataclass(frozen=True)
class DeviceStatus:
    """What ``info`` and the manufacturer data say about a device."""

    state: AdvState
    flags: int

    @property
    def window_open(self) -> bool:
        return bool(self.flags & FLAG_WINDOW_OPEN)

    def manufacturer_data(self) -> bytes:
        """``u8 version ‖ u8 state ‖ u8 flags`` for company 0xFFFF."""
        return bytes((PROFILE_VERSION, int(self.state), self.flags))

    def info_value(self, dev_id: bytes) -> bytes:
        """The 19-byte ``info`` value: version, state, flags, dev_id."""
        return self.manufacturer_data() + dev_id

    @classmethod
    def from_manufacturer_data(cls, data: bytes) -> DeviceStatus | None:
        if len(data) < 3 or data[0] != PROFILE_VERSION:
            return None
        try:
            state = AdvState(data[1])
        except ValueError:
            return None
        return cls(state, data[2])


@dataclass(frozen=True)
class DeviceInfo:
    """A parsed ``info`` read."""

    status: DeviceStatus
    dev_id: bytes

    @classmethod
    def parse(cls, value: bytes) -> DeviceInfo:
        from ble.errors import LinkError

        status = DeviceStatus.from_manufacturer_data(value[:3])
        if len(value) != 19 or status is None:
            raise LinkError("the device's info characteristic is malformed", code="bad_info")
        return cls(status, bytes(value[3:]))


@dataclass(frozen=True)
class Sighting:
    """One device seen in a scan."""

    address: str
    name: str
    rssi: int
    status: DeviceStatus

    @property
    def bars(self) -> int:
        """Signal strength 0–4 from RSSI."""
        for bars, floor in ((4, -55), (3, -67), (2, -75), (1, -85)):
            if self.rssi >= floor:
                return bars
        return 0
