"""The device's persistent state, never half-written (PROTOCOL.md §5.3, §5.6).

What survives a power cycle: ``reset_ctr``, the active identity and the Wi-Fi
network in use, the pending record of §5.3 step 5 (Wi-Fi credentials, the new
identity and its ``Ack``, stored in one atomic write before RESULT 0), and the
§5.6 pairing-gate state (``PairingGate.to_json()``: the failure count ``n``,
``backoff_until``, ``window_until``), and the ``dev_id`` of the factory record
the state belongs to: a store opened for one device refuses another's state, so
no device boots as another one. A state saved before ``dev_id`` was kept has
none; it is taken by the device that next saves it.

On disk the state directory (mode 0700) holds two slots, ``state.a.json`` and
``state.b.json`` (mode 0600). Each is one line of canonical JSON::

    {"format": 1, "generation": 7, "sha256": "<64 hex>", "state": {...}}

``sha256`` is SHA-256 over the canonical JSON (sorted keys, no whitespace,
ASCII) of the object without ``sha256`` — so ``format`` and ``generation`` are
covered as well as the state. Binary fields are lowercase hex (``identifier``,
``ssid``, ``th``) or base64url without padding (``k_dev``, ``ack``).

``save`` always overwrites the slot that does *not* hold the newest valid
state, through a temporary file in the same directory (write, flush, fsync,
``os.replace``, fsync of the directory), with ``generation`` one above the
newest. ``load`` takes the valid slot with the highest generation; a torn or
corrupt slot is logged (by name, never by content) and the other one is used.
So a power loss at any point leaves either the old or the new state.

Errors (``StorageError.code``)::

    StorageError
    ├── state_corrupt           no slot is valid although at least one exists
    ├── state_dir_unusable      the directory cannot be created, is not a
    │                           directory, or cannot be read or secured
    ├── state_invalid           save() was given a state that load() would refuse
    ├── state_other_device      the state belongs to another device's factory record
    └── state_write_failed      the OS refused a write, fsync or rename

Keys and passphrases never appear in a ``repr``, a log line or an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.encoding import b64url_decode, b64url_encode, hex_decode
from protocol.errors import MessageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SLOT_NAMES = ("state.a.json", "state.b.json")
# The steps of one save, in order; ``crash_point`` is called after each.
SAVE_STEPS = ("temp_written", "fsynced", "renamed", "dir_fsynced")
DIR_MODE = 0o700
FILE_MODE = 0o600
# A real state file is well under 2 KiB; anything far larger is not ours.
MAX_SLOT_BYTES = 64 * 1024
_TEMP_PREFIX = ".state-"
_TEMP_SUFFIX = ".tmp"
_U32_MAX = 2**32 - 1
DEV_ID_BYTES = 16  # a factory record's dev_id (§7)


class StorageError(Exception):
    """The device's state cannot be loaded or saved; ``code`` is stable."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, repr=False)
class StoredIdentity:
    """An identity issued by the cloud (§5.3): ``identifier``, ``K_dev``, ``epoch``."""

    identifier: bytes
    k_dev: bytes
    epoch: int

    def __repr__(self) -> str:
        return f"StoredIdentity(identifier={self.identifier.hex()[:8]}…, epoch={self.epoch})"


@dataclass(frozen=True, repr=False)
class StoredWifi:
    """Wi-Fi credentials as PROVISION carried them (§4)."""

    ssid: bytes
    security: int
    passphrase: str

    def __repr__(self) -> str:
        return f"StoredWifi(ssid={self.ssid!r}, security={self.security})"


@dataclass(frozen=True, repr=False)
class PendingBind:
    """The §5.3 step 5 record: kept until the cloud accepts or refuses the check-in."""

    wifi: StoredWifi
    identity: StoredIdentity
    ack: bytes
    th: bytes
    stored_at: float

    def __repr__(self) -> str:
        return (
            f"PendingBind(wifi={self.wifi!r}, identity={self.identity!r}, "
            f"stored_at={self.stored_at})"
        )


@dataclass(frozen=True)
class DeviceState:
    """Everything the device keeps across power cycles."""

    reset_ctr: int = 0
    active: StoredIdentity | None = None
    wifi: StoredWifi | None = None  # the network in use (the active identity's)
    pending: PendingBind | None = None
    gate: dict[str, float | int] = field(default_factory=dict)  # PairingGate.to_json()
    checkins: int = 0  # informational
    dev_id: bytes | None = None  # the factory record's (§7); None in a state saved before it

    def with_(self, **changes: Any) -> DeviceState:
        return dataclasses.replace(self, **changes)


def _no_crash(step: str) -> None:
    """The default ``crash_point``: do nothing."""


# ---------------------------------------------------------------------------
# Encoding: DeviceState ⇄ JSON-able dict, strict on the way in.


class _BadSlot(Exception):
    """A slot that cannot be used; the message names the reason, never the contents."""


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _checksum(format_version: Any, generation: Any, state: Any) -> str:
    body = {"format": format_version, "generation": generation, "state": state}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _encode_identity(identity: StoredIdentity) -> dict[str, Any]:
    return {
        "identifier": identity.identifier.hex(),
        "k_dev": b64url_encode(identity.k_dev),
        "epoch": identity.epoch,
    }


def _encode_wifi(wifi: StoredWifi) -> dict[str, Any]:
    return {"ssid": wifi.ssid.hex(), "security": wifi.security, "passphrase": wifi.passphrase}


def _encode_state(state: DeviceState) -> dict[str, Any]:
    pending = state.pending
    return {
        "reset_ctr": state.reset_ctr,
        "active": None if state.active is None else _encode_identity(state.active),
        "wifi": None if state.wifi is None else _encode_wifi(state.wifi),
        "pending": None
        if pending is None
        else {
            "wifi": _encode_wifi(pending.wifi),
            "identity": _encode_identity(pending.identity),
            "ack": b64url_encode(pending.ack),
            "th": pending.th.hex(),
            "stored_at": pending.stored_at,
        },
        "gate": dict(state.gate),
        "checkins": state.checkins,
        "dev_id": None if state.dev_id is None else state.dev_id.hex(),
    }


def _obj(value: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadSlot(f"{what} is not an object")
    missing = keys - value.keys()
    if missing:
        raise _BadSlot(f"{what} lacks {', '.join(sorted(missing))}")
    return value


def _int(value: Any, what: str, high: int = _U32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise _BadSlot(f"{what} is not an integer in 0..{high}")
    return value


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadSlot(f"{what} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadSlot(f"{what} is not finite")
    return value


def _hex(value: Any, what: str, size: int) -> bytes:
    try:
        return hex_decode(value, size)
    except MessageError:
        raise _BadSlot(f"{what} is not {size} bytes of lowercase hex") from None


def _b64(value: Any, what: str, size: int) -> bytes:
    try:
        raw = b64url_decode(value)
    except MessageError:
        raise _BadSlot(f"{what} is not base64url") from None
    if len(raw) != size:
        raise _BadSlot(f"{what} is not {size} bytes")
    return raw


def _decode_identity(value: Any, what: str) -> StoredIdentity:
    obj = _obj(value, what, {"identifier", "k_dev", "epoch"})
    return StoredIdentity(
        identifier=_hex(obj["identifier"], f"{what}.identifier", 16),
        k_dev=_b64(obj["k_dev"], f"{what}.k_dev", 32),
        epoch=_int(obj["epoch"], f"{what}.epoch"),
    )


def _decode_wifi(value: Any, what: str) -> StoredWifi:
    obj = _obj(value, what, {"ssid", "security", "passphrase"})
    ssid = obj["ssid"]
    if not isinstance(ssid, str) or not 2 <= len(ssid) <= 64 or len(ssid) % 2:
        raise _BadSlot(f"{what}.ssid is not 1–32 bytes of hex")
    passphrase = obj["passphrase"]
    if not isinstance(passphrase, str) or len(passphrase.encode("utf-8", "surrogatepass")) > 128:
        raise _BadSlot(f"{what}.passphrase is not a text of at most 128 bytes")
    try:
        passphrase.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadSlot(f"{what}.passphrase is not valid text") from None
    return StoredWifi(
        ssid=_hex(ssid, f"{what}.ssid", len(ssid) // 2),
        security=_int(obj["security"], f"{what}.security", 3),
        passphrase=passphrase,
    )


def _decode_state(value: Any) -> DeviceState:
    keys = {"reset_ctr", "active", "wifi", "pending", "gate", "checkins"}
    obj = _obj(value, "state", keys)
    pending: PendingBind | None = None
    if obj["pending"] is not None:
        raw = _obj(obj["pending"], "pending", {"wifi", "identity", "ack", "th", "stored_at"})
        stored_at = _number(raw["stored_at"], "pending.stored_at")
        pending = PendingBind(
            wifi=_decode_wifi(raw["wifi"], "pending.wifi"),
            identity=_decode_identity(raw["identity"], "pending.identity"),
            ack=_b64(raw["ack"], "pending.ack", 32),
            th=_hex(raw["th"], "pending.th", 32),
            stored_at=float(stored_at),
        )
    gate_raw = obj["gate"]
    if not isinstance(gate_raw, dict):
        raise _BadSlot("gate is not an object")
    gate = {str(k): _number(v, "gate value") for k, v in gate_raw.items()}
    dev_id_raw = obj.get("dev_id")  # absent from a state saved before it was kept
    return DeviceState(
        reset_ctr=_int(obj["reset_ctr"], "reset_ctr"),
        active=None if obj["active"] is None else _decode_identity(obj["active"], "active"),
        wifi=None if obj["wifi"] is None else _decode_wifi(obj["wifi"], "wifi"),
        pending=pending,
        gate=gate,
        checkins=_int(obj["checkins"], "checkins", 2**63 - 1),
        dev_id=None if dev_id_raw is None else _hex(dev_id_raw, "dev_id", DEV_ID_BYTES),
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def encode_slot(state: DeviceState, generation: int) -> bytes:
    """The bytes of one slot file holding ``state`` at ``generation``."""
    payload = _encode_state(state)
    envelope = {
        "format": FORMAT_VERSION,
        "generation": generation,
        "sha256": _checksum(FORMAT_VERSION, generation, payload),
        "state": payload,
    }
    return _canonical(envelope) + b"\n"


def _decode_slot(data: bytes) -> tuple[int, DeviceState]:
    """``(generation, state)`` from a slot file's bytes; raises ``_BadSlot`` if unusable."""
    if not data:
        raise _BadSlot("empty")
    if len(data) > MAX_SLOT_BYTES:
        raise _BadSlot("too large")
    try:
        envelope = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _BadSlot("torn or not JSON") from None
    obj = _obj(envelope, "slot", {"format", "generation", "sha256", "state"})
    if not isinstance(obj["sha256"], str):
        raise _BadSlot("checksum missing")
    try:
        expected = _checksum(obj["format"], obj["generation"], obj["state"])
    except (ValueError, TypeError, RecursionError):
        raise _BadSlot("checksum mismatch") from None
    if not hmac.compare_digest(expected.encode(), obj["sha256"].encode("utf-8", "surrogatepass")):
        raise _BadSlot("checksum mismatch")
    if obj["format"] != FORMAT_VERSION or isinstance(obj["format"], bool):
        raise _BadSlot("unsupported format")
    generation = obj["generation"]
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise _BadSlot("generation is not a non-negative integer")
    return generation, _decode_state(obj["state"])


# ---------------------------------------------------------------------------
# The store.


@dataclass(frozen=True)
class _SlotReading:
    name: str
    exists: bool
    generation: int | None = None
    state: DeviceState | None = None
    problem: str | None = None


def _newest(readings: list[_SlotReading]) -> tuple[int, str, DeviceState] | None:
    """(generation, slot name, state) of the valid slot with the highest generation."""
    valid = [
        (r.generation, r.name, r.state)
        for r in readings
        if r.generation is not None and r.state is not None
    ]
    return max(valid, key=lambda v: v[0]) if valid else None


class DeviceStore:
    """Two checksummed slots in ``directory``; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        owner: bool = False,
        crash_point: Callable[[str], None] = _no_crash,
        dev_id: bytes | None = None,
    ) -> None:
        """``owner``: this process is the device (it boots from this state).

        Only the owner removes temporary files left by an interrupted save; a
        reader (``doorstep device show``) must not, or it could delete the temp
        file of a save the running device has in flight.

        ``dev_id``: the device whose state this is (its factory record's). ``load``
        then refuses a state saved by another device (``state_other_device``) and
        ``save`` records it; without it, states are read and written as they are.
        """
        self.directory = Path(directory)
        self.dev_id = dev_id
        self._owner = owner
        self._crash_point = crash_point
        self._lock = threading.Lock()
        self._recovered = False
        self._prepare_directory()

    @property
    def last_recovered_from_corruption(self) -> bool:
        """Whether the last ``load`` found a torn or corrupt slot and used the other."""
        return self._recovered

    @property
    def slot_paths(self) -> tuple[Path, Path]:
        return (self.directory / SLOT_NAMES[0], self.directory / SLOT_NAMES[1])

    def load(self) -> DeviceState:
        """The newest valid state; a fresh ``DeviceState()`` if nothing was ever saved."""
        with self._lock:
            readings = self._read_slots()
            bad = [r for r in readings if r.exists and r.state is None]
            for reading in bad:
                log.warning("state slot %s is unusable (%s)", reading.name, reading.problem)
            newest = _newest(readings)
            self._recovered = newest is not None and bool(bad)
            if newest is None:
                if bad:
                    raise StorageError(
                        f"no usable state slot in {self.directory}", code="state_corrupt"
                    )
                return DeviceState()
            generation, name, state = newest
            if bad:
                log.warning("using state slot %s (generation %d)", name, generation)
            if self.dev_id is not None and state.dev_id not in (None, self.dev_id):
                raise StorageError(
                    f"state directory {self.directory} belongs to device {state.dev_id.hex()}, "
                    f"not to this factory record's {self.dev_id.hex()}: pass that device's "
                    "factory record, or another state directory",
                    code="state_other_device",
                )
            return state

    def save(self, state: DeviceState) -> None:
        """Write ``state`` over the older slot, atomically and durably."""
        if self.dev_id is not None:
            state = state.with_(dev_id=self.dev_id)
        try:
            payload = _encode_state(state)
            _decode_state(json.loads(_canonical(payload)))
        except (_BadSlot, AttributeError, TypeError, ValueError) as exc:
            # Never write what load() would refuse: it would look like corruption.
            reason = str(exc) if isinstance(exc, _BadSlot) else type(exc).__name__
            raise StorageError(
                f"refusing to save an invalid state ({reason})", code="state_invalid"
            ) from None
        with self._lock:
            newest = _newest(self._read_slots())
            if newest is None:
                generation, target = 1, SLOT_NAMES[0]
            else:
                generation = newest[0] + 1
                target = SLOT_NAMES[1] if newest[1] == SLOT_NAMES[0] else SLOT_NAMES[0]
            self._write_atomically(target, encode_slot(state, generation))

    # -- internals ---------------------------------------------------------

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            info = self.directory.stat()
            if not stat.S_ISDIR(info.st_mode):
                raise StorageError(
                    f"{self.directory} is not a directory", code="state_dir_unusable"
                )
            if stat.S_IMODE(info.st_mode) != DIR_MODE:
                # It holds key material: nobody else may list or read it.
                os.chmod(self.directory, DIR_MODE)
            if self._owner:
                self._remove_stale_temps()
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(
                f"state directory {self.directory} is unusable: {exc.strerror}",
                code="state_dir_unusable",
            ) from None

    def _remove_stale_temps(self) -> None:
        """Temporary files left by a save that lost power before its rename."""
        for entry in self.directory.iterdir():
            if entry.name.startswith(_TEMP_PREFIX) and entry.name.endswith(_TEMP_SUFFIX):
                entry.unlink(missing_ok=True)

    def _read_slots(self) -> list[_SlotReading]:
        readings = []
        for name in SLOT_NAMES:
            path = self.directory / name
            try:
                with open(path, "rb") as handle:
                    data = handle.read(MAX_SLOT_BYTES + 1)
            except FileNotFoundError:
                readings.append(_SlotReading(name, exists=False))
                continue
            except OSError as exc:
                if not self.directory.is_dir():
                    raise StorageError(
                        f"state directory {self.directory} is unusable",
                        code="state_dir_unusable",
                    ) from None
                readings.append(_SlotReading(name, True, problem=f"unreadable: {exc.strerror}"))
                continue
            try:
                generation, state = _decode_slot(data)
            except _BadSlot as exc:
                readings.append(_SlotReading(name, True, problem=str(exc)))
                continue
            readings.append(_SlotReading(name, True, generation, state))
        return readings

    def _write_atomically(self, name: str, data: bytes) -> None:
        target = self.directory / name
        temp_path: str | None = None
        try:
            fd, temp_path = tempfile.mkstemp(
                prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=self.directory
            )
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), FILE_MODE)
                handle.write(data)
                handle.flush()
                self._crash_point("temp_written")
                os.fsync(handle.fileno())
                self._crash_point("fsynced")
            os.replace(temp_path, target)
            temp_path = None
            self._crash_point("renamed")
            self._fsync_directory()
            self._crash_point("dir_fsynced")
        except OSError as exc:
            raise StorageError(
                f"could not write state slot {name}: {exc.strerror}", code="state_write_failed"
            ) from None
        finally:
            if temp_path is not None:
                try:
                    os.unlink(temp_path)
                except OSError:
                    pass

    def _fsync_directory(self) -> None:
        """Make the rename itself durable."""
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
