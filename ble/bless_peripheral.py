"""A device's radio on BlueZ through bless: the DS1 GATT server and advertiser (PROTOCOL.md §2).

``BlessPeripheral`` implements ``ble.transport.Peripheral`` with bless
(unmodified, its Linux backend) on BlueZ's D-Bus API — real ``bluetoothd`` on
a device, or ``bluezsim`` in tests. It hosts service ``a86b0001-…`` with
``info`` (read, the 19-byte ``DeviceStatus.info_value``), ``rx`` (write with
response; every write becomes a ``FragmentIn``) and ``tx`` (notify, one
fragment per ``notify()``), and advertises flags, the service UUID and
manufacturer data for company 0xFFFF (28 bytes) with the local name
``Doorstep-XXXX`` in the scan response.

bless gives no connection events and hands its write callback neither the
link's MTU nor the writing central, so this adapter listens to BlueZ itself
on the bus connection bless uses:

* **Link up / down.** BlueZ shows a central connected to our adapter as a
  ``Device1`` object under the adapter (``InterfacesAdded`` or
  ``PropertiesChanged(Connected)``); its ``Connected`` turning false or the
  object vanishing is the link going down. One commissioner at a time: a
  second central is disconnected at once and its writes are ignored. A
  write or a ``StartNotify`` with no known link also counts as a link coming
  up (a BlueZ that reports the central late).
* **MTU.** BlueZ passes ``mtu`` and ``device`` in the options of every
  ``WriteValue``/``ReadValue`` call to the application; bless drops them, so
  a raw message handler on bless's bus reads them first (it never answers the
  call; bless still does). ``max_fragment`` is ``mtu − 3`` once known, and at
  least the largest fragment received on the link (ATT_MTU is one value per
  link), starting at 20 on every ``LinkUp``.
* **Disconnect.** ``Device1.Disconnect`` on the central's object under our
  adapter, as BlueZ allows for any connection; if the central is unknown,
  every connected ``Device1`` of our adapter. ``LinkDown`` is queued at once
  (as ``ble.memory`` does) and late writes from the dropped central are
  ignored.
* **Status changes** re-register the advertisement (BlueZ reads an
  advertisement's properties only when it is registered).
* **Bluetooth going away.** When the bus connection closes (the D-Bus
  daemon stopped: ``doorstep sim`` killed) or ``org.bluez`` leaves the bus
  (bluetoothd stopped), ``next_event`` raises ``LinkError``
  ``bluetooth_lost`` from then on, and ``stop`` makes no more D-Bus calls:
  writes to a closed bus only left dbus-next's "Future exception was never
  retrieved" tracebacks at exit.
* **Object paths.** bless puts its application under ``/org/bluez/<name>``,
  where bleak takes every object for one of BlueZ's: each central on the
  same bus (a hub is both roles; so is every simulation) logged a
  ``KeyError: 'Device'`` traceback for our GATT service. The application's
  objects live under ``APP_ROOT`` instead; BlueZ accepts any path.

Written values are never logged: they carry credentials. The bless callbacks
are synchronous; they only enqueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from ble.errors import LinkError
from ble.profile import (
    COMPANY_ID,
    INFO_UUID,
    RX_UUID,
    SERVICE_UUID,
    TX_UUID,
    DeviceStatus,
)
from ble.transport import FragmentIn, LinkDown, LinkUp, PeripheralEvent

log = logging.getLogger("doorstep.ble.peripheral")

#: Where this peripheral's GATT application and advertisement objects live on the bus.
APP_ROOT = "/com/doorstep/peripheral"

DEVICE_IFACE = "org.bluez.Device1"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OBJMGR_IFACE = "org.freedesktop.DBus.ObjectManager"
CHAR_IFACE = "org.bluez.GattCharacteristic1"
ADV_MANAGER_IFACE = "org.bluez.LEAdvertisingManager1"
BLUEZ = "org.bluez"
MIN_FRAGMENT = 20  # ATT_MTU 23 − 3: always carried (§3)
UNKNOWN_PEER = ""  # a link whose central BlueZ has not named (yet)
DISCONNECT_TIMEOUT_S = 5.0

_MATCH_RULES = (
    f"type='signal',sender='{BLUEZ}',interface='{OBJMGR_IFACE}'",
    f"type='signal',sender='{BLUEZ}',interface='{PROPS_IFACE}',member='PropertiesChanged',"
    f"arg0='{DEVICE_IFACE}'",
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BLUEZ}'",
)


def place_application(app: Any, name: str) -> None:
    """Root a bless application (and so its services and advertisements) at ``APP_ROOT/<name>``.

    Call it before any service or advertisement exists: their paths derive
    from the application's. The application object itself moves too, so no
    object of ours is under ``/org/bluez`` (see the module docstring).
    """
    element = re.sub(r"[^A-Za-z0-9_]", "", name) or "device"  # one path element, as bless makes it
    app.base_path = f"{APP_ROOT}/{element}"
    app.path = app.base_path


def _plain(value: Any) -> Any:
    """Unwrap dbus-next Variants."""
    return value.value if hasattr(value, "signature") and hasattr(value, "value") else value


STOP_CALL_S = 2.0  # bound on each D-Bus call while stopping
_LOST = LinkDown()  # queued (by identity) to wake ``next_event`` when Bluetooth goes away


class BlessPeripheral:
    """``Peripheral`` on bless/BlueZ; one instance per device (one bus connection)."""

    def __init__(self, adapter: str | None = None) -> None:
        self._adapter_name = adapter
        self._server: Any = None
        self._advertisement: Any = None
        self._adapter_path = ""
        self._events: asyncio.Queue[PeripheralEvent] = asyncio.Queue()
        self._info = b""
        self._dev_id = b""
        self._status: DeviceStatus | None = None
        self._name = ""
        self._peer: str | None = None  # Device1 path of the connected commissioner
        self._dropped: set[str] = set()  # centrals we disconnected, until BlueZ says so
        self._largest = MIN_FRAGMENT
        self._mtu: int | None = None
        self._last_options: dict[str, Any] = {}
        self._adv_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._lost: str | None = None  # why Bluetooth went away, once it has
        self.address = ""  # our adapter's address, known after start()

    # ---- Peripheral ---------------------------------------------------------------

    @property
    def max_fragment(self) -> int:
        known = self._mtu - 3 if self._mtu is not None else MIN_FRAGMENT
        return max(known, self._largest)

    async def start(self, *, name: str, dev_id: bytes, status: DeviceStatus) -> None:
        from bless import (  # type: ignore[attr-defined]
            BlessServer,
            GATTAttributePermissions,
            GATTCharacteristicProperties,
        )

        if self._started:
            raise RuntimeError("peripheral already started")
        self._name, self._dev_id, self._status = name, dev_id, status
        self._info = status.info_value(dev_id)
        kwargs: dict[str, Any] = (
            {} if self._adapter_name is None else {"adapter": self._adapter_name}
        )
        try:
            server = BlessServer(name=name, **kwargs)
            self._server = server
            await server.setup_task
        except Exception as exc:
            raise LinkError(
                f"no usable Bluetooth adapter: {exc}", code="adapter_unavailable"
            ) from exc
        place_application(server.app, name)
        server.read_request_func = self._on_read
        server.write_request_func = self._on_write
        server.app.StartNotify = self._on_start_notify
        server.app.StopNotify = self._on_stop_notify
        self._adapter_path = str(server.adapter.path)
        bus = server.bus
        bus.add_message_handler(self._on_message)
        self._spawn(self._watch_bus(bus))
        for rule in _MATCH_RULES:
            await self._bus_call(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "AddMatch",
                "s",
                [rule],
            )
        props = GATTCharacteristicProperties
        perms = GATTAttributePermissions
        await server.add_new_service(SERVICE_UUID)
        await server.add_new_characteristic(
            SERVICE_UUID, INFO_UUID, props.read, bytearray(self._info), perms.readable
        )
        await server.add_new_characteristic(
            SERVICE_UUID, RX_UUID, props.write, None, perms.writeable
        )
        await server.add_new_characteristic(
            SERVICE_UUID, TX_UUID, props.notify, bytearray(), perms.readable
        )
        bus.export(server.app.path, server.app)
        await server.app.register(server.adapter)
        await server.app.set_name(server.adapter, name)
        await self._register_advertisement(status)
        with contextlib.suppress(Exception):
            iface = server.adapter.get_interface(PROPS_IFACE)
            address = await iface.call_get("org.bluez.Adapter1", "Address")
            self.address = str(_plain(address))
        self._started = True

    async def set_status(self, status: DeviceStatus) -> None:
        self._status = status
        self._info = status.info_value(self._dev_id)
        if self._server is None:
            return
        info = self._server.get_characteristic(INFO_UUID)
        if info is not None:
            info.value = bytearray(self._info)
        await self._register_advertisement(status)

    async def next_event(self) -> PeripheralEvent:
        """The next link event; ``LinkError`` ``bluetooth_lost`` once Bluetooth went away."""
        if self._lost is None:
            event = await self._events.get()
            if event is not _LOST:
                return event
        raise LinkError(f"Bluetooth went away: {self._lost}", code="bluetooth_lost")

    async def notify(self, fragment: bytes) -> None:
        if self._server is None or self._peer is None:
            return  # nobody to notify, as over the air
        tx = self._server.get_characteristic(TX_UUID)
        tx.value = bytearray(fragment)
        self._server.update_value(SERVICE_UUID, TX_UUID)  # emits PropertiesChanged(Value)
        await asyncio.sleep(0)

    async def disconnect(self) -> None:
        peer = self._peer
        if peer is None:
            return
        self._link_down()
        if peer != UNKNOWN_PEER:
            self._dropped.add(peer)
            await self._disconnect_device(peer)
            return
        for path in await self._connected_devices():
            self._dropped.add(path)
            await self._disconnect_device(path)

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        if self._lost is not None:  # nothing to tell BlueZ, and maybe no bus to tell it on
            self._server = None
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                server.bus.disconnect()
            self._started = False
            return
        # Each D-Bus call is bounded: a bus that went away (the simulator or
        # bluetoothd stopped) must not make a stopping device hang.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), STOP_CALL_S)
        self._server = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._unregister_advertisement(server), STOP_CALL_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.app.unregister(server.adapter), STOP_CALL_S)
        with contextlib.suppress(Exception):
            server.bus.unexport(server.app.path, server.app)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            server.bus.disconnect()
        self._started = False

    # ---- advertisement -----------------------------------------------------------

    async def _register_advertisement(self, status: DeviceStatus) -> None:
        """(Re-)register the advertisement carrying ``status`` as manufacturer data."""
        from bless.backends.bluezdbus.dbus.advertisement import (  # type: ignore[import-untyped]
            BlueZLEAdvertisement,
            Type,
        )
        from dbus_next.signature import Variant  # type: ignore[import-untyped]

        server = self._server
        async with self._adv_lock:
            if self._advertisement is not None:
                with contextlib.suppress(Exception):
                    await self._unregister_advertisement(server)
            app = server.app
            advertisement = BlueZLEAdvertisement(Type.PERIPHERAL, 1, app)
            advertisement._service_uuids.append(SERVICE_UUID)
            advertisement._manufacturer_data = {
                COMPANY_ID: Variant("ay", status.manufacturer_data())
            }
            advertisement._local_name = self._name
            server.bus.export(advertisement.path, advertisement)
            iface = server.adapter.get_interface(ADV_MANAGER_IFACE)
            try:
                await iface.call_register_advertisement(advertisement.path, {})
            except Exception as exc:
                server.bus.unexport(advertisement.path)
                raise LinkError(f"advertising failed: {exc}", code="advertising_failed") from exc
            self._advertisement = advertisement

    async def _unregister_advertisement(self, server: Any) -> None:
        advertisement, self._advertisement = self._advertisement, None
        if advertisement is None:
            return
        try:
            iface = server.adapter.get_interface(ADV_MANAGER_IFACE)
            await iface.call_unregister_advertisement(advertisement.path)
        finally:
            server.bus.unexport(advertisement.path)

    # ---- bless callbacks (synchronous: enqueue only) -------------------------------

    def _on_read(self, characteristic: Any, **_kwargs: Any) -> bytearray:
        self._learn_mtu(self._last_options)
        if str(characteristic.uuid).lower() == INFO_UUID:
            return bytearray(self._info)
        return bytearray()

    def _on_write(self, characteristic: Any, value: Any, **_kwargs: Any) -> None:
        if str(characteristic.uuid).lower() != RX_UUID:
            return
        options, self._last_options = self._last_options, {}
        device = str(options.get("device", "")) or UNKNOWN_PEER
        if device and device in self._dropped:
            return  # a central we dropped, still draining its queue
        if self._peer is None:
            if device == UNKNOWN_PEER and self._dropped:
                return  # most likely from a central we just dropped
            self._link_up(device)
        elif device and self._peer not in (device, UNKNOWN_PEER):
            return  # another central: one commissioner at a time
        elif device and self._peer == UNKNOWN_PEER:
            self._peer = device
        self._learn_mtu(options)
        data = bytes(value)
        self._largest = max(self._largest, len(data))
        self._events.put_nowait(FragmentIn(data))

    def _on_start_notify(self, _unused: Any) -> None:
        if self._peer is None and not self._dropped:
            self._link_up(UNKNOWN_PEER)

    def _on_stop_notify(self, _unused: Any) -> None:
        # The link's end is seen on Device1.Connected. bless then removes tx from
        # its subscription list and fails if BlueZ sends StopNotify for a CCCD
        # written by a central that is gone; tx is our only notifiable value.
        subscribed = self._server.app.subscribed_characteristics if self._server else None
        if subscribed is not None and TX_UUID not in subscribed:
            subscribed.append(TX_UUID)

    # ---- BlueZ on bless's bus ----------------------------------------------------

    def _on_message(self, msg: Any) -> None:
        """Raw handler on bless's bus: peek at request options, watch peer Device1 objects.

        Returns None so bless (dbus-next) still handles every method call.
        """
        from dbus_next.constants import MessageType  # type: ignore[import-untyped]

        try:
            if msg.message_type == MessageType.METHOD_CALL:
                if msg.interface == CHAR_IFACE and msg.member in ("WriteValue", "ReadValue"):
                    options = msg.body[-1] if msg.body else {}
                    self._last_options = {k: _plain(v) for k, v in dict(options).items()}
            elif msg.message_type == MessageType.SIGNAL:
                self._on_signal(msg)
        except Exception:  # a malformed message must never break bless's dispatch
            log.exception("ignoring an unexpected D-Bus message")
        return None

    def _on_signal(self, msg: Any) -> None:
        prefix = self._adapter_path + "/dev_"
        if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
            name, _old, new = msg.body
            if name == BLUEZ and not new:
                self._bluetooth_lost("bluetoothd (org.bluez) left the D-Bus system bus")
        elif msg.interface == OBJMGR_IFACE and msg.member == "InterfacesAdded":
            path, interfaces = msg.body
            props = interfaces.get(DEVICE_IFACE)
            if str(path).startswith(prefix) and props is not None:
                if bool(_plain(props.get("Connected", False))):
                    self._peer_connected(str(path))
        elif msg.interface == OBJMGR_IFACE and msg.member == "InterfacesRemoved":
            path, interfaces = msg.body
            if str(path).startswith(prefix) and DEVICE_IFACE in interfaces:
                self._peer_disconnected(str(path))
        elif msg.interface == PROPS_IFACE and msg.member == "PropertiesChanged":
            iface, changed = msg.body[0], msg.body[1]
            path = str(msg.path or "")
            if iface == DEVICE_IFACE and path.startswith(prefix) and "Connected" in changed:
                if bool(_plain(changed["Connected"])):
                    self._peer_connected(path)
                else:
                    self._peer_disconnected(path)

    def _peer_connected(self, path: str) -> None:
        if path in self._dropped:
            return
        if self._peer is None:
            self._link_up(path)
        elif self._peer == UNKNOWN_PEER:
            self._peer = path
        elif self._peer != path:
            log.info("refusing a second commissioner while one is connected")
            self._dropped.add(path)
            self._spawn(self._disconnect_device(path))

    def _peer_disconnected(self, path: str) -> None:
        self._dropped.discard(path)
        if self._peer == path:
            self._link_down()

    async def _watch_bus(self, bus: Any) -> None:
        """Wait for bless's bus connection to close; if it was not ``stop``, Bluetooth is gone.

        Awaiting ``wait_for_disconnect`` also retrieves the error the bus closed with
        (EOFError): left alone, asyncio printed it as a traceback at exit.
        """
        try:
            await bus.wait_for_disconnect()
            reason = "the D-Bus system bus closed the connection"
        except Exception as exc:
            reason = f"the D-Bus system bus went away ({type(exc).__name__})"
        if self._server is not None:
            self._bluetooth_lost(reason)

    def _bluetooth_lost(self, reason: str) -> None:
        if self._lost is not None:
            return
        log.info("Bluetooth went away: %s", reason)
        self._lost = reason
        self._peer = None
        self._events.put_nowait(_LOST)

    def _link_up(self, peer: str) -> None:
        self._peer = peer
        self._largest = MIN_FRAGMENT
        self._mtu = None
        self._events.put_nowait(LinkUp())

    def _link_down(self) -> None:
        self._peer = None
        self._mtu = None
        self._events.put_nowait(LinkDown())

    def _learn_mtu(self, options: dict[str, Any]) -> None:
        mtu = options.get("mtu")
        if isinstance(mtu, int) and 23 <= mtu <= 517 and self._peer is not None:
            self._mtu = mtu

    # ---- D-Bus helpers -------------------------------------------------------------

    async def _bus_call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
    ) -> Any:
        from dbus_next import Message  # type: ignore[import-untyped]
        from dbus_next.constants import MessageType  # type: ignore[import-untyped]

        reply = await self._server.bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
            )
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            name = getattr(reply, "error_name", "no reply")
            raise LinkError(f"{member} failed: {name}", code="bluez_error")
        return reply.body

    async def _disconnect_device(self, path: str) -> None:
        if self._server is None:
            return
        try:
            await asyncio.wait_for(
                self._bus_call(BLUEZ, path, DEVICE_IFACE, "Disconnect"), DISCONNECT_TIMEOUT_S
            )
        except (LinkError, TimeoutError) as exc:
            log.info("could not disconnect a central: %s", exc)

    async def _connected_devices(self) -> list[str]:
        try:
            (objects,) = await self._bus_call(BLUEZ, "/", OBJMGR_IFACE, "GetManagedObjects")
        except LinkError:
            return []
        prefix = self._adapter_path + "/dev_"
        out = []
        for path, interfaces in dict(objects).items():
            props = interfaces.get(DEVICE_IFACE)
            if str(path).startswith(prefix) and props and _plain(props.get("Connected", False)):
                out.append(str(path))
        return out

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
