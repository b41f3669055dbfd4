"""The factory record (PROTOCOL.md §7): what the factory writes into a device.

``{"dev_id": "<32 hex>", "mac": "AA:BB:CC:DD:EE:FF", "initial_key": "<b64url 32 B>", "model": "<≤ 32 bytes>"}``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from protocol.crypto import initial_subkeys
from protocol.encoding import b64url_decode, b64url_encode, hex_decode
from protocol.errors import MessageError

_MAC = re.compile(r"[0-9A-F]{2}(:[0-9A-F]{2}){5}")


@dataclass(frozen=True, repr=False)
class FactoryRecord:
    dev_id: bytes
    mac: bytes
    k_init: bytes
    model: str

    def __repr__(self) -> str:
        return (
            f"FactoryRecord(dev_id={self.dev_id.hex()}, mac={self.mac_text}, model={self.model!r})"
        )

    @cached_property
    def subkeys(self) -> tuple[bytes, bytes, bytes]:
        """(K_hello, K_seal, K_wrap), derived once per record (a device derives them at boot)."""
        return initial_subkeys(self.k_init)

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02X}" for b in self.mac)

    @property
    def ble_name(self) -> str:
        """``Doorstep-XXXX``: the last two MAC bytes in upper-case hex (§2)."""
        return f"Doorstep-{self.mac[4]:02X}{self.mac[5]:02X}"

    def to_json(self) -> dict[str, str]:
        return {
            "dev_id": self.dev_id.hex(),
            "mac": self.mac_text,
            "initial_key": b64url_encode(self.k_init),
            "model": self.model,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> FactoryRecord:
        if not isinstance(data, dict):
            raise MessageError("factory record must be a JSON object", code="bad_factory_record")
        try:
            dev_id = hex_decode(data["dev_id"], 16)
            mac_text = data["mac"]
            if not isinstance(mac_text, str) or not _MAC.fullmatch(mac_text):
                raise MessageError(
                    "mac must look like AA:BB:CC:DD:EE:FF", code="bad_factory_record"
                )
            k_init = b64url_decode(data["initial_key"])
            model = data["model"]
        except KeyError as exc:
            raise MessageError(
                f"factory record lacks {exc.args[0]}", code="bad_factory_record"
            ) from None
        if len(k_init) != 32:
            raise MessageError("initial_key must be 32 bytes", code="bad_factory_record")
        if not isinstance(model, str) or not 1 <= len(model.encode("utf-8")) <= 32:
            raise MessageError("model must be 1–32 bytes of UTF-8", code="bad_factory_record")
        return cls(dev_id, bytes.fromhex(mac_text.replace(":", "")), k_init, model)

    @classmethod
    def loads(cls, text: str) -> FactoryRecord:
        try:
            data = json.loads(text)
        except ValueError:
            raise MessageError(
                "factory record is not valid JSON", code="bad_factory_record"
            ) from None
        return cls.from_json(data)
