"""Advertising-data sizing, as BlueZ builds AD structures for ``LEAdvertisement1``.

BlueZ (``src/advertising.c``, ``src/shared/ad.c``) turns the properties of a
registered ``org.bluez.LEAdvertisement1`` object into Advertising Data (AD)
structures — each ``length(1) | type(1) | payload`` — and refuses the
registration when the legacy 31-byte advertising PDU or scan response would
overflow (Core Spec v5.3, Vol 3, Part C, §11). This module reproduces the
byte counting without any I/O, so the simulator rejects exactly the
advertisements a real adapter would.

Layout used (legacy advertising, peripheral type):

* advertising data: Flags (3 bytes, added by the kernel for connectable
  advertisements), service UUIDs grouped by size, solicit UUIDs, manufacturer
  data, service data, appearance, raw ``Data`` entries, TX power if included;
* scan response: the local name (shortened to fit, as BlueZ does).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

#: Legacy advertising PDU payload limit (Core Spec v5.3, Vol 6, Part B, §2.3.1.1).
MAX_ADV_DATA_LEN = 31
#: Legacy scan response payload limit.
MAX_SCAN_RSP_LEN = 31

AD_HEADER = 2  # length byte + AD type byte
FLAGS_AD_LEN = 3
BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"


class AdvertisementTooLong(ValueError):
    """The AD structures do not fit into a legacy PDU."""

    def __init__(self, part: str, length: int, limit: int) -> None:
        super().__init__(f"{part} is {length} bytes, limit {limit}")
        self.part = part
        self.length = length
        self.limit = limit


def uuid_size(uuid: str) -> int:
    """Bytes a UUID takes on air: 2 or 4 for Bluetooth-base UUIDs, else 16."""
    text = str(uuidlib.UUID(uuid)) if len(uuid) > 8 else uuid.lower()
    if len(text) <= 4:
        return 2
    if len(text) <= 8:
        return 4
    if text.endswith(BASE_UUID_SUFFIX):
        return 2 if text.startswith("0000") else 4
    return 16


@dataclass(frozen=True)
class AdvertisementContent:
    """The parts of an ``LEAdvertisement1`` that end up on air."""

    connectable: bool = True
    service_uuids: tuple[str, ...] = ()
    solicit_uuids: tuple[str, ...] = ()
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    local_name: str | None = None
    appearance: int | None = None
    include_tx_power: bool = False
    raw_data: Mapping[int, bytes] = field(default_factory=dict)

    def adv_data_length(self) -> int:
        """Length of the advertising PDU payload BlueZ would generate."""
        length = FLAGS_AD_LEN if self.connectable else 0
        length += _uuid_list_length(self.service_uuids)
        length += _uuid_list_length(self.solicit_uuids)
        for data in self.manufacturer_data.values():
            length += AD_HEADER + 2 + len(data)
        for uuid, data in self.service_data.items():
            length += AD_HEADER + uuid_size(uuid) + len(data)
        if self.appearance is not None and self.appearance != 0xFFFF:
            length += AD_HEADER + 2
        if self.include_tx_power:
            length += AD_HEADER + 1
        for data in self.raw_data.values():
            length += AD_HEADER + len(data)
        return length

    def scan_response_name(self) -> tuple[str, bool]:
        """The name that fits the scan response and whether it was shortened."""
        name = self.local_name or ""
        room = MAX_SCAN_RSP_LEN - AD_HEADER
        encoded = name.encode()
        if len(encoded) <= room:
            return name, False
        return encoded[:room].decode(errors="ignore"), True

    def scan_response_length(self) -> int:
        """Length of the scan response payload (the local name, if any)."""
        if not self.local_name:
            return 0
        name, _ = self.scan_response_name()
        return AD_HEADER + len(name.encode())

    def check(self) -> None:
        """Raise :class:`AdvertisementTooLong` if either PDU overflows."""
        adv = self.adv_data_length()
        if adv > MAX_ADV_DATA_LEN:
            raise AdvertisementTooLong("advertising data", adv, MAX_ADV_DATA_LEN)
        rsp = self.scan_response_length()
        if rsp > MAX_SCAN_RSP_LEN:
            raise AdvertisementTooLong("scan response", rsp, MAX_SCAN_RSP_LEN)


def _uuid_list_length(uuids: Iterable[str]) -> int:
    sizes: dict[int, int] = {}
    for uuid in uuids:
        size = uuid_size(uuid)
        sizes[size] = sizes.get(size, 0) + 1
    return sum(AD_HEADER + size * count for size, count in sizes.items())
