"""The DS1 protocol core (PROTOCOL.md), sans-I/O.

Bytes in, events out; events in, bytes out. Nothing in this package performs
network, BLE or database I/O or imports asyncio; randomness and clocks are
injected (defaults: the OS CSPRNG and the monotonic clock).
"""
