"""A commissioner's radio on BlueZ through bleak (PROTOCOL.md §2: scan, connect, GATT I/O).

``BleakCentral`` implements ``ble.transport.Central`` and ``BleakLink``
``ble.transport.CentralLink`` with bleak's Linux backend (real ``bluetoothd``
on a phone/hub, or ``bluezsim`` in tests). One ``BleakClient`` per link, so a
hub can hold several links in one process.

* ``scan()`` scans actively with a BlueZ discovery filter on the DS1 service
  UUID and yields a ``Sighting`` per advertisement report that carries valid
  manufacturer data for company 0xFFFF (name from the local name, RSSI); a
  device is reported again at every advertisement, with fresh RSSI/state.
* ``connect()`` refuses a device last seen advertising BUSY (``DeviceBusy``),
  retries transient BlueZ failures (``le-connection-abort-by-*``,
  ``InProgress``, "Not connected" while connecting) up to ``attempts`` times
  with a short back-off inside one overall ``timeout``, enables ``tx``
  notifications before it returns (so before the first write), and takes the
  link's ATT_MTU from BlueZ's ``MTU`` characteristic property (BlueZ ≥ 5.62
  exchanges the MTU before it resolves services).
* Every bleak/D-Bus exception is translated here into ``ble.errors``::

      not seen / unknown to BlueZ         → DeviceNotFound (13)
      refused or timed out after retries  → ConnectFailed (13)
      the link dropped                    → Disconnected (11)
      a request outstanding ≥ 1 s when
        the link dropped (supervision
        timeout), or no notification in
        time                              → LinkTimeout (13)
      an ATT error response               → LinkError code ``att_error_0x..`` (11)
      advertising BUSY                    → DeviceBusy (9)

Values written or notified are never logged: they carry credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import BlueZClientArgs, BlueZScannerArgs
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import (
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)

from ble.errors import (
    ConnectFailed,
    DeviceBusy,
    DeviceNotFound,
    Disconnected,
    LinkError,
    LinkTimeout,
)
from ble.profile import (
    COMPANY_ID,
    INFO_UUID,
    RX_UUID,
    SERVICE_UUID,
    TX_UUID,
    AdvState,
    DeviceInfo,
    DeviceStatus,
    Sighting,
)

log = logging.getLogger("doorstep.ble.central")

MIN_MTU = 23
MAX_VALUE = 512  # ATT attribute value limit (a long write carries up to this)
ATT_TRANSACTION_TIMEOUT_S = 30.0  # Core Spec Vol 3 Part F §3.3.3
# A request still unanswered this long when the link drops means the link went
# silent first: a supervision timeout, not a peer's disconnect.
SILENT_DROP_S = 1.0
_TRANSIENT = (
    "le-connection-abort-by-local",
    "le-connection-abort-by-remote",
    "not connected",
    "in progress",
    "inprogress",
    "software caused connection abort",
    "connection refused",
    "operation already in progress",
)


def _att_code(exc: BaseException) -> int | None:
    if isinstance(exc, BleakGATTProtocolError):
        return int(exc.code)
    return None


def _text(exc: BaseException) -> str:
    if isinstance(exc, BleakDBusError):
        return f"{exc.dbus_error} {exc.dbus_error_details or ''}".strip()
    return str(exc)


def _is_transient(exc: BaseException) -> bool:
    text = _text(exc).lower()
    return any(marker in text for marker in _TRANSIENT)


class BleakLink:
    """One connection to a Doorstep device (``CentralLink``)."""

    def __init__(self, client: BleakClient, address: str, mtu: int) -> None:
        self.address = address
        self.mtu = mtu
        self._client = client
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._connected = True
        self._closing = False
        self._drop_error: LinkError | None = None
        self._write_started: float | None = None
        self.largest_write = 0
        self.largest_notification = 0

    # ---- CentralLink ----------------------------------------------------------------

    @property
    def max_fragment(self) -> int:
        return self.mtu - 3

    @property
    def connected(self) -> bool:
        return self._connected

    async def read_info(self) -> DeviceInfo:
        self._check()
        try:
            value = await asyncio.wait_for(
                self._client.read_gatt_char(INFO_UUID), ATT_TRANSACTION_TIMEOUT_S
            )
        except Exception as exc:
            raise self._translate(exc, "reading info") from exc
        return DeviceInfo.parse(bytes(value))

    async def write(self, fragment: bytes) -> None:
        self._check()
        if len(fragment) > MAX_VALUE:
            raise LinkError("value longer than 512 bytes", code="att_invalid_length")
        self._write_started = time.monotonic()
        try:
            await asyncio.wait_for(
                self._client.write_gatt_char(RX_UUID, bytes(fragment), response=True),
                ATT_TRANSACTION_TIMEOUT_S,
            )
        except Exception as exc:
            raise self._translate(exc, "writing") from exc
        finally:
            self._write_started = None
        self.largest_write = max(self.largest_write, len(fragment))

    async def receive(self, timeout: float | None = None) -> bytes:
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise LinkTimeout("no notification from the device in time") from None
        if item is None:
            self._inbox.put_nowait(None)  # every later receive() fails the same way
            raise self._drop_error or Disconnected("the device disconnected")
        return item

    async def disconnect(self) -> None:
        if self._closing:
            return
        self._closing = True
        was_connected = self._connected
        self._connected = False
        try:
            await asyncio.wait_for(self._client.disconnect(), 10.0)
        except Exception as exc:
            log.debug("disconnect from %s: %s", self.address, type(exc).__name__)
        if was_connected:
            self._inbox.put_nowait(None)

    # ---- bleak callbacks --------------------------------------------------------------

    def _on_notification(self, _char: Any, data: bytearray) -> None:
        value = bytes(data)
        self.largest_notification = max(self.largest_notification, len(value))
        self._inbox.put_nowait(value)

    def _on_disconnected(self, _client: BleakClient) -> None:
        if not self._connected:
            return
        self._connected = False
        started = self._write_started
        if started is not None and time.monotonic() - started >= SILENT_DROP_S:
            self._drop_error = LinkTimeout("the link timed out (the device stopped answering)")
        else:
            self._drop_error = Disconnected("the device disconnected")
        self._inbox.put_nowait(None)

    # ---- helpers ----------------------------------------------------------------------

    def _check(self) -> None:
        if not self._connected:
            raise self._drop_error or Disconnected("not connected")

    def _translate(self, exc: BaseException, doing: str) -> LinkError:
        if isinstance(exc, LinkError):
            return exc
        code = _att_code(exc)
        if code is not None:
            return LinkError(
                f"ATT error 0x{code:02x} while {doing}", code=f"att_error_0x{code:02x}"
            )
        if isinstance(exc, TimeoutError):
            return LinkTimeout(f"no ATT response while {doing}")
        text = _text(exc).lower()
        if not self._connected or "not connected" in text or isinstance(exc, EOFError):
            started = self._write_started
            if self._drop_error is not None:
                return self._drop_error
            if started is not None and time.monotonic() - started >= SILENT_DROP_S:
                return LinkTimeout(f"the link timed out while {doing}")
            return Disconnected(f"the device disconnected while {doing}")
        return LinkError(f"Bluetooth error while {doing}: {_text(exc)}", code="bluez_error")


class BleakCentral:
    """``Central`` on bleak/BlueZ. ``adapter`` picks the controller (``"hci0"``)."""

    def __init__(
        self,
        adapter: str | None = None,
        *,
        attempts: int = 3,
        backoff_s: float = 0.25,
    ) -> None:
        self.adapter = adapter
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        # Last sighting per address: connect() refuses a device seen BUSY and
        # reuses BlueZ's device object instead of scanning again.
        self._seen: dict[str, tuple[Sighting, BLEDevice]] = {}

    def _scanner_args(self) -> BlueZScannerArgs:
        return {} if self.adapter is None else {"adapter": self.adapter}

    def _client_args(self) -> BlueZClientArgs:
        return {} if self.adapter is None else {"adapter": self.adapter}

    def last_sighting(self, address: str) -> Sighting | None:
        seen = self._seen.get(address.upper())
        return None if seen is None else seen[0]

    # ---- scanning -----------------------------------------------------------------------

    async def scan(self, *, timeout: float | None = None) -> AsyncIterator[Sighting]:
        found: asyncio.Queue[Sighting] = asyncio.Queue()

        def detected(device: BLEDevice, adv: AdvertisementData) -> None:
            sighting = self._sighting(device, adv)
            if sighting is not None:
                self._seen[sighting.address] = (sighting, device)
                found.put_nowait(sighting)

        try:
            scanner = BleakScanner(
                detected,
                service_uuids=[SERVICE_UUID],
                scanning_mode="active",
                bluez=self._scanner_args(),
            )
            await scanner.start()
        except Exception as exc:  # BleakError, or D-Bus's own (no system bus: OSError)
            raise LinkError(f"cannot scan: {_text(exc)}", code="scan_failed") from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    yield await asyncio.wait_for(found.get(), remaining)
                except TimeoutError:
                    return
        finally:
            with contextlib.suppress(Exception):
                await scanner.stop()

    @staticmethod
    def _sighting(device: BLEDevice, adv: AdvertisementData) -> Sighting | None:
        if SERVICE_UUID not in [u.lower() for u in adv.service_uuids]:
            return None
        data = adv.manufacturer_data.get(COMPANY_ID)
        status = None if data is None else DeviceStatus.from_manufacturer_data(bytes(data))
        if status is None:
            return None
        name = adv.local_name or device.name or ""
        return Sighting(device.address.upper(), name, int(adv.rssi), status)

    # ---- connecting ---------------------------------------------------------------------

    async def connect(self, address: str, *, timeout: float = 20.0) -> BleakLink:
        address = address.upper()
        seen = self._seen.get(address)
        if seen is not None and seen[0].status.state is AdvState.BUSY:
            raise DeviceBusy(f"{seen[0].name or address} is busy with another commissioner")
        target: BLEDevice | str = seen[1] if seen is not None else address
        deadline = time.monotonic() + timeout
        fresh = False  # target came from a look-up made by this call
        last: BaseException | None = None
        tries = not_ds1 = 0  # failed attempts, and those that found no DS1 service
        for attempt in range(1, self.attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if isinstance(target, str):
                target = await self._look_up(address, remaining)
                remaining, fresh = deadline - time.monotonic(), True
            try:
                return await asyncio.wait_for(
                    self._connect_once(target, address, remaining), remaining
                )
            except DeviceNotFound:
                if fresh:
                    raise
                target = address  # BlueZ forgot the device: look for it again
                self._seen.pop(address, None)
                last = None
                continue
            except TimeoutError as exc:
                raise ConnectFailed(f"could not connect to {address} in {timeout:g} s") from exc
            except _Retry as exc:
                last = exc.__cause__
                tries += 1
                if isinstance(last, LinkError) and last.code == "not_a_doorstep_device":
                    not_ds1 += 1
                log.info(
                    "connect to %s failed (attempt %d/%d): %s",
                    address,
                    attempt,
                    self.attempts,
                    _text(exc.__cause__ or exc),
                )
                if attempt < self.attempts:
                    await asyncio.sleep(
                        min(self.backoff_s * attempt, max(0.0, deadline - time.monotonic()))
                    )
        if (
            isinstance(last, LinkError)
            and last.code == "not_a_doorstep_device"
            and not_ds1 == tries
        ):
            raise last
        detail = _text(last) if last is not None else "timed out"
        raise ConnectFailed(f"could not connect to {address}: {detail}")

    async def _look_up(self, address: str, timeout: float) -> BLEDevice:
        """BlueZ's object for ``address``, scanning for it if BlueZ does not know it yet."""
        try:
            device = await BleakScanner.find_device_by_address(
                address, timeout=max(0.1, timeout), bluez=self._scanner_args()
            )
        except BleakError as exc:
            raise LinkError(f"cannot scan: {_text(exc)}", code="scan_failed") from exc
        if device is None:
            raise DeviceNotFound(f"no Doorstep device {address} in range")
        return device

    async def _connect_once(
        self, target: BLEDevice | str, address: str, timeout: float
    ) -> BleakLink:
        link_box: list[BleakLink] = []

        def on_disconnect(client: BleakClient) -> None:
            if link_box:
                link_box[0]._on_disconnected(client)

        client = BleakClient(
            target, disconnected_callback=on_disconnect, timeout=timeout, bluez=self._client_args()
        )
        try:
            await client.connect()
        except BleakDeviceNotFoundError as exc:
            raise DeviceNotFound(f"no Doorstep device {address} in range") from exc
        except TimeoutError:
            raise
        except Exception as exc:  # bleak raises odd things when a link dies early
            # (e.g. a KeyError while resolving services of a device that just dropped us)
            raise _Retry() from exc
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.disconnect())
            raise
        try:
            services = client.services
            rx = services.get_characteristic(RX_UUID)
            tx = services.get_characteristic(TX_UUID)
            info = services.get_characteristic(INFO_UUID)
            if rx is None or tx is None or info is None:
                # Either not a Doorstep device, or one that dropped us during
                # discovery (busy with another commissioner) before bleak saw the
                # disconnect. Only the retries can tell: connect() reports a foreign
                # device when every attempt sees the same missing service.
                raise _Retry() from LinkError(
                    f"{address} does not host the DS1 service", code="not_a_doorstep_device"
                )
            mtu = max(MIN_MTU, rx.max_write_without_response_size + 3)
            link = BleakLink(client, address, mtu)
            link_box.append(link)
            await client.start_notify(tx, link._on_notification)
            if not client.is_connected:
                raise _Retry() from Disconnected("the link dropped while connecting")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.disconnect())
            if isinstance(exc, (LinkError, _Retry, asyncio.CancelledError)):
                raise
            if isinstance(exc, Exception):
                raise _Retry() from exc
            raise
        log.info("connected to %s (ATT_MTU %d)", address, mtu)
        return link


class _Retry(Exception):
    """A connect attempt failed in a way worth another attempt (the cause is chained)."""
