"""Loses power in the middle of a ``DeviceStore.save`` (for tests/test_device_storage.py).

``python tests/device_storage_crasher.py DIR STEP MODE`` loads the state in
DIR, then saves ``next_state(old)`` and dies at STEP (one of
``device.storage.SAVE_STEPS``, or ``none`` to finish) by MODE: ``exit``
(``os._exit``, no cleanup) or ``sigkill`` (kill -9 of itself).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from device.storage import DeviceState, DeviceStore, PendingBind, StoredIdentity, StoredWifi

EXIT_CODE = 77


def next_state(old: DeviceState) -> DeviceState:
    """The state the crasher tries to save; the parent computes it too."""
    n = old.reset_ctr + 1
    identity = StoredIdentity(bytes([n % 256]) * 16, bytes([(n + 1) % 256]) * 32, n)
    wifi = StoredWifi(b"DoorstepHome", 1, f"passphrase number {n}")
    pending = PendingBind(wifi, identity, bytes([7]) * 32, bytes([9]) * 32, 1700000000.25 + n)
    return old.with_(reset_ctr=n, pending=pending, gate={"failures": n, "backoff_until": 1.5 * n})


def main(argv: list[str]) -> int:
    directory, target, mode = Path(argv[1]), argv[2], argv[3]

    def crash_point(step: str) -> None:
        if step != target:
            return
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(EXIT_CODE)

    store = DeviceStore(directory, crash_point=crash_point)
    store.save(next_state(store.load()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
