"""ATT rules the simulator enforces on every link, and BlueZ's error mapping.

Pure functions and constants, no I/O:

* MTU bounds and the value-size rules of the Attribute Protocol
  (Core Spec v5.3, Vol 3, Part F: §3.2.8 ATT_MTU, §3.2.9 long attribute
  values — 512 bytes at most; a write without response carries MTU−3 bytes;
  a Read/Read Blob response MTU−1; a notification MTU−3);
* how BlueZ turns an ATT error code into a D-Bus error on the central side
  (``create_gatt_dbus_error()`` in ``src/gatt-client.c``), and how it turns an
  application's D-Bus error into an ATT error code on the peripheral side
  (``dbus_error_to_att_ecode()`` in ``src/gatt-database.c``).

Error tree (all raised to D-Bus callers as ``org.bluez.Error.*``)::

    BluezError(name, text)
     └── built by att_error_to_dbus(code) for ATT failures
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_MTU = 23
MAX_MTU = 517
MAX_ATTRIBUTE_LEN = 512

BLUEZ_ERROR = "org.bluez.Error"

# ATT error codes (Core Spec v5.3, Vol 3, Part F, §3.4.1.1).
READ_NOT_PERMITTED = 0x02
WRITE_NOT_PERMITTED = 0x03
INSUFFICIENT_AUTHENTICATION = 0x05
REQUEST_NOT_SUPPORTED = 0x06
INVALID_OFFSET = 0x07
INSUFFICIENT_AUTHORIZATION = 0x08
INSUFFICIENT_ENCRYPTION_KEY_SIZE = 0x0C
INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D
UNLIKELY_ERROR = 0x0E
INSUFFICIENT_ENCRYPTION = 0x0F
APPLICATION_ERROR = 0x80
ALREADY_IN_PROGRESS = 0xFE


@dataclass(frozen=True)
class BluezError(Exception):
    """A D-Bus error reply, spelled exactly as BlueZ spells it."""

    name: str
    text: str

    def __str__(self) -> str:
        return f"{self.name}: {self.text}"


def failed(text: str) -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.Failed", text)


def not_connected() -> BluezError:
    return failed("Not connected")


def in_progress() -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.InProgress", "In Progress")


def not_supported() -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.NotSupported", "Operation is not supported")


def not_permitted(text: str) -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.NotPermitted", text)


def invalid_args(text: str = "Invalid arguments in method call") -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.InvalidArguments", text)


def does_not_exist() -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.DoesNotExist", "Does Not Exist")


def already_exists() -> BluezError:
    return BluezError(f"{BLUEZ_ERROR}.AlreadyExists", "Already Exists")


def att_error_to_dbus(code: int) -> BluezError:
    """BlueZ's ``create_gatt_dbus_error()``: ATT error code → D-Bus error."""
    if code == READ_NOT_PERMITTED:
        return not_permitted("Read not permitted")
    if code == WRITE_NOT_PERMITTED:
        return not_permitted("Write not permitted")
    if code in (
        INSUFFICIENT_AUTHENTICATION,
        INSUFFICIENT_ENCRYPTION,
        INSUFFICIENT_ENCRYPTION_KEY_SIZE,
    ):
        return BluezError(f"{BLUEZ_ERROR}.NotPaired", "Not Paired")
    if code == INVALID_OFFSET:
        return invalid_args("Invalid offset")
    if code == INVALID_ATTRIBUTE_VALUE_LENGTH:
        return invalid_args("Invalid Length")
    if code == INSUFFICIENT_AUTHORIZATION:
        return BluezError(f"{BLUEZ_ERROR}.NotAuthorized", "Operation Not Authorized")
    if code == REQUEST_NOT_SUPPORTED:
        return not_supported()
    if code == 0:
        return failed("Operation failed")
    return failed(f"Operation failed with ATT error: 0x{code:02x}")


def app_error_to_att(error_name: str, permission_error: int) -> int:
    """BlueZ's ``dbus_error_to_att_ecode()``: application D-Bus error → ATT code."""
    table = {
        f"{BLUEZ_ERROR}.Failed": APPLICATION_ERROR,
        f"{BLUEZ_ERROR}.NotSupported": REQUEST_NOT_SUPPORTED,
        f"{BLUEZ_ERROR}.NotAuthorized": INSUFFICIENT_AUTHORIZATION,
        f"{BLUEZ_ERROR}.InvalidValueLength": INVALID_ATTRIBUTE_VALUE_LENGTH,
        f"{BLUEZ_ERROR}.InvalidOffset": INVALID_OFFSET,
        f"{BLUEZ_ERROR}.InProgress": ALREADY_IN_PROGRESS,
        f"{BLUEZ_ERROR}.NotPermitted": permission_error,
    }
    return table.get(error_name, UNLIKELY_ERROR)


def check_mtu(mtu: int) -> int:
    """Validate an ATT_MTU (23…517, BlueZ's upper bound)."""
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"MTU must be in {MIN_MTU}..{MAX_MTU}, got {mtu}")
    return mtu


def max_read_chunk(mtu: int) -> int:
    """Payload of one Read / Read Blob response."""
    return mtu - 1


def max_write_command(mtu: int) -> int:
    """Payload of one Write Command (write without response)."""
    return mtu - 3


def max_notification(mtu: int) -> int:
    """Payload of one Handle Value Notification; BlueZ truncates to this."""
    return mtu - 3


def prepare_write_count(length: int, mtu: int) -> int:
    """Prepare Write requests needed for a long write (each carries MTU−5 bytes)."""
    chunk = mtu - 5
    return max(1, -(-length // chunk))
