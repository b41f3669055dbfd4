"""The commissioner's side of the cloud API (§6.1, §6.2, §6.5) over ``cloud.client``.

``CloudLink`` turns the flow's ``BindStartRequest`` into the JSON body,
decodes the 201 (base64url, §6) and translates every cloud refusal into a
DS1 error with a plain-language message, so the onboarding report can tell
the user what happened and what to do. A phone authenticates with its user's
bearer token; a hub with its identity's §6.3 signature.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from cloud.client import CloudClient, CloudError, CloudUnavailable, HubSigner
from phone.commissioner import BindStartAnswer, BoundDevice
from protocol.encoding import b64url_decode, hex_decode
from protocol.errors import DS1Error, MessageError, Status
from protocol.handshake import BindStartRequest


class CloudRefused(DS1Error):
    """The cloud said no; ``code`` is the cloud's stable problem code.

    ``hint`` is what to do about it, when the status's own hint (which speaks
    of the device) would mislead.
    """

    def __init__(
        self, status: Status, code: str, message: str, hint: str = "", *, transient: bool = False
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.hint = hint
        #: the cloud could not be reached or failed itself: the same request may succeed later
        self.transient = transient
        #: not about the device: the cloud unreachable or failing, refusing our
        #: credentials, limiting our rate, or a refusal we have no words for.
        #: ``status`` is only the nearest DS1 one (``phone pair`` exits 20).
        self.outside_ds1 = (
            transient or code in _CREDENTIAL_REFUSALS or code == "rate_limited"
        ) or code not in _MESSAGES


# The cloud refusing the commissioner itself (a phone's token, a hub's signature).
_CREDENTIAL_REFUSALS = frozenset({"unauthorized", "bad_signature", "clock_skew", "hub_unowned"})


_CLOUD_HINTS: dict[str, str] = {
    "unauthorized": "Check the token: Settings in the app, --token or DOORSTEP_TOKEN for a script.",
    "rate_limited": "Wait a moment, then try again.",
}


# The cloud's problem codes, in words a user can act on.
_MESSAGES: dict[str, tuple[Status, str]] = {
    "device_refused": (
        Status.AUTHENTICATION_FAILED,
        "The cloud did not accept this device: it is not registered, not genuine, "
        "or it belongs to someone else (a factory reset lets a new owner bind it).",
    ),
    "rate_limited": (Status.BUSY, "Too many attempts; wait a moment and try again."),
    "unauthorized": (
        Status.AUTHENTICATION_FAILED,
        "The cloud did not accept your token.",
    ),
    "bad_signature": (Status.AUTHENTICATION_FAILED, "The cloud refused this hub's signature."),
    "clock_skew": (Status.AUTHENTICATION_FAILED, "This hub's clock is off by more than 5 minutes."),
    "hub_unowned": (Status.AUTHENTICATION_FAILED, "This hub has no owner in the cloud."),
    "bad_ack": (Status.AUTHENTICATION_FAILED, "The cloud refused the device's acknowledgement."),
    "attempt_expired": (Status.TIMED_OUT, "The pairing took too long; start again."),
    "unknown_attempt": (Status.PROTOCOL_ERROR, "The cloud no longer knows this pairing attempt."),
}


def _translate(exc: CloudError) -> DS1Error:
    if isinstance(exc, CloudUnavailable) and exc.status >= 500:
        # It answered, with a failure of its own: the network is fine.
        return CloudRefused(
            Status.BUSY,
            exc.code,
            f"The cloud could not answer (its error: {exc.code}, HTTP {exc.status}).",
            "Try again in a moment; if it keeps failing, tell whoever runs the cloud.",
            transient=True,
        )
    if isinstance(exc, CloudUnavailable):
        return CloudRefused(
            Status.TIMED_OUT,
            "cloud_unavailable",
            "Cannot reach the cloud.",
            "Check this machine's network and the cloud URL (Settings in the app, --cloud or "
            "DOORSTEP_CLOUD_URL for a script), then try again.",
            transient=True,
        )
    status, message = _MESSAGES.get(
        exc.code, (Status.PROTOCOL_ERROR, f"The cloud refused the request ({exc.code}).")
    )
    if exc.code == "rate_limited" and exc.retry_after:
        message = f"Too many attempts; try again in {exc.retry_after:g} s."
    return CloudRefused(status, exc.code, message, _CLOUD_HINTS.get(exc.code, ""))


@dataclass(frozen=True)
class OwnedDevice:
    """One row of ``GET /v1/devices``."""

    identifier: bytes
    dev_id: bytes
    model: str
    epoch: int
    state: str
    bound_at: float | None
    last_checkin: float | None


class CloudLink:
    """``BindService`` plus owner views on the cloud's HTTP API."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        hub_identity: tuple[bytes, bytes] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_s: float = 0.2,
    ) -> None:
        signer = HubSigner(*hub_identity) if hub_identity is not None else None
        self._client = CloudClient(base_url, token=token, signer=signer, transport=transport)
        self.poll_s = poll_s

    def __repr__(self) -> str:
        return f"CloudLink({self._client!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def bind_start(self, request: BindStartRequest) -> BindStartAnswer:
        try:
            body = await self._client.bind_start(request.to_json())
        except CloudError as exc:
            raise _translate(exc) from None
        try:
            device = body["device"]
            return BindStartAnswer(
                attempt=str(body["attempt"]),
                ticket=b64url_decode(body["ticket"]),
                seal=b64url_decode(body["seal"]),
                session_secret=b64url_decode(body["session_secret"]),
                wrapped_identity=b64url_decode(body["wrapped_identity"]),
                dev_id=hex_decode(device["dev_id"], 16),
                model=str(device["model"]),
                expires_in=int(body["expires_in"]),
            )
        except (KeyError, TypeError, ValueError, MessageError):
            raise CloudRefused(
                Status.PROTOCOL_ERROR, "bad_cloud_answer", "The cloud sent a malformed answer."
            ) from None

    async def bind_complete(self, attempt: str, ack: bytes) -> BoundDevice:
        try:
            body = await self._client.bind_complete(attempt, ack)
            return BoundDevice(
                hex_decode(body["dev_id"], 16),
                hex_decode(body["identifier"], 16),
                int(body["epoch"]),
            )
        except CloudError as exc:
            raise _translate(exc) from None
        except (KeyError, TypeError, ValueError, MessageError):
            raise CloudRefused(
                Status.PROTOCOL_ERROR, "bad_cloud_answer", "The cloud sent a malformed answer."
            ) from None

    async def wait_active(self, identifier: bytes, timeout: float) -> bool:
        """Poll the owner view until the device's check-in made the identity active."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                view = await self._client.device(identifier)
                if view.get("state") == "active" and view.get("identifier") == identifier.hex():
                    return True
            except CloudError:
                pass  # not visible yet, or the cloud is briefly unreachable: keep polling
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_s)

    async def list_devices(self) -> list[OwnedDevice]:
        try:
            rows = await self._client.devices()
        except CloudError as exc:
            raise _translate(exc) from None
        out = []
        for row in rows:
            if not row.get("identifier"):
                continue
            out.append(
                OwnedDevice(
                    identifier=bytes.fromhex(row["identifier"]),
                    dev_id=bytes.fromhex(row["dev_id"]),
                    model=str(row.get("model", "")),
                    epoch=int(row.get("epoch") or 0),
                    state=str(row.get("state", "")),
                    bound_at=row.get("bound_at"),
                    last_checkin=row.get("last_checkin"),
                )
            )
        return out

    async def unbind(self, identifier: bytes) -> None:
        try:
            await self._client.unbind(identifier)
        except CloudError as exc:
            raise _translate(exc) from None
