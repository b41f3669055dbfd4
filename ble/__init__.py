"""GATT transports for DS1 (PROTOCOL.md §2): thin adapters behind one interface.

``transport`` defines the interface (``Central``/``CentralLink`` for
commissioners, ``Peripheral`` for devices); ``memory`` is an in-memory pair
for fast tests; ``bleak_central`` and ``bless_peripheral`` run on BlueZ
(real bluetoothd, or ``bluezsim`` here). Library exceptions are translated
at this boundary into ``ble.errors`` with DS1 status codes.
"""
