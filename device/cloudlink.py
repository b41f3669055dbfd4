"""The device's check-in (§6.4) over ``cloud.client``: final refusals vs. retry-later."""

from __future__ import annotations

from typing import TYPE_CHECKING

from device.runtime import CheckinRefused, CheckinUnavailable
from protocol.display import printable

if TYPE_CHECKING:
    from cloud.client import CloudError


class CloudCheckin:
    """``CheckinService`` on the cloud's HTTP API, signed with the pending key (§6.3)."""

    def __init__(self, base_url: str) -> None:
        from cloud.client import CloudClient

        self._client = CloudClient(base_url)

    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> None:
        from cloud.client import CloudError

        try:
            await self._client.checkin(identifier, k_dev, ack)
        except CloudError as exc:
            # 4xx other than 429 is the cloud's final word; 429/5xx mean later.
            if 400 <= exc.status < 500 and exc.status != 429:
                raise CheckinRefused(f"{exc.status} {exc.code}") from None
            raise CheckinUnavailable(unavailable_reason(exc)) from None

    async def close(self) -> None:
        await self._client.aclose()


def unavailable_reason(exc: CloudError) -> str:
    """A check-in that may work later, in words (never the request, which is signed)."""
    if exc.status == 0:
        return (
            "the cloud did not answer in time"
            if exc.code == "timeout"
            else "the cloud is unreachable"
        )
    if exc.status == 429:
        return "the cloud is busy: 429 too many requests"
    if exc.status >= 500:
        return f"the cloud failed: {exc.status} {printable(exc.code, 40)}"
    return f"the cloud's answer was not understood ({exc.status})"
