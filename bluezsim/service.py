"""The simulated ``bluetoothd``: serves BlueZ's D-Bus API on a private bus.

Design (read this before changing anything):

* **One adapter per client connection.** Every D-Bus connection that looks
  at the BlueZ tree (``GetManagedObjects``, ``Introspect``, a call on the
  adapter) gets its own controller, always at ``/org/bluez/hci0``, with its own
  address. Signals are unicast to that connection. So N bless servers (one bus
  connection each, in one process or many) and any number of bleak centrals
  coexist; a central never sees its own advertisements.
* **bleak's per-session connections.** ``BleakClient`` opens a fresh D-Bus
  connection for each BLE connection and calls ``Connect``/``ReadValue``/… on
  device paths its global manager (another connection) discovered. A call on
  a device path from a connection without such a device is resolved against the
  adapters owned by connections *of the same process* (by unix PID), newest
  first.
* **The air.** Advertisements registered on one adapter appear as ``Device1``
  objects on discovering adapters. A ``Connect`` creates a
  :class:`~bluezsim.link.Link`; the peripheral's registered GATT application
  is mirrored into the central's view with BlueZ's paths and handles.
* **ATT.** Requests are serialised per link, values obey MTU and 512-byte
  limits, long reads are done as BlueZ does (repeated ``ReadValue`` with
  ``offset``), notifications are truncated to MTU−3 and delivered in order.
  Errors use BlueZ's names and texts (:mod:`bluezsim.att`).

Method calls addressed to ``org.bluez`` are handled by a raw message handler
(dbus-fast's high-level ``ServiceInterface`` cannot answer differently per
caller); the control interface ``org.doorstep.Sim1`` lives at
``/org/doorstep/sim`` on the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from bluezsim import att
from bluezsim.addata import (
    MAX_ADV_DATA_LEN,
    AdvertisementContent,
    AdvertisementTooLong,
)
from bluezsim.att import BluezError
from bluezsim.introspection import node_xml
from bluezsim.link import Link
from bluezsim.model import (
    ADAPTER_PATH,
    CCCD_UUID,
    Adapter,
    Advertisement,
    AppCharacteristic,
    AppDescriptor,
    AppService,
    GattApplication,
    PeripheralFaults,
    RemoteCharacteristic,
    RemoteDescriptor,
    RemoteDevice,
    RemoteService,
    device_path,
    plain,
)
from bluezsim.timing import Clock, TimingModel, monotonic, sleep_until

log = logging.getLogger(__name__)

BLUEZ_NAME = "org.bluez"
CONTROL_PATH = "/org/doorstep/sim"
CONTROL_IFACE = "org.doorstep.Sim1"

PROPS = "org.freedesktop.DBus.Properties"
OBJMGR = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
GATT_MANAGER = "org.bluez.GattManager1"
ADV_MANAGER = "org.bluez.LEAdvertisingManager1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
SERVICE = "org.bluez.GattService1"
CHARACTERISTIC = "org.bluez.GattCharacteristic1"
DESCRIPTOR = "org.bluez.GattDescriptor1"

UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

MAX_ADVERTISEMENTS = 4
DROP_WHEN = ("now", "before-write", "after-write")

# ATT characteristic properties as BlueZ's client exposes them in ``Flags``.
_CLIENT_FLAGS = {
    "broadcast": "broadcast",
    "read": "read",
    "encrypt-read": "read",
    "encrypt-authenticated-read": "read",
    "secure-read": "read",
    "write-without-response": "write-without-response",
    "write": "write",
    "encrypt-write": "write",
    "encrypt-authenticated-write": "write",
    "secure-write": "write",
    "notify": "notify",
    "indicate": "indicate",
    "authenticated-signed-writes": "authenticated-signed-writes",
    "extended-properties": "extended-properties",
    "reliable-write": "reliable-write",
    "writable-auxiliaries": "writable-auxiliaries",
}


def client_flags(flags: Iterable[str]) -> list[str]:
    """Server-side flags (with permissions) → the property flags a client sees."""
    out: list[str] = []
    for flag in flags:
        mapped = _CLIENT_FLAGS.get(flag)
        if mapped is not None and mapped not in out:
            out.append(mapped)
    return out


class UnknownObject(BluezError):
    def __init__(self, path: str) -> None:
        super().__init__(UNKNOWN_OBJECT, f"Method called on unknown object {path}")


class SimulatedBluez:
    """The simulator proper. Create, ``await start()``, ``await stop()``."""

    def __init__(
        self,
        bus: MessageBus,
        *,
        timing: TimingModel | None = None,
        mtu: int = att.MAX_MTU,
        rng: random.Random | None = None,
        clock: Clock = monotonic,
        connect_timeout: float = 20.0,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.bus = bus
        self.timing = timing or TimingModel()
        self.mtu = att.check_mtu(mtu)
        self.rng = rng or random.Random(0)  # noqa: S311  (RSSI jitter/phases, not secrets)
        self.rssi_jitter_db = 0
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.environment = dict(environment or {})
        self.adapters: dict[str, Adapter] = {}  # owner unique name → adapter
        self._serial = 0
        self._pids: dict[str, asyncio.Future[int | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dying: set[Link] = set()
        self._fd_owner: dict[int, tuple[RemoteDevice, RemoteCharacteristic, str]] = {}
        self._handler_installed = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        self._handler_installed = True
        for rule in (
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            "member='NameOwnerChanged'",
            "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'",
        ):
            await self._bus_call("AddMatch", "s", [rule])
        reply = await self._bus_call("RequestName", "su", [BLUEZ_NAME, 4])
        if reply.body[0] not in (1, 4):
            raise RuntimeError(f"could not own {BLUEZ_NAME} (reply {reply.body[0]})")

    async def stop(self) -> None:
        for adapter in list(self.adapters.values()):
            for link in list(adapter.links):
                await self._teardown(link)
        for fd in list(self._fd_owner):
            self._release_fd(fd)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._handler_installed:
            self.bus.remove_message_handler(self._on_message)
            self._handler_installed = False

    async def _bus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature=signature,
                body=body,
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member} failed: {reply.error_name} {reply.body}")
        return reply

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ dispatch

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
                name, _old, new = msg.body
                if not new and name.startswith(":"):
                    self._spawn(self._client_gone(name))
            elif msg.member == "PropertiesChanged" and msg.sender in self._app_owners():
                self._on_app_properties_changed(msg)
            return False
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.destination not in (BLUEZ_NAME, self.bus.unique_name):
            return False
        self._spawn(self._dispatch(msg))
        return True

    async def _dispatch(self, msg: Message) -> None:
        try:
            reply = await self._handle(msg)
        except BluezError as exc:
            reply = Message.new_error(msg, exc.name, exc.text)
        except asyncio.CancelledError:
            reply = Message.new_error(msg, "org.bluez.Error.Failed", "Operation aborted")
            self._reply(msg, reply)
            raise
        except Exception as exc:
            log.exception("error handling %s.%s", msg.interface, msg.member)
            reply = Message.new_error(msg, "org.bluez.Error.Failed", f"Simulator error: {exc}")
        if reply is not _ALREADY_SENT:
            self._reply(msg, reply)

    def _reply(self, msg: Message, reply: Message) -> None:
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        if self.bus.connected:
            self.bus.send(reply)

    async def _handle(self, msg: Message) -> Message:
        sender = msg.sender or ""
        path = msg.path or "/"
        iface = msg.interface
        member = msg.member or ""
        if path == CONTROL_PATH:
            return await self._handle_control(msg)
        if member == "Ping" and iface in (None, "org.freedesktop.DBus.Peer"):
            return Message.new_method_return(msg)
        if member == "Introspect" and iface in (None, INTROSPECTABLE):
            adapter = await self._view(sender, path)
            return Message.new_method_return(msg, "s", [self._introspect(adapter, path)])
        if member == "GetManagedObjects" and iface in (None, OBJMGR):
            if path != "/":
                raise BluezError(UNKNOWN_METHOD, "GetManagedObjects is only on /")
            adapter = await self._view(sender, path)
            return Message.new_method_return(
                msg, "a{oa{sa{sv}}}", [self._managed_objects(adapter)]
            )
        adapter = await self._view(sender, path)
        if iface == PROPS:
            return await self._handle_properties(msg, adapter, sender)
        handler = self._method_table().get((iface or "", member))
        if handler is None:
            raise BluezError(
                UNKNOWN_METHOD, f'Method "{member}" with signature "{msg.signature}" '
                f'on interface "{iface}" doesn\'t exist'
            )
        result = await handler(msg, adapter, sender)
        if isinstance(result, Message):
            return result
        return Message.new_method_return(msg)

    def _method_table(
        self,
    ) -> dict[tuple[str, str], Callable[[Message, Adapter, str], Awaitable[Message | None]]]:
        return {
            (ADAPTER, "StartDiscovery"): self._start_discovery,
            (ADAPTER, "StopDiscovery"): self._stop_discovery,
            (ADAPTER, "SetDiscoveryFilter"): self._set_discovery_filter,
            (ADAPTER, "GetDiscoveryFilters"): self._get_discovery_filters,
            (ADAPTER, "RemoveDevice"): self._remove_device_call,
            (GATT_MANAGER, "RegisterApplication"): self._register_application,
            (GATT_MANAGER, "UnregisterApplication"): self._unregister_application,
            (ADV_MANAGER, "RegisterAdvertisement"): self._register_advertisement,
            (ADV_MANAGER, "UnregisterAdvertisement"): self._unregister_advertisement,
            (DEVICE, "Connect"): self._device_connect,
            (DEVICE, "Disconnect"): self._device_disconnect,
            (DEVICE, "Pair"): self._device_pair,
            (DEVICE, "CancelPairing"): self._noop,
            (CHARACTERISTIC, "ReadValue"): self._char_read,
            (CHARACTERISTIC, "WriteValue"): self._char_write,
            (CHARACTERISTIC, "StartNotify"): self._start_notify,
            (CHARACTERISTIC, "StopNotify"): self._stop_notify,
            (CHARACTERISTIC, "AcquireNotify"): self._acquire_notify,
            (CHARACTERISTIC, "AcquireWrite"): self._acquire_write,
            (DESCRIPTOR, "ReadValue"): self._desc_read,
            (DESCRIPTOR, "WriteValue"): self._desc_write,
            ("org.bluez.AgentManager1", "RegisterAgent"): self._noop,
            ("org.bluez.AgentManager1", "UnregisterAgent"): self._noop,
            ("org.bluez.AgentManager1", "RequestDefaultAgent"): self._noop,
        }

    async def _noop(self, msg: Message, adapter: Adapter, sender: str) -> None:
        return None

    # ------------------------------------------------------------------ views

    async def _view(self, sender: str, path: str) -> Adapter:
        """The adapter (view) a call from ``sender`` on ``path`` refers to."""
        own = self.adapters.get(sender)
        if own is not None and self._find(own, path) is not None:
            return own
        if not path.startswith(ADAPTER_PATH + "/"):
            return own if own is not None else self._create_adapter(sender)
        pid = await self._pid(sender)
        if pid is not None:
            candidates = [
                a for a in self.adapters.values()
                if a.owner != sender and self._find(a, path) is not None
            ]
            candidates.sort(key=lambda a: a.created, reverse=True)
            for candidate in candidates:
                if await self._pid(candidate.owner) == pid:
                    return candidate
        raise UnknownObject(path)

    def _create_adapter(self, owner: str) -> Adapter:
        self._serial += 1
        serial = self._serial
        address = f"C0:DE:5A:00:{serial >> 8 & 0xFF:02X}:{serial & 0xFF:02X}"
        adapter = Adapter(
            serial=serial, address=address, owner=owner, created=self.clock(),
            adv_phase=self.rng.random(),
        )
        self.adapters[owner] = adapter
        self._spawn(self._pid(owner))
        log.debug("adapter %s for %s", address, owner)
        return adapter

    async def _pid(self, name: str) -> int | None:
        future = self._pids.get(name)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pids[name] = future
            try:
                reply = await self.bus.call(
                    Message(
                        destination="org.freedesktop.DBus",
                        path="/org/freedesktop/DBus",
                        interface="org.freedesktop.DBus",
                        member="GetConnectionUnixProcessID",
                        signature="s",
                        body=[name],
                    )
                )
                pid = (
                    int(reply.body[0])
                    if reply is not None and reply.message_type == MessageType.METHOD_RETURN
                    else None
                )
            except Exception:
                pid = None
            future.set_result(pid)
        return await future

    def _find(self, adapter: Adapter, path: str) -> tuple[str, Any] | None:
        """Locate ``path`` in an adapter's view: (kind, object)."""
        if path in ("/", "/org", "/org/bluez"):
            return ("root", None)
        if path == ADAPTER_PATH:
            return ("adapter", adapter)
        prefix = ADAPTER_PATH + "/dev_"
        if not path.startswith(prefix):
            return None
        address = path[len(prefix): len(prefix) + 17].replace("_", ":")
        device = adapter.devices.get(address)
        if device is None:
            return None
        if path == device.path:
            return ("device", device)
        if path in device.services:
            return ("service", device.services[path])
        if path in device.characteristics:
            return ("char", device.characteristics[path])
        if path in device.descriptors:
            return ("desc", device.descriptors[path])
        return None

    def _device_for(self, adapter: Adapter, path: str) -> RemoteDevice:
        found = self._find(adapter, path)
        if found is None:
            raise UnknownObject(path)
        prefix = ADAPTER_PATH + "/dev_"
        address = path[len(prefix): len(prefix) + 17].replace("_", ":")
        return adapter.devices[address]

    def _object_interfaces(
        self, adapter: Adapter, path: str
    ) -> dict[str, dict[str, Variant]]:
        found = self._find(adapter, path)
        if found is None:
            return {}
        kind, obj = found
        if kind == "root":
            if path == "/org/bluez":
                return {"org.bluez.AgentManager1": {}, "org.bluez.ProfileManager1": {}}
            return {}
        if kind == "adapter":
            return {
                ADAPTER: adapter.adapter_properties(),
                GATT_MANAGER: {},
                ADV_MANAGER: adapter.advertising_manager_properties(),
            }
        device = self._device_for(adapter, path)
        if kind == "device":
            return {DEVICE: device.properties()}
        if kind == "service":
            return {SERVICE: self._service_props(obj)}
        if kind == "char":
            return {CHARACTERISTIC: self._char_props(device, obj)}
        return {DESCRIPTOR: self._desc_props(obj)}

    def _all_paths(self, adapter: Adapter) -> list[str]:
        paths = ["/org/bluez", ADAPTER_PATH]
        for device in adapter.devices.values():
            paths.append(device.path)
            paths.extend(device.services)
            paths.extend(device.characteristics)
            paths.extend(device.descriptors)
        return paths

    def _managed_objects(self, adapter: Adapter) -> dict[str, dict[str, dict[str, Variant]]]:
        return {path: self._object_interfaces(adapter, path) for path in self._all_paths(adapter)}

    def _introspect(self, adapter: Adapter, path: str) -> str:
        interfaces = list(self._object_interfaces(adapter, path))
        if path == "/":
            interfaces.append(OBJMGR)
        children: set[str] = set()
        base = path.rstrip("/") + "/"
        for other in self._all_paths(adapter):
            if other.startswith(base):
                children.add(other[len(base):].split("/")[0])
        return node_xml(interfaces, children)

    def _service_props(self, service: RemoteService) -> dict[str, Variant]:
        return {
            "UUID": Variant("s", service.app.uuid),
            "Device": Variant("o", service.device_path),
            "Primary": Variant("b", service.app.primary),
            "Includes": Variant("ao", []),
        }

    def _char_props(self, device: RemoteDevice, char: RemoteCharacteristic) -> dict[str, Variant]:
        flags = client_flags(char.app.flags)
        mtu = device.link.mtu if device.link is not None else att.MIN_MTU
        props = {
            "UUID": Variant("s", char.app.uuid),
            "Service": Variant("o", char.service_path),
            "Value": Variant("ay", char.value),
            "Notifying": Variant("b", char.notifying),
            "Flags": Variant("as", flags),
            "MTU": Variant("q", mtu),
        }
        if "write-without-response" in flags:
            props["WriteAcquired"] = Variant("b", char.write_fd is not None)
        if "notify" in flags or "indicate" in flags:
            props["NotifyAcquired"] = Variant("b", char.notify_fd is not None)
        return props

    def _desc_props(self, desc: RemoteDescriptor) -> dict[str, Variant]:
        return {
            "UUID": Variant("s", desc.uuid),
            "Characteristic": Variant("o", desc.char_path),
            "Value": Variant("ay", desc.value),
        }

    # ------------------------------------------------------------------ signals

    def _signal(
        self, adapter: Adapter, path: str, iface: str, member: str, sig: str, body: list[Any]
    ) -> None:
        if not self.bus.connected or adapter.owner not in self.adapters:
            return
        self.bus.send(
            Message(
                message_type=MessageType.SIGNAL,
                destination=adapter.owner,
                path=path,
                interface=iface,
                member=member,
                signature=sig,
                body=body,
            )
        )

    def _changed(
        self, adapter: Adapter, path: str, iface: str, changed: dict[str, Variant]
    ) -> None:
        self._signal(adapter, path, PROPS, "PropertiesChanged", "sa{sv}as", [iface, changed, []])

    def _added(self, adapter: Adapter, path: str) -> None:
        self._signal(
            adapter, "/", OBJMGR, "InterfacesAdded", "oa{sa{sv}}",
            [path, self._object_interfaces(adapter, path)],
        )

    def _removed(self, adapter: Adapter, path: str, interfaces: list[str]) -> None:
        self._signal(adapter, "/", OBJMGR, "InterfacesRemoved", "oas", [path, interfaces])

    # ------------------------------------------------------------------ properties

    async def _handle_properties(self, msg: Message, adapter: Adapter, sender: str) -> Message:
        path = msg.path or "/"
        interfaces = self._object_interfaces(adapter, path)
        if msg.member == "GetAll":
            (iface,) = msg.body
            return Message.new_method_return(msg, "a{sv}", [interfaces.get(iface, {})])
        if msg.member == "Get":
            iface, name = msg.body
            props = interfaces.get(iface)
            if props is None or name not in props:
                raise BluezError(
                    "org.freedesktop.DBus.Error.InvalidArgs", f"No such property '{name}'"
                )
            return Message.new_method_return(msg, "v", [props[name]])
        if msg.member == "Set":
            iface, name, value = msg.body
            self._set_property(adapter, path, iface, name, value.value)
            return Message.new_method_return(msg)
        raise BluezError(UNKNOWN_METHOD, f"No method {msg.member}")

    def _set_property(self, adapter: Adapter, path: str, iface: str, name: str, value: Any) -> None:
        if iface == ADAPTER and path == ADAPTER_PATH:
            if name == "Alias":
                adapter.alias = str(value)
            elif name == "Powered":
                adapter.powered = bool(value)
            elif name == "Discoverable":
                adapter.discoverable = bool(value)
            elif name == "Pairable":
                adapter.pairable = bool(value)
            else:
                raise BluezError("org.freedesktop.DBus.Error.PropertyReadOnly", name)
            self._changed(adapter, path, ADAPTER, {name: adapter.adapter_properties()[name]})
            return
        if iface == DEVICE:
            device = self._device_for(adapter, path)
            if name == "Trusted":
                device.trusted = bool(value)
            elif name == "Blocked":
                device.blocked = bool(value)
            elif name == "Alias":
                device.alias_override = str(value) or None
            else:
                raise BluezError("org.freedesktop.DBus.Error.PropertyReadOnly", name)
            self._changed(adapter, path, DEVICE, {name: device.properties()[name]})
            return
        raise BluezError("org.freedesktop.DBus.Error.PropertyReadOnly", name)

    # ------------------------------------------------------------------ discovery

    async def _set_discovery_filter(self, msg: Message, adapter: Adapter, sender: str) -> None:
        allowed = {"UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable",
                   "Pattern"}
        filters = plain(msg.body[0])
        if not set(filters) <= allowed:
            raise att.invalid_args()
        adapter.discovery_filter = filters

    async def _get_discovery_filters(
        self, msg: Message, adapter: Adapter, sender: str
    ) -> Message:
        return Message.new_method_return(
            msg, "as", [["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData",
                         "Discoverable", "Pattern"]]
        )

    async def _start_discovery(self, msg: Message, adapter: Adapter, sender: str) -> None:
        if sender in adapter.discovery_sessions:
            raise att.in_progress()
        first = not adapter.discovering
        adapter.discovery_sessions.add(sender)
        if first:
            self._changed(adapter, ADAPTER_PATH, ADAPTER, {"Discovering": Variant("b", True)})
        for other in list(self.adapters.values()):
            if other is not adapter:
                self._schedule_sighting(adapter, other)

    async def _stop_discovery(self, msg: Message, adapter: Adapter, sender: str) -> None:
        if sender not in adapter.discovery_sessions:
            raise att.failed("No discovery started")
        self._end_discovery(adapter, sender)

    def _end_discovery(self, adapter: Adapter, sender: str) -> None:
        adapter.discovery_sessions.discard(sender)
        if not adapter.discovering:
            for handle in adapter.pending_sightings:
                handle.cancel()
            adapter.pending_sightings.clear()
            self._changed(adapter, ADAPTER_PATH, ADAPTER, {"Discovering": Variant("b", False)})

    def _schedule_sighting(
        self, scanner: Adapter, advertiser: Adapter, delay: float | None = None
    ) -> None:
        """Deliver the advertiser's advertisements to the scanner, repeatedly.

        The first one arrives after a random phase of the advertising interval
        (at once with the timing model off); then one per advertising interval
        while the scanner discovers, as a real advertiser keeps advertising.
        """
        if advertiser.advertisement() is None:
            return
        if delay is None:
            delay = self.timing.scan_delay((advertiser.adv_phase + self.rng.random() * 0.25) % 1.0)
            if delay <= 0:
                self._sight(scanner, advertiser)
                delay = self.timing.adv_interval
        loop = asyncio.get_running_loop()
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            scanner.pending_sightings.discard(holder[0])
            if not scanner.discovering or advertiser.owner not in self.adapters:
                return
            if advertiser.advertisement() is None:
                return
            self._sight(scanner, advertiser)
            self._schedule_sighting(scanner, advertiser, self.timing.adv_interval)

        handle = loop.call_later(delay, fire)
        holder.append(handle)
        scanner.pending_sightings.add(handle)

    def _rssi_for(self, advertiser: Adapter) -> int:
        jitter = self.rng.randint(-self.rssi_jitter_db, self.rssi_jitter_db)
        return max(-127, min(20, advertiser.faults.rssi + jitter))

    def _passes_filter(self, scanner: Adapter, content: AdvertisementContent, rssi: int) -> bool:
        flt = scanner.discovery_filter
        uuids = [u.lower() for u in flt.get("UUIDs", [])]
        if uuids and not set(uuids) & {u.lower() for u in content.service_uuids}:
            return False
        threshold = flt.get("RSSI")
        if threshold is not None and rssi < int(threshold):
            return False
        pattern = flt.get("Pattern")
        return not pattern or (content.local_name or "").startswith(str(pattern))

    def _sight(self, scanner: Adapter, advertiser: Adapter) -> None:
        """The scanner receives one advertisement (+ scan response) from the advertiser."""
        if not scanner.discovering or scanner.owner not in self.adapters:
            return
        if advertiser.owner not in self.adapters or not advertiser.faults.in_range:
            return
        adv = advertiser.advertisement()
        if adv is None:
            return
        content = adv.content
        rssi = self._rssi_for(advertiser)
        if not self._passes_filter(scanner, content, rssi):
            return
        name = content.scan_response_name()[0] or None
        device = scanner.devices.get(advertiser.address)
        fresh = device is None
        before = {} if device is None else device.properties()
        if device is None:
            device = RemoteDevice(view=scanner, address=advertiser.address)
            scanner.devices[advertiser.address] = device
        device.name = name or device.name
        device.uuids = list(content.service_uuids)
        device.manufacturer_data = dict(content.manufacturer_data)
        device.service_data = dict(content.service_data)
        device.rssi = rssi
        if fresh:
            self._added(scanner, device.path)
        else:
            props = device.properties()
            changed = {k: v for k, v in props.items() if k not in before or before[k] != v}
            changed["RSSI"] = props["RSSI"]
            self._changed(scanner, device.path, DEVICE, changed)

    def _refresh_rssi(self, advertiser: Adapter) -> None:
        for scanner in self.adapters.values():
            device = scanner.devices.get(advertiser.address)
            if device is not None and scanner.discovering and advertiser.faults.in_range:
                device.rssi = self._rssi_for(advertiser)
                self._changed(scanner, device.path, DEVICE, {"RSSI": Variant("n", device.rssi)})

    async def _remove_device_call(self, msg: Message, adapter: Adapter, sender: str) -> None:
        path = msg.body[0]
        found = self._find(adapter, path)
        if found is None or found[0] != "device":
            raise att.does_not_exist()
        await self._remove_device(adapter, found[1])

    async def _remove_device(self, adapter: Adapter, device: RemoteDevice) -> None:
        if device.connecting is not None:
            device.connecting.cancel()
        if device.link is not None:
            await self._teardown(device.link)
        if adapter.devices.get(device.address) is device:
            del adapter.devices[device.address]
            self._removed(adapter, device.path, [DEVICE])

    # ------------------------------------------------------------------ advertising

    async def _register_advertisement(self, msg: Message, adapter: Adapter, sender: str) -> None:
        path, _options = msg.body
        key = (sender, path)
        if key in adapter.advertisements:
            raise att.already_exists()
        if len(adapter.advertisements) >= MAX_ADVERTISEMENTS:
            raise att.not_permitted("Maximum advertisements reached")
        reply = await self.bus.call(
            Message(
                destination=sender, path=path, interface=PROPS, member="GetAll",
                signature="s", body=[ADVERTISEMENT],
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise att.failed("Failed to parse advertisement.")
        content = self._parse_advertisement(adapter, plain(reply.body[0]))
        try:
            content.check()
        except AdvertisementTooLong as exc:
            # BlueZ rejects data that cannot be added to the AD set while parsing,
            # and data that no longer fits once the kernel adds Flags when adding.
            if exc.part == "advertising data" and exc.length - 3 <= MAX_ADV_DATA_LEN:
                raise att.failed("Failed to register advertisement") from None
            raise att.failed("Failed to parse advertisement.") from None
        interval = float(plain(reply.body[0]).get("MinInterval", 100) or 100) / 1000.0
        adapter.advertisements[key] = Advertisement(sender, path, content, interval)
        self._changed(adapter, ADAPTER_PATH, ADV_MANAGER, {
            k: v for k, v in adapter.advertising_manager_properties().items()
            if k in ("ActiveInstances", "SupportedInstances")
        })
        if len(adapter.advertisements) == 1:
            for scanner in self.adapters.values():
                if scanner is not adapter and scanner.discovering:
                    self._schedule_sighting(scanner, adapter)

    def _parse_advertisement(self, adapter: Adapter, props: dict[str, Any]) -> AdvertisementContent:
        if props.get("Type") not in ("peripheral", "broadcast"):
            raise att.failed("Failed to parse advertisement.")
        includes = [str(i) for i in props.get("Includes", [])]
        local_name = props.get("LocalName") or None
        if local_name is None and "local-name" in includes:
            local_name = adapter.alias or adapter.name
        appearance = props.get("Appearance")
        return AdvertisementContent(
            connectable=props.get("Type") == "peripheral",
            service_uuids=tuple(str(u) for u in props.get("ServiceUUIDs", [])),
            solicit_uuids=tuple(str(u) for u in props.get("SolicitUUIDs", [])),
            manufacturer_data={int(k): bytes(v) for k, v in props.get("ManufacturerData", {}).items()},
            service_data={str(k): bytes(v) for k, v in props.get("ServiceData", {}).items()},
            local_name=local_name,
            appearance=int(appearance) if appearance is not None else None,
            include_tx_power="tx-power" in includes,
            raw_data={int(k): bytes(v) for k, v in props.get("Data", {}).items()},
        )

    async def _unregister_advertisement(self, msg: Message, adapter: Adapter, sender: str) -> None:
        key = (sender, msg.body[0])
        if adapter.advertisements.pop(key, None) is None:
            raise att.does_not_exist()
        self._changed(adapter, ADAPTER_PATH, ADV_MANAGER, {
            k: v for k, v in adapter.advertising_manager_properties().items()
            if k in ("ActiveInstances", "SupportedInstances")
        })

    # ------------------------------------------------------------------ GATT server side

    async def _register_application(self, msg: Message, adapter: Adapter, sender: str) -> None:
        root, _options = msg.body
        key = (sender, root)
        if key in adapter.applications:
            raise att.already_exists()
        reply = await self.bus.call(
            Message(destination=sender, path=root, interface=OBJMGR, member="GetManagedObjects")
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise att.failed("Failed to read application objects")
        app = self._parse_application(sender, root, plain(reply.body[0]))
        if not app.services:
            raise att.invalid_args("No object received")
        adapter.next_handle = app.assign_handles(adapter.next_handle)
        adapter.applications[key] = app

    def _parse_application(
        self, owner: str, root: str, objects: dict[str, dict[str, dict[str, Any]]]
    ) -> GattApplication:
        services: dict[str, AppService] = {}
        chars: dict[str, AppCharacteristic] = {}
        for path in sorted(objects):
            props = objects[path].get(SERVICE)
            if props is not None:
                services[path] = AppService(path, str(props["UUID"]), bool(props.get("Primary", True)))
        for path in sorted(objects):
            props = objects[path].get(CHARACTERISTIC)
            if props is not None and str(props.get("Service")) in services:
                char = AppCharacteristic(path, str(props["UUID"]), [str(f) for f in props.get("Flags", [])])
                chars[path] = char
                services[str(props["Service"])].characteristics.append(char)
        for path in sorted(objects):
            props = objects[path].get(DESCRIPTOR)
            if props is not None and str(props.get("Characteristic")) in chars:
                desc = AppDescriptor(path, str(props["UUID"]), [str(f) for f in props.get("Flags", [])])
                chars[str(props["Characteristic"])].descriptors.append(desc)
        return GattApplication(owner, root, list(services.values()))

    async def _unregister_application(self, msg: Message, adapter: Adapter, sender: str) -> None:
        if adapter.applications.pop((sender, msg.body[0]), None) is None:
            raise att.does_not_exist()

    def _app_owners(self) -> set[str]:
        return {
            app.owner for adapter in self.adapters.values() for app in adapter.applications.values()
        }

    # ------------------------------------------------------------------ connections

    def _peripheral(self, address: str) -> Adapter | None:
        for adapter in self.adapters.values():
            if adapter.address == address:
                return adapter
        return None

    def _reachable(self, peripheral: Adapter | None) -> bool:
        return (
            peripheral is not None
            and peripheral.owner in self.adapters
            and peripheral.faults.in_range
            and any(a.content.connectable for a in peripheral.advertisements.values())
        )

    async def _device_connect(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device = self._device_for(adapter, msg.path or "")
        if device.connected:
            return
        if device.connecting is not None:
            raise att.in_progress()
        task: asyncio.Task[None] = asyncio.create_task(self._establish(adapter, device))
        device.connecting = task
        try:
            await task
        finally:
            if device.connecting is task:
                device.connecting = None

    async def _establish(self, central: Adapter, device: RemoteDevice) -> None:
        peripheral = self._peripheral(device.address)
        if peripheral is not None and peripheral.faults.connect_delay > 0:
            await asyncio.sleep(peripheral.faults.connect_delay)
        if peripheral is not None and peripheral.faults.refuse_connect > 0:
            peripheral.faults.refuse_connect -= 1
            await sleep_until(self.clock() + self.timing.connect_cost(), self.clock)
            raise att.failed("le-connection-abort-by-remote")
        deadline = self.clock() + self.connect_timeout
        while not self._reachable(peripheral):
            if self.clock() >= deadline:
                raise att.failed("le-connection-abort-by-local")
            await asyncio.sleep(0.05)
            peripheral = self._peripheral(device.address)
        assert peripheral is not None
        await sleep_until(self.clock() + self.timing.connect_cost(), self.clock)
        if not self._reachable(peripheral) or central.owner not in self.adapters:
            raise att.failed("le-connection-abort-by-local")
        link = Link(
            central, peripheral, mtu=self.mtu, interval=self.timing.interval,
            timed=self.timing.enabled, clock=self.clock,
        )
        central.links.add(link)
        peripheral.links.add(link)
        device.link = link
        device.connected = True
        self._changed(central, device.path, DEVICE, {"Connected": Variant("b", True)})
        self._peer_appears(peripheral, central)
        apps = list(peripheral.applications.values())
        n_services = sum(len(a.services) for a in apps)
        n_chars = sum(len(s.characteristics) for a in apps for s in a.services)
        await sleep_until(self.clock() + self.timing.discovery_cost(n_services, n_chars), self.clock)
        if not link.alive:
            raise att.failed("le-connection-abort-by-remote")
        self._mirror_gatt(device, apps)
        device.services_resolved = True
        self._changed(central, device.path, DEVICE, {"ServicesResolved": Variant("b", True)})

    def _peer_appears(self, peripheral: Adapter, central: Adapter) -> None:
        """The peripheral's owner sees the connected central as a Device1."""
        peer = peripheral.devices.get(central.address)
        if peer is None:
            peer = RemoteDevice(view=peripheral, address=central.address)
            peripheral.devices[central.address] = peer
            peer.connected = True
            self._added(peripheral, peer.path)
        else:
            peer.connected = True
            self._changed(peripheral, peer.path, DEVICE, {"Connected": Variant("b", True)})

    def _mirror_gatt(self, device: RemoteDevice, apps: list[GattApplication]) -> None:
        view = device.view
        for app in apps:
            for service in app.services:
                spath = f"{device.path}/service{service.handle:04x}"
                device.services[spath] = RemoteService(spath, device.path, service)
                self._added(view, spath)
                for char in service.characteristics:
                    cpath = f"{spath}/char{char.handle:04x}"
                    device.characteristics[cpath] = RemoteCharacteristic(cpath, spath, char)
                    self._added(view, cpath)
                    if char.cccd_handle is not None:
                        dpath = f"{cpath}/desc{char.cccd_handle:04x}"
                        device.descriptors[dpath] = RemoteDescriptor(
                            dpath, CCCD_UUID, cpath, None, b"\x00\x00"
                        )
                        self._added(view, dpath)
                    for desc in char.descriptors:
                        dpath = f"{cpath}/desc{desc.handle:04x}"
                        device.descriptors[dpath] = RemoteDescriptor(dpath, desc.uuid, cpath, desc)
                        self._added(view, dpath)

    async def _device_disconnect(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device = self._device_for(adapter, msg.path or "")
        if device.connecting is not None:
            device.connecting.cancel()
        link = device.link or self._peer_link(adapter, device)
        if link is not None:
            if self.timing.enabled and link.alive and not link.silent:
                await sleep_until(self.clock() + link.interval, self.clock)
            await self._teardown(link)

    def _peer_link(self, peripheral: Adapter, peer: RemoteDevice) -> Link | None:
        """The link a connected central (seen by the peripheral as ``peer``) holds to it.

        BlueZ lets a peripheral's owner drop a central with ``Device1.Disconnect``
        on the peer's object, as for any connection.
        """
        for link in peripheral.links:
            if link.peripheral is peripheral and link.central.address == peer.address:
                return link
        return None

    async def _device_pair(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device = self._device_for(adapter, msg.path or "")
        if device.paired:
            raise BluezError("org.bluez.Error.AlreadyExists", "Already Exists")
        if not device.connected:
            await self._device_connect(msg, adapter, sender)
        device.paired = True
        self._changed(adapter, device.path, DEVICE, {
            "Paired": Variant("b", True), "Bonded": Variant("b", True)
        })

    async def _teardown(self, link: Link) -> None:
        """Close a link and update both sides' views, as BlueZ does on disconnect."""
        if link in self._dying:
            return
        self._dying.add(link)
        try:
            await link.close()
            central, peripheral = link.central, link.peripheral
            central.links.discard(link)
            peripheral.links.discard(link)
            device = central.devices.get(peripheral.address)
            if device is not None and device.link is link:
                subscribed = [c.app for c in device.characteristics.values() if c.notifying]
                for char in device.characteristics.values():
                    for fd in (char.notify_fd, char.write_fd):
                        if fd is not None:
                            self._release_fd(fd, emit=False)
                device.link = None
                self._unmirror_gatt(device)
                if device.services_resolved:
                    device.services_resolved = False
                    self._changed(central, device.path, DEVICE,
                                  {"ServicesResolved": Variant("b", False)})
                device.connected = False
                self._changed(central, device.path, DEVICE, {"Connected": Variant("b", False)})
                for app_char in subscribed:
                    self._spawn(self._app_notify_switch(peripheral, app_char, False))
            peer = peripheral.devices.get(central.address)
            if peer is not None:
                peer.connected = False
                self._changed(peripheral, peer.path, DEVICE, {"Connected": Variant("b", False)})
                del peripheral.devices[central.address]
                self._removed(peripheral, peer.path, [DEVICE])
        finally:
            self._dying.discard(link)

    def _unmirror_gatt(self, device: RemoteDevice) -> None:
        view = device.view
        for dpath in sorted(device.descriptors, reverse=True):
            self._removed(view, dpath, [DESCRIPTOR])
        for cpath in sorted(device.characteristics, reverse=True):
            self._removed(view, cpath, [CHARACTERISTIC])
        for spath in sorted(device.services, reverse=True):
            self._removed(view, spath, [SERVICE])
        device.descriptors.clear()
        device.characteristics.clear()
        device.services.clear()

    def _supervision_timeout(self, link: Link) -> None:
        link.go_silent()

        async def expire() -> None:
            await asyncio.sleep(self.timing.supervision_timeout_ms / 1000.0)
            await self._teardown(link)

        self._spawn(expire())

    # ------------------------------------------------------------------ GATT client side

    def _connected_link(self, device: RemoteDevice) -> Link:
        link = device.link
        if link is None or not link.alive:
            raise att.not_connected()
        return link

    def _char_at(self, adapter: Adapter, path: str) -> tuple[RemoteDevice, RemoteCharacteristic]:
        found = self._find(adapter, path)
        if found is None or found[0] != "char":
            raise UnknownObject(path)
        return self._device_for(adapter, path), found[1]

    def _app_of(self, peripheral: Adapter, app_char: AppCharacteristic) -> GattApplication | None:
        for app in peripheral.applications.values():
            if app.characteristic(app_char.path) is app_char:
                return app
        return None

    def _app_options(self, link: Link, **extra: Variant) -> dict[str, Variant]:
        return {
            "device": Variant("o", device_path(link.central.address)),
            "mtu": Variant("q", link.mtu),
            "link": Variant("s", "LE"),
            **extra,
        }

    async def _app_request(
        self, link: Link, owner: str, path: str, iface: str, member: str,
        signature: str, body: list[Any], permission_error: int,
    ) -> Message:
        """Call the peripheral application; D-Bus errors become ATT errors, as in BlueZ."""
        reply = await self.bus.call(
            Message(destination=owner, path=path, interface=iface, member=member,
                    signature=signature, body=body)
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise att.att_error_to_dbus(
                att.app_error_to_att(reply.error_name or "", permission_error)
            )
        return reply

    async def _att_error_fault(self, link: Link) -> None:
        code = link.peripheral.faults.att_error
        if code is not None:
            link.peripheral.faults.att_error = None
            await link.round_trip(_nothing)
            raise att.att_error_to_dbus(code)

    async def _char_read(self, msg: Message, adapter: Adapter, sender: str) -> Message:
        device, char = self._char_at(adapter, msg.path or "")
        link = self._connected_link(device)
        options = plain(msg.body[0])
        offset = int(options.get("offset", 0))
        if char.reading:
            raise att.in_progress()
        char.reading = True
        try:
            async with link.request_lock:
                await self._att_error_fault(link)
                if "read" not in client_flags(char.app.flags):
                    await link.round_trip(_nothing)
                    raise att.att_error_to_dbus(att.READ_NOT_PERMITTED)
                value = await self._long_read(link, char.app, offset)
        finally:
            char.reading = False
        char.value = value
        self._changed(adapter, char.path, CHARACTERISTIC, {"Value": Variant("ay", value)})
        return Message.new_method_return(msg, "ay", [value])

    async def _long_read(self, link: Link, app_char: AppCharacteristic, offset: int) -> bytes:
        """Read Request, then Read Blob Requests while responses are full (BlueZ client)."""
        app = self._app_of(link.peripheral, app_char)
        if app is None:
            await link.round_trip(_nothing)
            raise att.att_error_to_dbus(att.UNLIKELY_ERROR)
        chunk_max = att.max_read_chunk(link.mtu)
        result = b""
        position = offset
        while True:
            pos = position

            async def read(pos: int = pos) -> bytes:
                reply = await self._app_request(
                    link, app.owner, app_char.path, CHARACTERISTIC, "ReadValue", "a{sv}",
                    [self._app_options(link, offset=Variant("q", pos))],
                    att.READ_NOT_PERMITTED,
                )
                return bytes(reply.body[0])

            try:
                data = await link.to_peripheral(read)
            except BluezError:
                await link.to_central(_nothing)
                raise
            chunk = data[:chunk_max]
            await link.to_central(_nothing)
            result += chunk
            position += len(chunk)
            if len(chunk) < chunk_max or position >= att.MAX_ATTRIBUTE_LEN:
                break
        return result[: max(0, att.MAX_ATTRIBUTE_LEN - offset)]

    async def _char_write(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device, char = self._char_at(adapter, msg.path or "")
        value = bytes(msg.body[0])
        options = plain(msg.body[1])
        link = self._connected_link(device)
        flags = client_flags(char.app.flags)
        kind = str(options.get("type", ""))
        if not kind:
            kind = "request" if "write" in flags else "command"
        if kind == "command":
            if "write-without-response" not in flags:
                raise att.not_supported()
            self._write_command(link, char, value)
            return
        if kind not in ("request", "reliable") or "write" not in flags:
            raise att.not_supported()
        if char.writing:
            raise att.in_progress()
        char.writing = True
        try:
            async with link.request_lock:
                await self._write_request(link, char, value, int(options.get("offset", 0)))
        finally:
            char.writing = False

    def _write_command(self, link: Link, char: RemoteCharacteristic, value: bytes) -> None:
        if len(value) > att.max_write_command(link.mtu):
            raise att.failed("Failed to initiate write")
        app = self._app_of(link.peripheral, char.app)
        if app is None:
            return

        async def deliver() -> None:
            with contextlib.suppress(BluezError):
                await self._app_request(
                    link, app.owner, char.app.path, CHARACTERISTIC, "WriteValue", "aya{sv}",
                    [value, self._app_options(link, offset=Variant("q", 0),
                                              type=Variant("s", "command"))],
                    att.WRITE_NOT_PERMITTED,
                )

        link.to_peripheral(deliver)

    async def _write_request(
        self, link: Link, char: RemoteCharacteristic, value: bytes, offset: int
    ) -> None:
        faults = link.peripheral.faults
        await self._att_error_fault(link)
        if offset + len(value) > att.MAX_ATTRIBUTE_LEN:
            await link.round_trip(_nothing)
            raise att.att_error_to_dbus(att.INVALID_ATTRIBUTE_VALUE_LENGTH)
        if faults.drop_on_write == "before-write":
            faults.drop_on_write = None
            await self._teardown(link)
            raise att.not_connected()
        app = self._app_of(link.peripheral, char.app)
        if app is None:
            await link.round_trip(_nothing)
            raise att.att_error_to_dbus(att.UNLIKELY_ERROR)
        if len(value) > att.max_write_command(link.mtu):
            # Long write: Prepare Write requests (queued by BlueZ's server), then
            # Execute Write, which hands the whole value to the application.
            for _ in range(att.prepare_write_count(len(value), link.mtu)):
                await link.round_trip(_nothing)

        async def write() -> None:
            await self._app_request(
                link, app.owner, char.app.path, CHARACTERISTIC, "WriteValue", "aya{sv}",
                [value, self._app_options(link, offset=Variant("q", offset),
                                          type=Variant("s", "request"))],
                att.WRITE_NOT_PERMITTED,
            )

        try:
            await link.to_peripheral(write)
        except BluezError:
            await link.to_central(_nothing)
            raise
        if faults.drop_on_write == "after-write":
            faults.drop_on_write = None
            await self._teardown(link)
            raise att.not_connected()
        await link.to_central(_nothing)

    async def _app_notify_switch(
        self, peripheral: Adapter, app_char: AppCharacteristic, on: bool
    ) -> None:
        app = self._app_of(peripheral, app_char)
        if app is None:
            return
        with contextlib.suppress(Exception):
            await self.bus.call(
                Message(destination=app.owner, path=app_char.path, interface=CHARACTERISTIC,
                        member="StartNotify" if on else "StopNotify")
            )

    async def _write_cccd(self, link: Link, char: RemoteCharacteristic, on: bool) -> None:
        async with link.request_lock:
            await link.round_trip(lambda: self._app_notify_switch(link.peripheral, char.app, on))
        for desc in link.central.devices[link.peripheral.address].descriptors.values():
            if desc.char_path == char.path and desc.app is None:
                desc.value = b"\x01\x00" if on else b"\x00\x00"

    async def _start_notify(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device, char = self._char_at(adapter, msg.path or "")
        link = self._connected_link(device)
        if not char.app.notifiable:
            raise att.not_supported()
        if char.notify_fd is not None:
            raise att.not_permitted("Notify acquired")
        if sender in char.notify_sessions:
            raise att.in_progress()
        first = not char.notify_sessions
        char.notify_sessions.add(sender)
        if first:
            try:
                await self._write_cccd(link, char, True)
            except BaseException:
                char.notify_sessions.discard(sender)
                raise
            self._changed(adapter, char.path, CHARACTERISTIC, {"Notifying": Variant("b", True)})

    async def _stop_notify(self, msg: Message, adapter: Adapter, sender: str) -> None:
        device, char = self._char_at(adapter, msg.path or "")
        if sender not in char.notify_sessions:
            raise att.failed("No notify session started")
        await self._end_notify_session(device, char, sender)

    async def _end_notify_session(
        self, device: RemoteDevice, char: RemoteCharacteristic, sender: str
    ) -> None:
        char.notify_sessions.discard(sender)
        if char.notifying:
            return
        self._changed(device.view, char.path, CHARACTERISTIC, {"Notifying": Variant("b", False)})
        link = device.link
        if link is not None and link.alive:
            with contextlib.suppress(BluezError):
                await self._write_cccd(link, char, False)

    async def _acquire_notify(self, msg: Message, adapter: Adapter, sender: str) -> Message:
        device, char = self._char_at(adapter, msg.path or "")
        link = self._connected_link(device)
        if not char.app.notifiable:
            raise att.not_supported()
        if char.notify_fd is not None or char.notify_sessions:
            raise att.in_progress()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        fd = ours.detach()
        char.notify_fd = fd
        self._fd_owner[fd] = (device, char, "notify")
        asyncio.get_running_loop().add_reader(fd, self._on_fd_event, fd)
        try:
            await self._write_cccd(link, char, True)
        except BaseException:
            self._release_fd(fd, emit=False)
            theirs.close()
            raise
        self._changed(adapter, char.path, CHARACTERISTIC, {
            "NotifyAcquired": Variant("b", True), "Notifying": Variant("b", True)
        })
        return await self._reply_with_fd(msg, theirs, link.mtu)

    async def _acquire_write(self, msg: Message, adapter: Adapter, sender: str) -> Message:
        device, char = self._char_at(adapter, msg.path or "")
        link = self._connected_link(device)
        if "write-without-response" not in client_flags(char.app.flags):
            raise att.not_supported()
        if char.write_fd is not None:
            raise att.not_permitted("Write acquired")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        fd = ours.detach()
        char.write_fd = fd
        self._fd_owner[fd] = (device, char, "write")
        asyncio.get_running_loop().add_reader(fd, self._on_fd_event, fd)
        self._changed(adapter, char.path, CHARACTERISTIC, {"WriteAcquired": Variant("b", True)})
        return await self._reply_with_fd(msg, theirs, link.mtu)

    async def _reply_with_fd(self, msg: Message, theirs: socket.socket, mtu: int) -> Message:
        reply = Message.new_method_return(msg, "hq", [0, mtu])
        reply.unix_fds = [theirs.fileno()]
        try:
            await self.bus.send(reply)
        finally:
            theirs.close()
        return _ALREADY_SENT

    def _on_fd_event(self, fd: int) -> None:
        owner = self._fd_owner.get(fd)
        if owner is None:
            return
        device, char, kind = owner
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._release_fd(fd)
            return
        if kind == "write" and device.link is not None and device.link.alive:
            with contextlib.suppress(BluezError):
                self._write_command(device.link, char, data)

    def _release_fd(self, fd: int, *, emit: bool = True) -> None:
        owner = self._fd_owner.pop(fd, None)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if owner is None:
            return
        device, char, kind = owner
        if kind == "notify":
            char.notify_fd = None
            if emit:
                self._changed(device.view, char.path, CHARACTERISTIC, {
                    "NotifyAcquired": Variant("b", False), "Notifying": Variant("b", char.notifying)
                })
                if not char.notifying and device.link is not None and device.link.alive:
                    self._spawn(self._quiet(self._write_cccd(device.link, char, False)))
        else:
            char.write_fd = None
            if emit:
                self._changed(device.view, char.path, CHARACTERISTIC,
                              {"WriteAcquired": Variant("b", False)})

    async def _quiet(self, coro: Awaitable[Any]) -> None:
        with contextlib.suppress(BluezError, asyncio.CancelledError):
            await coro

    async def _desc_read(self, msg: Message, adapter: Adapter, sender: str) -> Message:
        found = self._find(adapter, msg.path or "")
        if found is None or found[0] != "desc":
            raise UnknownObject(msg.path or "")
        desc: RemoteDescriptor = found[1]
        device = self._device_for(adapter, desc.path)
        link = self._connected_link(device)
        async with link.request_lock:
            await self._att_error_fault(link)
            if desc.app is None:
                await link.round_trip(_nothing)
                value = desc.value
            else:
                app_desc = desc.app
                app = self._app_of(link.peripheral, device.characteristics[desc.char_path].app)
                if app is None:
                    raise att.not_connected()

                async def read() -> bytes:
                    reply = await self._app_request(
                        link, app.owner, app_desc.path, DESCRIPTOR, "ReadValue", "a{sv}",
                        [self._app_options(link, offset=Variant("q", 0))],
                        att.READ_NOT_PERMITTED,
                    )
                    return bytes(reply.body[0])[: att.max_read_chunk(link.mtu)]

                value = await link.round_trip(read)
        desc.value = value
        self._changed(adapter, desc.path, DESCRIPTOR, {"Value": Variant("ay", value)})
        return Message.new_method_return(msg, "ay", [value])

    async def _desc_write(self, msg: Message, adapter: Adapter, sender: str) -> None:
        found = self._find(adapter, msg.path or "")
        if found is None or found[0] != "desc":
            raise UnknownObject(msg.path or "")
        desc: RemoteDescriptor = found[1]
        if desc.app is None:
            raise att.not_permitted("Write not permitted")
        device = self._device_for(adapter, desc.path)
        link = self._connected_link(device)
        value = bytes(msg.body[0])
        app_desc = desc.app
        app = self._app_of(link.peripheral, device.characteristics[desc.char_path].app)
        if app is None:
            raise att.not_connected()

        async def write() -> None:
            await self._app_request(
                link, app.owner, app_desc.path, DESCRIPTOR, "WriteValue", "aya{sv}",
                [value, self._app_options(link, offset=Variant("q", 0))],
                att.WRITE_NOT_PERMITTED,
            )

        async with link.request_lock:
            await self._att_error_fault(link)
            await link.round_trip(write)

    # ------------------------------------------------------------------ notifications

    def _on_app_properties_changed(self, msg: Message) -> None:
        if len(msg.body) < 2 or msg.body[0] != CHARACTERISTIC or "Value" not in msg.body[1]:
            return
        value = bytes(msg.body[1]["Value"].value)
        for peripheral in list(self.adapters.values()):
            for app in peripheral.applications.values():
                if app.owner != msg.sender:
                    continue
                app_char = app.characteristic(msg.path or "")
                if app_char is not None and app_char.notifiable:
                    self._notify(peripheral, app_char, value)

    def _notify(self, peripheral: Adapter, app_char: AppCharacteristic, value: bytes) -> None:
        for link in list(peripheral.links):
            if link.peripheral is not peripheral or not link.alive:
                continue
            device = link.central.devices.get(peripheral.address)
            if device is None:
                continue
            for char in device.characteristics.values():
                if char.app is not app_char or not char.notifying:
                    continue
                if peripheral.faults.lose_notifications > 0:
                    peripheral.faults.lose_notifications -= 1
                    continue
                payload = value[: att.max_notification(link.mtu)]
                link.to_central(self._deliverer(device, char, payload))

    def _deliverer(
        self, device: RemoteDevice, char: RemoteCharacteristic, payload: bytes
    ) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            char.value = payload
            if char.notify_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(char.notify_fd, payload)
            if char.notify_sessions:
                self._changed(device.view, char.path, CHARACTERISTIC,
                              {"Value": Variant("ay", payload)})

        return deliver

    # ------------------------------------------------------------------ clients leaving

    async def _client_gone(self, name: str) -> None:
        self._pids.pop(name, None)
        for adapter in list(self.adapters.values()):
            if name in adapter.discovery_sessions:
                self._end_discovery(adapter, name)
            for device in adapter.devices.values():
                for char in list(device.characteristics.values()):
                    if name in char.notify_sessions:
                        await self._quiet(self._end_notify_session(device, char, name))
            for key in [k for k in adapter.advertisements if k[0] == name]:
                del adapter.advertisements[key]
            for key in [k for k in adapter.applications if k[0] == name]:
                del adapter.applications[key]
        gone = self.adapters.get(name)
        if gone is None:
            return
        for link in list(gone.links):
            await self._teardown(link)
        for handle in gone.pending_sightings:
            handle.cancel()
        del self.adapters[name]
        # Its devices vanish from every view (the controller is gone for good).
        for other in list(self.adapters.values()):
            stale = other.devices.get(gone.address)
            if stale is not None:
                await self._remove_device(other, stale)

    # ------------------------------------------------------------------ control API

    def resolve(self, target: str) -> Adapter:
        """Find a peripheral adapter by address or advertised/alias name."""
        wanted = target.upper()
        for adapter in self.adapters.values():
            if adapter.address == wanted:
                return adapter
        for adapter in self.adapters.values():
            if target in (adapter.advertised_name(), adapter.alias):
                return adapter
        raise KeyError(f"no simulated peripheral {target!r}")

    def peripherals(self) -> list[tuple[str, str]]:
        return [
            (a.address, a.advertised_name() or a.alias or "")
            for a in self.adapters.values()
            if a.advertisements
        ]

    def refuse_connect(self, target: str, times: int = 1) -> None:
        self.resolve(target).faults.refuse_connect = times

    def delay_connect(self, target: str, seconds: float) -> None:
        self.resolve(target).faults.connect_delay = seconds

    async def drop_link(self, target: str, when: str = "now") -> None:
        if when not in DROP_WHEN:
            raise ValueError(f"when must be one of {DROP_WHEN}")
        peripheral = self.resolve(target)
        if when == "now":
            for link in list(peripheral.links):
                if link.peripheral is peripheral:
                    await self._teardown(link)
        else:
            peripheral.faults.drop_on_write = when

    def att_error_next(self, target: str, code: int = att.UNLIKELY_ERROR) -> None:
        self.resolve(target).faults.att_error = code

    def lose_notifications(self, target: str, count: int = 1) -> None:
        self.resolve(target).faults.lose_notifications = count

    def set_rssi(self, target: str, rssi: int) -> None:
        peripheral = self.resolve(target)
        peripheral.faults.rssi = rssi
        self._refresh_rssi(peripheral)

    def set_in_range(self, target: str, in_range: bool) -> None:
        peripheral = self.resolve(target)
        peripheral.faults.in_range = in_range
        if not in_range:
            for link in list(peripheral.links):
                if link.alive and not link.silent:
                    self._supervision_timeout(link)
        else:
            for scanner in self.adapters.values():
                if scanner is not peripheral and scanner.discovering:
                    self._schedule_sighting(scanner, peripheral)

    def supervision_timeout(self, target: str) -> None:
        peripheral = self.resolve(target)
        for link in list(peripheral.links):
            if link.peripheral is peripheral and link.alive and not link.silent:
                self._supervision_timeout(link)

    def set_timing(self, timing: TimingModel) -> None:
        self.timing = timing
        for adapter in self.adapters.values():
            for link in adapter.links:
                link.timed = timing.enabled
                link.interval = timing.interval

    async def reset(self) -> None:
        """Drop every link, clear faults and forget every discovered device."""
        for adapter in list(self.adapters.values()):
            for link in list(adapter.links):
                await self._teardown(link)
        for adapter in list(self.adapters.values()):
            adapter.faults = PeripheralFaults()
            for device in list(adapter.devices.values()):
                await self._remove_device(adapter, device)
        for scanner in list(self.adapters.values()):
            if scanner.discovering:
                for other in list(self.adapters.values()):
                    if other is not scanner:
                        self._schedule_sighting(scanner, other)

    async def _handle_control(self, msg: Message) -> Message:
        member = msg.member or ""
        if member == "Introspect":
            return Message.new_method_return(msg, "s", [node_xml([CONTROL_IFACE], [])])
        body = msg.body
        try:
            if member == "Reset":
                await self.reset()
            elif member == "GetEnvironment":
                return Message.new_method_return(msg, "a{ss}", [self.environment])
            elif member == "ListPeripherals":
                return Message.new_method_return(msg, "a(ss)", [
                    [list(p) for p in self.peripherals()]
                ])
            elif member == "RefuseConnect":
                self.refuse_connect(body[0], int(body[1]))
            elif member == "DelayConnect":
                self.delay_connect(body[0], float(body[1]))
            elif member == "DropLink":
                await self.drop_link(body[0], body[1])
            elif member == "AttErrorNext":
                self.att_error_next(body[0], int(body[1]))
            elif member == "LoseNotifications":
                self.lose_notifications(body[0], int(body[1]))
            elif member == "SetRssi":
                self.set_rssi(body[0], int(body[1]))
            elif member == "SetInRange":
                self.set_in_range(body[0], bool(body[1]))
            elif member == "SupervisionTimeout":
                self.supervision_timeout(body[0])
            elif member == "SetTiming":
                self.set_timing(replace(
                    self.timing, enabled=bool(body[0]),
                    interval_ms=float(body[1]) or self.timing.interval_ms,
                    adv_interval_ms=float(body[2]) or self.timing.adv_interval_ms,
                ))
            else:
                raise BluezError(UNKNOWN_METHOD, f"No method {member}")
        except KeyError as exc:
            raise BluezError("org.doorstep.Sim.Error.NotFound", str(exc)) from None
        except ValueError as exc:
            raise BluezError("org.doorstep.Sim.Error.InvalidArguments", str(exc)) from None
        return Message.new_method_return(msg)


async def _nothing() -> None:
    return None


# Marker: the reply was already sent (with a file descriptor).
_ALREADY_SENT = Message(message_type=MessageType.METHOD_RETURN, reply_serial=1)
