"""The cloud's error tree: every refusal the API can give, with a stable ``code``.

One exception handler in :mod:`cloud.app` turns a :class:`CloudProblem` into an
RFC 9457 ``application/problem+json`` answer (``type``, ``title``, ``status``,
``detail``, ``code``). Protocol-core errors (:class:`protocol.errors.DS1Error`)
are translated by :func:`problem_from_ds1`. Details never carry key material.

::

    CloudProblem (status, code)
    ├── BadRequest             400 malformed_message / bad_base64 / bad_hex / wrong_size / cbor_* …
    │   └── BadCommitment      400 bad_commitment       §5.1 step 3, checked first
    ├── Unauthorized           401 unauthorized / bad_signature / clock_skew / nonce_reused
    ├── DeviceRefused          403 device_refused       §6: the single device answer
    ├── HubUnowned             403 hub_unowned          §6.2: a hub without an owner
    ├── AckRefused             403 bad_ack              §6.2: a different / wrong ack
    ├── NotFound               404 unknown_attempt / unknown_device / not_found
    ├── MethodNotAllowed       405 method_not_allowed
    ├── AttemptSuperseded      409 attempt_superseded   a later identity is already active
    ├── AttemptExpired         410 attempt_expired      §6.4: 7 days after bind/start
    ├── PayloadTooLarge        413 payload_too_large    bodies over 16 KiB
    ├── InvalidRequest         422 invalid_request      JSON schema validation
    ├── RateLimited            429 rate_limited         with Retry-After
    ├── ServiceUnavailable     503 entropy_unavailable / storage_unavailable
    └── ConfigurationError     (start-up only) kek_missing / kek_invalid / kek_mismatch /
                                                bad_database_url / database_unavailable
"""

from __future__ import annotations

from typing import Any

from protocol.errors import AuthenticationError, DS1Error, SignatureError

PROBLEM_BASE = "https://doorstep.example/problems/"


class CloudProblem(Exception):
    """A refusal with an HTTP status and a stable code; rendered as problem+json."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.detail = detail if detail is not None else self.title
        self.headers = headers or {}
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }


class BadRequest(CloudProblem):
    status = 400
    code = "malformed_message"
    title = "Malformed request"


class BadCommitment(BadRequest):
    code = "bad_commitment"
    title = "Commitment does not match"


class Unauthorized(CloudProblem):
    status = 401
    code = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        scheme = 'Bearer realm="doorstep", DS1-HMAC realm="doorstep"'
        super().__init__(detail, code=code, headers={"WWW-Authenticate": scheme})


class DeviceRefused(CloudProblem):
    """§6: unknown device, bad tag, registry mismatch, replay, owned by someone else."""

    status = 403
    code = "device_refused"
    title = "Device refused"

    def __init__(self) -> None:
        # The detail is fixed on purpose: every device refusal must look the same.
        super().__init__("the cloud does not accept this device challenge")


class HubUnowned(CloudProblem):
    status = 403
    code = "hub_unowned"
    title = "Hub has no owner"


class AckRefused(CloudProblem):
    status = 403
    code = "bad_ack"
    title = "Ack refused"


class NotFound(CloudProblem):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(CloudProblem):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class UnsupportedMediaType(CloudProblem):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class AttemptSuperseded(CloudProblem):
    status = 409
    code = "attempt_superseded"
    title = "Attempt superseded"


class AttemptExpired(CloudProblem):
    status = 410
    code = "attempt_expired"
    title = "Attempt expired"


class PayloadTooLarge(CloudProblem):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class InvalidRequest(CloudProblem):
    status = 422
    code = "invalid_request"
    title = "Invalid request"


class RateLimited(CloudProblem):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, retry_after: int, scope: str) -> None:
        self.retry_after = max(1, retry_after)
        super().__init__(
            f"rate limit for this {scope} exceeded; retry after {self.retry_after} s",
            headers={"Retry-After": str(self.retry_after)},
        )


class ServiceUnavailable(CloudProblem):
    status = 503
    code = "service_unavailable"
    title = "Service unavailable"


class ConfigurationError(Exception):
    """A start-up problem (missing KEK, bad database URL); ``code`` is stable."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def problem_from_ds1(error: DS1Error) -> CloudProblem:
    """Translate a protocol-core error raised while checking a request."""
    if isinstance(error, SignatureError):
        return Unauthorized(error.message, code=error.code)
    if isinstance(error, AuthenticationError) and error.code == "bad_commitment":
        return BadCommitment(error.message)
    if isinstance(error, AuthenticationError):
        return AckRefused(error.message, code="bad_ack")
    return BadRequest(error.message, code=error.code)
