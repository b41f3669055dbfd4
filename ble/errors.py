"""BLE errors translated at the transport boundary, with DS1 status codes.

::

    LinkError (protocol_error 11)          the link failed or a value was malformed
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
