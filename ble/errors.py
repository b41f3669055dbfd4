"""BLE errors translated at the transport boundary, with DS1 status codes.

::

    LinkError (protocol_error 11)          the link failed or a value was malformed; with
                                           code ``bluetooth_lost``: a peripheral's Bluetooth
                                           service (bluetoothd, its D-Bus) went away
    ├── DeviceNotFound (timed_out 13)      not seen in a scan / out of range
    ├── ConnectFailed (timed_out 13)       connect refused or timed out after retries
    ├── Disconnected (protocol_error 11)   the link dropped
    ├── LinkTimeout (timed_out 13)         no answer in time (supervision timeout, lost notification)
    └── DeviceBusy (busy 9)                the device advertises that a commissioner is connected
"""

from __future__ import annotations

from protocol.errors import DS1Error, Status


class LinkError(DS1Error):
    status = Status.PROTOCOL_ERROR
    code = "link_error"


class DeviceNotFound(LinkError):
    status = Status.TIMED_OUT
    code = "device_not_found"


class ConnectFailed(LinkError):
    status = Status.TIMED_OUT
    code = "connect_failed"


class Disconnected(LinkError):
    status = Status.PROTOCOL_ERROR
    code = "disconnected"


class LinkTimeout(LinkError):
    status = Status.TIMED_OUT
    code = "link_timeout"


class DeviceBusy(LinkError):
    status = Status.BUSY
    code = "busy"


# How a user reaches a Bluetooth stack: the real bluetoothd, or the simulator.
BLUETOOTH_HINT = (
    "is bluetoothd running? for the simulator, start `doorstep sim` and export the "
    "DBUS_SYSTEM_BUS_ADDRESS it prints"
)


def unusable_bluetooth(exc: BaseException) -> str | None:
    """The line "no usable Bluetooth adapter: <why>" if ``exc`` says so, else None.

    A peripheral reports it as ``LinkError`` ``adapter_unavailable``, a central's scan
    as ``scan_failed``; the cause is an ``OSError`` when there is no D-Bus system bus.
    """
    if not isinstance(exc, LinkError) or exc.code not in ("adapter_unavailable", "scan_failed"):
        return None
    cause = exc.__cause__
    # dbus-fast errors name the D-Bus error in ``type``, bleak's in ``dbus_error``
    names = f"{getattr(cause, 'type', '')} {getattr(cause, 'dbus_error', '')} {cause}"
    if isinstance(cause, OSError):
        reason = "the D-Bus system bus is not reachable"
    elif "ServiceUnknown" in names or "NameHasNoOwner" in names:
        reason = "bluetoothd (org.bluez) is not on the D-Bus system bus"
    elif type(cause).__name__ == "InvalidAddressError":
        reason = "DBUS_SYSTEM_BUS_ADDRESS is not a D-Bus address"
    else:
        text = str(cause) if cause is not None else exc.message.removeprefix("cannot scan: ")
        reason = " ".join(text.split()) or exc.code
    return f"no usable Bluetooth adapter: {reason}"
