"""The cloud's HTTP service (PROTOCOL.md §6): a FastAPI app factory.

``create_app(settings, registry=…, kek=…, entropy=…, clock=…)`` builds the app;
its lifespan owns the database (when it opened it) and a maintenance task that
prunes expired rows and checkpoints SQLite's WAL off the request path. One
exception handler renders every :class:`~cloud.errors.CloudProblem` as RFC 9457
``application/problem+json``; FastAPI's validation errors, 404 and 405 are
converted too, and anything unexpected becomes a bare 500 problem without a
traceback. Bodies over 16 KiB are refused with 413 (declared length and
streamed bytes both count).

``cloud.app:app_from_env`` is the factory uvicorn imports when serving with
several workers (``uvicorn --factory``); it reads ``DOORSTEP_CLOUD_DB`` and the
KEK variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.errors import (
    BadRequest,
    CloudProblem,
    ConfigurationError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from cloud.keys import KeyEncryptionKey, load_kek
from cloud.service import BindService, BindStartInput, Principal
from cloud.settings import ENV_DB, LOG_LEVELS, EntropySourceLike, Settings, default_database_url
from cloud.store.registry import Registry, RegistryTransaction, open_registry

log = logging.getLogger("doorstep.cloud")

PROBLEM_JSON = "application/problem+json"
_B64_TEXT = re.compile(r"[A-Za-z0-9_-]*")  # base64url without padding
_B64 = f"^{_B64_TEXT.pattern}$"
#: §6.1 request fields and their longest accepted text (the model and the front share these).
_BIND_START_FIELDS = {"m1": 4096, "m2": 4096, "commissioner_pub": 64, "commissioner_nonce": 64}


# --- schemas (for validation and the OpenAPI document) -----------------------------------


class BindStartRequest(BaseModel):
    """§6.1 request; binary fields are base64url without padding."""

    m1: str = Field(max_length=_BIND_START_FIELDS["m1"], pattern=_B64)
    m2: str = Field(max_length=_BIND_START_FIELDS["m2"], pattern=_B64)
    commissioner_pub: str = Field(max_length=_BIND_START_FIELDS["commissioner_pub"], pattern=_B64)
    commissioner_nonce: str = Field(
        max_length=_BIND_START_FIELDS["commissioner_nonce"], pattern=_B64
    )


class DeviceSummary(BaseModel):
    dev_id: str
    model: str


class BindStartAnswer(BaseModel):
    attempt: str
    ticket: str
    seal: str
    session_secret: str
    wrapped_identity: str
    device: DeviceSummary
    expires_in: int


class BindCompleteRequest(BaseModel):
    attempt: str = Field(max_length=64, pattern=_B64)
    ack: str = Field(max_length=64, pattern=_B64)


class BindCompleteAnswer(BaseModel):
    dev_id: str
    identifier: str
    epoch: int


class CheckinRequest(BaseModel):
    ack: str = Field(max_length=64, pattern=_B64)


class DeviceView(BaseModel):
    identifier: str | None
    dev_id: str
    model: str
    epoch: int | None
    state: str = Field(description="pending (bound, device not yet checked in) or active")
    bound_at: int | None = Field(description="unix seconds")
    last_checkin: int | None = Field(description="unix seconds")


class Problem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    code: str


_PROBLEM_TITLES: dict[int, str] = {
    400: "Malformed request",
    401: "No or bad credentials",
    403: "Refused",
    404: "No such resource",
    409: "Conflict",
    410: "Gone (expired)",
    413: "Body too large",
    415: "Body not application/json",
    422: "Invalid request",
    429: "Rate limited (Retry-After)",
    503: "Storage or entropy unavailable",
}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The problem+json answers a route can give (schema: ``Problem``)."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "description": _PROBLEM_TITLES[status],
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for status in statuses
    }


# §6: users send a bearer token; hubs (for their owner) and devices sign (§6.3).
_SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "a user's token"},
    "ds1_hmac": {
        "type": "http",
        "scheme": "DS1-HMAC",
        "description": "§6.3: DS1-HMAC id=<identifier hex>, ts=<unix s>, nonce=<b64url>, sig=<b64url>",
    },
}
_USER_OR_HUB: dict[str, Any] = {"security": [{"bearer": []}, {"ds1_hmac": []}]}
_DEVICE: dict[str, Any] = {"security": [{"ds1_hmac": []}]}


async def _credentials_sent(request: Request) -> None:
    """Before the body is validated: a request without credentials learns nothing more."""
    if not request.headers.get("authorization"):
        raise Unauthorized("an Authorization header is required")


async def _json_body(request: Request) -> None:
    """A body sent as another media type is refused as such (it was a 422 about its fields)."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # read as JSON, as before
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json, not {media_type[:60]}")


_AUTHENTICATED = [Depends(_credentials_sent)]
_AUTHENTICATED_JSON = [Depends(_credentials_sent), Depends(_json_body)]


def _with_problem_schema(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with the Problem schema and the security schemes in its components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {})["Problem"] = Problem.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components["securitySchemes"] = _SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


# --- problem rendering -------------------------------------------------------------------


def problem_response(problem: CloudProblem) -> Response:
    return Response(
        content=json.dumps(problem.to_problem()).encode("utf-8"),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=problem.headers,
    )


async def _on_problem(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CloudProblem)
    return problem_response(exc)


async def _on_validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return problem_response(BadRequest("the body is not valid JSON", code="malformed_json"))
    # Name the fields and what is wrong, never echo the values sent.
    parts = []
    for error in errors[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return problem_response(InvalidRequest("; ".join(parts) or "invalid request"))


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    problem: CloudProblem
    if exc.status_code == 404:
        problem = NotFound("no such resource", code="not_found")
    elif exc.status_code == 405:
        problem = MethodNotAllowed("method not allowed on this resource")
        # RFC 9110 §15.5.6: a 405 names the methods the resource has, from every
        # route on its path (Starlette names only the first route's).
        allowed: set[str] = set()
        for route in request.app.router.routes:
            if route.matches(request.scope)[0] is not Match.NONE:
                allowed |= getattr(route, "methods", None) or set()
        if allowed:
            problem.headers = {**problem.headers, "Allow": ", ".join(sorted(allowed))}
    elif exc.status_code == 400:
        problem = BadRequest("the body could not be read", code="malformed_body")
    else:
        problem = CloudProblem(str(exc.detail), code=f"http_{exc.status_code}")
        problem.status = exc.status_code
        problem.title = "HTTP error"
    return problem_response(problem)


async def _on_unexpected(_request: Request, exc: Exception) -> Response:
    log.error("unexpected error: %s", type(exc).__name__)
    return problem_response(CloudProblem("internal error", code="internal_error"))


# --- body limit ----------------------------------------------------------------------------


class BodyLimitMiddleware:
    """413 for a declared or streamed body above ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"request bodies are limited to {self.max_bytes} bytes")
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_problem(
                        send, BadRequest("bad Content-Length", code="malformed_body"), close=True
                    )
                    return
                if declared > self.max_bytes:
                    await _send_problem(send, too_large, close=True)
                    return
        received = 0
        overflow = False
        replied = False

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflow = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replied
            if overflow:
                # Whatever the app made of the aborted read, the answer is 413.
                if not replied:
                    replied = True
                    await _send_problem(send, too_large, close=True)
                return
            if message["type"] == "http.response.start":
                replied = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge:
            if not replied:
                await _send_problem(send, too_large, close=True)


# --- bind/start without the framework's per-request machinery ----------------------------


def _plain_bind_start(body: bytes) -> BindStartInput | None:
    """The four fields if ``body`` is a request :class:`BindStartRequest` accepts as is.

    Stricter than the model (exactly the four keys, nothing else): whatever
    this refuses goes to the FastAPI route, which validates and words the
    error. So both paths accept the same requests and refuse them alike.
    """
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if type(fields) is not dict or len(fields) != len(_BIND_START_FIELDS):
        return None
    for name, limit in _BIND_START_FIELDS.items():
        value = fields.get(name)
        if type(value) is not str or len(value) > limit or not _B64_TEXT.fullmatch(value):
            return None
    return BindStartInput(
        fields["m1"], fields["m2"], fields["commissioner_pub"], fields["commissioner_nonce"]
    )


class BindStartFront:
    """``POST /v1/bind/start`` served straight from ASGI: the cloud's hottest route.

    FastAPI's middleware stack, dependency solving, model validation and
    response wrapping cost more CPU than the bind itself
    (``bench/cloud_load.py``), so :class:`CloudApp` hands this route here
    first. A well-formed JSON request is answered with the same service call,
    status, headers and problem bodies as the route declared on the app, and
    the same 16 KiB body limit; anything else (another content type, a body
    the model would refuse or coerce, a client that disconnects) is handed to
    the FastAPI app with its body replayed, so its errors and the OpenAPI
    schema stay FastAPI's.
    """

    def __init__(
        self,
        app: ASGIApp,
        service: Callable[[], BindService],
        authenticate: Callable[
            [str | None, str, str, Callable[[], Awaitable[bytes]]], Awaitable[Principal]
        ],
        max_bytes: int,
    ) -> None:
        self.app = app
        self.service = service
        self.authenticate = authenticate
        self.max_bytes = max_bytes
        self.answered = 0  # bind/starts answered here rather than by the route (for tests)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request bodies are limited to {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type: bytes | None = None
        authorization: str | None = None
        for name, value in scope["headers"]:
            # The first of repeated headers counts, as in Starlette's ``headers.get``.
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"content-length":
                # Malformed lengths are the body limit's to word: let the app answer.
                if not value.isdigit() or len(value) > 18:
                    await self.app(scope, receive, send)
                    return
                if int(value) > self.max_bytes:
                    await _send_problem(send, self.too_large(), close=True)
                    return
        json_body = content_type == b"application/json"
        chunks: list[bytes] = []
        received = 0
        message: Message = {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # gone: let the route see it
                await self.app(scope, _replay(chunks, message, receive), send)
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _send_problem(send, self.too_large(), close=True)
                return
            chunks.append(chunk)
        body = b"".join(chunks)
        request = _plain_bind_start(body) if json_body else None
        if request is None:
            await self.app(scope, _replay([body], None, receive), send)
            return

        async def raw_body() -> bytes:
            return body

        try:
            principal = await self.authenticate(
                authorization, "POST", _scope_path_and_query(scope), raw_body
            )
            client = scope.get("client")
            answer = await self.service().bind_start(
                principal, request, client[0] if client else "unknown"
            )
        except CloudProblem as refused:
            await _send_problem(send, refused)
            return
        except Exception as exc:
            log.error("unexpected error: %s", type(exc).__name__)
            await _send_problem(send, CloudProblem("internal error", code="internal_error"))
            return
        self.answered += 1
        await _send_response(send, 201, "application/json", answer)


class CloudApp(FastAPI):
    """The cloud's FastAPI app; ``POST /v1/bind/start`` goes to :attr:`front` first."""

    front: BindStartFront | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        front = self.front
        if (
            front is not None
            and scope["type"] == "http"
            and scope["path"] == "/v1/bind/start"
            and scope["method"] == "POST"
        ):
            await front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app without the front: FastAPI's middleware, routing and handlers."""
        await super().__call__(scope, receive, send)


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that first hands back what was already read."""
    pending: list[Message] = [
        {"type": "http.request", "body": b"".join(chunks), "more_body": last is not None}
    ]
    if last is not None:
        pending.append(last)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _send_response(
    send: Send,
    status: int,
    media_type: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    raw_headers = [
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"content-type", media_type.encode("latin-1")),
    ]
    for name, value in (headers or {}).items():
        raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_problem(send: Send, problem: CloudProblem, *, close: bool = False) -> None:
    """What :func:`problem_response` renders, sent as raw ASGI messages.

    ``close``: also end the connection (a body that was cut off mid-read).
    """
    headers = problem.headers | {"Connection": "close"} if close else problem.headers
    body = json.dumps(problem.to_problem()).encode("utf-8")
    await _send_response(send, problem.status, PROBLEM_JSON, body, headers)


# --- the app factory -----------------------------------------------------------------------


def cloud_entropy(env: dict[str, str] | None = None) -> EntropySourceLike:
    """The protocol core's fail-closed source, OS CSPRNG only by default.

    ``/dev/hwrng`` is mixed in (``protocol.entropy.default_entropy``) only with
    ``DOORSTEP_CLOUD_HWRNG=1``: the hardware supplement is read at the device's
    rate (about 9 KB/s here), which would cap bind/start near 75/s.
    """
    from protocol.entropy import EntropySource, default_entropy

    env = dict(os.environ) if env is None else env
    if env.get("DOORSTEP_CLOUD_HWRNG") == "1":
        return default_entropy()
    return EntropySource()


def _path_and_query(request: Request) -> str:
    """The path-and-query as sent (§6.3 signs it byte for byte)."""
    return _scope_path_and_query(request.scope)


def _scope_path_and_query(scope: Scope) -> str:
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    query = scope.get("query_string", b"")
    text = raw.decode("latin-1")
    return text + "?" + query.decode("latin-1") if query else text


def create_app(
    settings: Settings | None = None,
    *,
    registry: Registry | None = None,
    kek: KeyEncryptionKey | bytes | None = None,
    entropy: EntropySourceLike | None = None,
    clock: Callable[[], float] | None = None,
) -> FastAPI:
    """Build the cloud app. Missing KEK → :class:`~cloud.errors.ConfigurationError` ``kek_missing``.

    With ``registry`` given, the caller owns it (and the app is usable without
    running its lifespan, e.g. under ``httpx.ASGITransport``); otherwise the
    lifespan opens ``settings.database_url`` and closes it on shutdown.
    """
    settings = settings or Settings()
    if kek is None:
        kek = load_kek()
    key = kek if isinstance(kek, KeyEncryptionKey) else KeyEncryptionKey(kek)
    if entropy is None:
        entropy = cloud_entropy()
    the_clock = clock or time.time
    state: dict[str, Any] = {}

    def make_service(reg: Registry) -> BindService:
        return BindService(reg, key, settings, entropy, the_clock)

    if registry is not None:
        state["service"] = make_service(registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        opened: Registry | None = None
        if "service" not in state:
            opened = await open_registry(settings.database_url, migrate=settings.auto_migrate)
            state["service"] = make_service(opened)
        maintenance = asyncio.create_task(_maintain(state["service"], settings))
        try:
            yield
        finally:
            maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await maintenance
            if opened is not None:
                await opened.close()
                state.pop("service", None)

    app = CloudApp(
        title="Doorstep cloud",
        version="1",
        summary="DS1 onboarding: bind/start, bind/complete, check-in and owner views (§6).",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.openapi = _with_problem_schema(app)  # type: ignore[method-assign]
    app.add_exception_handler(CloudProblem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)

    def service() -> BindService:
        svc = state.get("service")
        if svc is None:
            raise ServiceUnavailable("the service is starting or stopping", code="not_ready")
        assert isinstance(svc, BindService)
        return svc

    async def authenticate(
        header: str | None, method: str, path: str, body: Callable[[], Awaitable[bytes]]
    ) -> Principal:
        """A user (Bearer) or a hub acting for its owner (DS1-HMAC, §6.3)."""
        if not header:
            raise Unauthorized("an Authorization header is required")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 9110 §11.1)
            return await service().authenticate_user(credentials.lstrip(" "))
        if header.startswith("DS1-HMAC "):
            return await service().authenticate_hub(header, method, path, await body())
        raise Unauthorized("use Bearer or DS1-HMAC authorization")

    async def principal_of(request: Request) -> Principal:
        return await authenticate(
            request.headers.get("authorization"),
            request.method,
            _path_and_query(request),
            request.body,
        )

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.front = BindStartFront(
        app.framework, service, authenticate, max_bytes=settings.max_body_bytes
    )

    def client_address(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def json_response(body: bytes, status: int = 200) -> Response:
        return Response(content=body, status_code=status, media_type="application/json")

    @app.get("/v1/health", tags=["service"], summary="Liveness (no database access)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/bind/start",
        status_code=201,
        response_model=BindStartAnswer,
        responses=_problems(400, 401, 403, 413, 415, 422, 429, 503),
        dependencies=_AUTHENTICATED_JSON,
        openapi_extra=_USER_OR_HUB,
        tags=["bind"],
        summary="§6.1 answer a device challenge (user bearer token or hub signature)",
    )
    async def bind_start(body: BindStartRequest, request: Request) -> Response:
        principal = await principal_of(request)
        answer = await service().bind_start(
            principal,
            BindStartInput(body.m1, body.m2, body.commissioner_pub, body.commissioner_nonce),
            client_address(request),
        )
        return json_response(answer, 201)

    @app.post(
        "/v1/bind/complete",
        response_model=BindCompleteAnswer,
        responses=_problems(400, 401, 403, 404, 409, 410, 413, 415, 422, 503),
        dependencies=_AUTHENTICATED_JSON,
        openapi_extra=_USER_OR_HUB,
        tags=["bind"],
        summary="§6.2 complete an attempt with the device's Ack",
    )
    async def bind_complete(body: BindCompleteRequest, request: Request) -> Response:
        principal = await principal_of(request)
        return json_response(await service().bind_complete(principal, body.attempt, body.ack))

    @app.post(
        "/v1/devices/checkin",
        response_model=BindCompleteAnswer,
        responses=_problems(400, 401, 403, 409, 410, 413, 415, 422, 503),
        dependencies=_AUTHENTICATED_JSON,
        openapi_extra=_DEVICE,
        tags=["devices"],
        summary="§6.4 device check-in, signed (§6.3) with the pending K_dev",
    )
    async def checkin(body: CheckinRequest, request: Request) -> Response:
        header = request.headers.get("authorization")
        if not header or not header.startswith("DS1-HMAC "):
            raise Unauthorized("check-in needs a DS1-HMAC signature", code="bad_signature")
        raw = await request.body()
        caller = await service().authenticate_device(
            header, request.method, _path_and_query(request), raw
        )
        return json_response(await service().checkin(caller, body.ack))

    @app.get(
        "/v1/devices",
        response_model=list[DeviceView],
        responses=_problems(401, 403, 503),
        dependencies=_AUTHENTICATED,
        openapi_extra=_USER_OR_HUB,
        tags=["devices"],
        summary="§6.5 the caller's devices",
    )
    async def devices(request: Request) -> list[dict[str, Any]]:
        return await service().devices(await principal_of(request))

    @app.get(
        "/v1/devices/{identifier}",
        response_model=DeviceView,
        responses=_problems(400, 401, 403, 404, 422, 503),
        dependencies=_AUTHENTICATED,
        openapi_extra=_USER_OR_HUB,
        tags=["devices"],
        summary="§6.5 one of the caller's devices",
    )
    async def device(identifier: str, request: Request) -> dict[str, Any]:
        return await service().device(await principal_of(request), identifier)

    @app.delete(
        "/v1/devices/{identifier}",
        status_code=204,
        responses=_problems(400, 401, 403, 404, 422, 503),
        dependencies=_AUTHENTICATED,
        openapi_extra=_USER_OR_HUB,
        tags=["devices"],
        summary="§6.5 unbind: the owner releases the device; its identities are retired",
    )
    async def unbind(identifier: str, request: Request) -> Response:
        await service().unbind(await principal_of(request), identifier)
        return Response(status_code=204)

    app.state.cloud = state
    return app


async def _maintain(service: BindService, settings: Settings) -> None:
    """Checkpoint the WAL and prune expired rows, off the request path."""
    loop = asyncio.get_running_loop()
    tick = min(settings.checkpoint_interval_s, settings.maintenance_interval_s)
    next_prune = loop.time() + settings.maintenance_interval_s
    while True:
        await asyncio.sleep(tick)
        try:
            if loop.time() >= next_prune:
                next_prune = loop.time() + settings.maintenance_interval_s
                now = service.now()

                async def prune(tx: RegistryTransaction, now: int = now) -> None:
                    await tx.prune(
                        now,
                        attempt_retention_s=settings.attempt_retention_s,
                        rate_window_s=settings.rate_window_s,
                    )

                await service.registry.run(prune, heavy=True)
            await service.registry.checkpoint()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep serving; the next round retries
            log.warning("maintenance failed: %s", type(exc).__name__)


def settings_from_env(env: dict[str, str] | None = None) -> Settings:
    """Settings from ``DOORSTEP_CLOUD_*`` variables (used by ``app_from_env``).

    A variable that is not a number is a :class:`ConfigurationError` naming it.
    """
    env = dict(os.environ) if env is None else env
    numbers: tuple[tuple[str, str, Callable[[str], float]], ...] = (
        ("rate_per_user", "DOORSTEP_CLOUD_RATE_USER", int),
        ("rate_per_device", "DOORSTEP_CLOUD_RATE_DEVICE", int),
        ("rate_per_address", "DOORSTEP_CLOUD_RATE_ADDRESS", int),
        ("rate_window_s", "DOORSTEP_CLOUD_RATE_WINDOW", int),
        ("maintenance_interval_s", "DOORSTEP_CLOUD_MAINTENANCE_S", float),
        ("checkpoint_interval_s", "DOORSTEP_CLOUD_CHECKPOINT_S", float),
    )
    overrides: dict[str, Any] = {}
    for field, name, kind in numbers:
        text = env.get(name)
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ConfigurationError(f"{name} must be {what}", code="bad_settings") from None
        # A window or an interval of 0 divides by zero or spins; a limit of 0 refuses all.
        if not value > 0:
            what = "at least 1" if kind is int else "above 0"
            raise ConfigurationError(f"{name} must be {what}", code="bad_settings")
        overrides[field] = value
    return Settings(database_url=env.get(ENV_DB) or default_database_url(env), **overrides)


def app_from_env() -> FastAPI:
    """The served app, its start-up heap frozen.

    For ``doorstep cloud serve`` and for each worker of ``--workers N``
    (``uvicorn --factory cloud.app:app_from_env``).
    """
    if ENV_LOG_LEVEL in os.environ:  # set by ``doorstep cloud serve`` (--log-level)
        configure_logging(os.environ[ENV_LOG_LEVEL])
    app = create_app(settings_from_env())
    freeze_startup_heap()
    return app


ENV_LOG_LEVEL = "DOORSTEP_CLOUD_LOG_LEVEL"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last resort does)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str) -> None:
    """The cloud's own messages (``doorstep.cloud``) on stderr beside uvicorn's, from ``level``.

    Without this only its warnings reached stderr, through logging's last
    resort, and ``--log-level info`` showed none of its information (such as
    the group-commit figures at shutdown).
    """
    if level.lower() not in LOG_LEVELS:
        raise ConfigurationError(
            f"{ENV_LOG_LEVEL} must be one of {', '.join(LOG_LEVELS)}", code="bad_settings"
        )
    logger = logging.getLogger("doorstep")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s:  %(name)s: %(message)s"))
        logger.addHandler(handler)
    if level.lower() != "warning":  # warning: logging's own default, left as it is
        logger.setLevel(level.upper())


def freeze_startup_heap() -> None:
    """Keep what start-up built (modules, FastAPI's routes and models) out of the collector.

    A served process holds ~70 000 long-lived objects from its start-up; on this
    class of machine a full (generation 2) collection over them held the event
    loop for 27–40 ms, several times a minute under load, and set the p99 of every
    phase of ``bench/cloud_load.py``. Frozen, they are never scanned again
    (a full collection then took ≤ 2.3 ms); garbage made while serving is
    collected as before. Only for served processes: a frozen object is never freed.
    """
    gc.collect()
    gc.freeze()


ProblemHandler = Callable[[Request, Exception], Awaitable[Response]]
