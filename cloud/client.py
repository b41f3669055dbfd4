"""An async client for the Doorstep cloud API (§6), for the phone app, hubs and devices.

``CloudClient(base_url, token=…)`` authenticates as a user (Bearer);
``CloudClient(base_url, signer=HubSigner(identifier, k_dev))`` signs every
request as a hub (§6.3). ``checkin`` always signs with the identity it is given.
Every problem+json answer raises :class:`CloudError` (``status``, ``code``,
``title``, ``detail``, ``retry_after``); transport failures raise
:class:`CloudUnavailable`. Retries are left to callers (``retry_after`` says
when a 429 may be retried).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from protocol.encoding import b64url_encode
from protocol.signature import sign_request

DEFAULT_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def cloud_url_problem(url: str, what: str) -> str | None:
    """Why ``url`` is no cloud base URL (``what`` names where it came from), or None.

    One rule for every client of the cloud (``phone pair``'s and ``device run``'s ``--cloud``).
    """
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # ValueError when the port is not a number in 0..65535
    except ValueError:
        ok = False
    if ok:
        return None
    return f"{what} must be an http:// or https:// URL with a host, e.g. https://cloud.example"


class CloudError(Exception):
    """The cloud refused a request (an RFC 9457 problem)."""

    def __init__(
        self,
        status: int,
        code: str,
        title: str = "",
        detail: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"{status} {code}: {detail or title}")


class CloudUnavailable(CloudError):
    """The cloud could not be reached or answered garbage (status 0 or 5xx)."""


@dataclass(frozen=True, repr=False)
class HubSigner:
    """A hub's (or device's) identity for §6.3 signatures; ``repr`` hides K_dev."""

    identifier: bytes
    k_dev: bytes
    clock: Callable[[], float] = time.time
    rng: Callable[[int], bytes] = os.urandom

    def __repr__(self) -> str:
        return f"HubSigner(identifier={self.identifier.hex()})"

    def authorization(self, method: str, path: str, body: bytes) -> str:
        return sign_request(
            self.identifier, self.k_dev, method, path, body, int(self.clock()), self.rng(16)
        )


class CloudClient:
    """Async client; use as ``async with CloudClient(...) as cloud:`` or call :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        signer: HubSigner | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    ) -> None:
        if token is not None and signer is not None:
            raise ValueError("give a user token or a hub signer, not both")
        self._token = token
        self._signer = signer
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)

    def __repr__(self) -> str:
        who = "user" if self._token else "hub" if self._signer else "anonymous"
        return f"CloudClient({str(self._http.base_url)!r}, {who})"

    async def __aenter__(self) -> CloudClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- §6 endpoints ---------------------------------------------------------------------

    async def bind_start(self, request_json: dict[str, str]) -> dict[str, Any]:
        """§6.1; ``request_json`` is ``BindStartRequest.to_json()`` from the protocol core."""
        return dict(await self._call("POST", "/v1/bind/start", request_json))

    async def bind_complete(self, attempt: str, ack: bytes | str) -> dict[str, Any]:
        ack_text = ack if isinstance(ack, str) else b64url_encode(ack)
        body = {"attempt": attempt, "ack": ack_text}
        return dict(await self._call("POST", "/v1/bind/complete", body))

    async def checkin(self, identifier: bytes, k_dev: bytes, ack: bytes) -> dict[str, Any]:
        """§6.4, signed with the device's pending identity."""
        signer = HubSigner(identifier, k_dev)
        body = {"ack": b64url_encode(ack)}
        return dict(await self._call("POST", "/v1/devices/checkin", body, signer=signer))

    async def devices(self) -> list[dict[str, Any]]:
        return list(await self._call("GET", "/v1/devices"))

    async def device(self, identifier: str | bytes) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v1/devices/{_hex(identifier)}"))

    async def unbind(self, identifier: str | bytes) -> None:
        await self._call("DELETE", f"/v1/devices/{_hex(identifier)}")

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        signer: HubSigner | None = None,
    ) -> Any:
        body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        headers = {"accept": "application/json, application/problem+json"}
        if payload is not None:
            headers["content-type"] = "application/json"
        signer = signer or self._signer
        if signer is not None:
            headers["authorization"] = signer.authorization(method, path, body)
        elif self._token is not None:
            headers["authorization"] = f"Bearer {self._token}"
        try:
            response = await self._http.request(method, path, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise CloudUnavailable(0, "timeout", "Timed out", str(exc) or "timed out") from exc
        except httpx.TransportError as exc:
            raise CloudUnavailable(0, "unreachable", "Cloud unreachable", str(exc)) from exc
        if response.status_code == 204:
            return None
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise CloudUnavailable(
                    response.status_code,
                    "bad_response",
                    "Bad response",
                    "the cloud answered with invalid JSON",
                ) from exc
        raise _error_from(response)


def _hex(identifier: str | bytes) -> str:
    return identifier.hex() if isinstance(identifier, bytes) else identifier


_PROBLEM_CODE = re.compile(r"[a-z0-9_]{1,40}")


def _error_from(response: httpx.Response) -> CloudError:
    retry_after: float | None = None
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {}
    cls = CloudUnavailable if response.status_code >= 500 else CloudError
    code = problem.get("code")
    if not (isinstance(code, str) and _PROBLEM_CODE.fullmatch(code)):
        # Whatever answers at the cloud's URL (a proxy, say) writes this: it reaches
        # users' lines and logs, so only a code of our own shape is taken.
        code = f"http_{response.status_code}"
    return cls(
        response.status_code,
        code,
        str(problem.get("title", response.reason_phrase)),
        str(problem.get("detail", "")),
        retry_after,
    )
