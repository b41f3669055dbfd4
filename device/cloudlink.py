"""The device's check-in (§6.4) over ``cloud.client``: final refusals vs. retry-later."""

from __future__ import annotations

from device.runtime import CheckinRefused


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
            raise

    async def close(self) -> None:
        await self._client.aclose()
