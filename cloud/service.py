"""The bind service: PROTOCOL.md §6.1–§6.5 as domain operations, free of HTTP.

:class:`BindService` answers bind/start, bind/complete, check-in and the owner
views for authenticated principals. It draws every random value (attempt id,
R, seal nonce, identifier, K_dev, W nonce — in that order) from the injected
entropy source and reads time from the injected clock, so the vector's answer
reproduces exactly.

Decisions where §6 leaves room (also in ``docs``):

* Checks at bind/start run in the order of §5.1 step 3: decode, commitment,
  rate limits (per user, per dev_id, per client address), then the device
  checks. All device checks run, with the same work for an unknown device (a
  dummy K_init unwrap and tag verification), and every failure gives the one
  :class:`~cloud.errors.DeviceRefused` answer.
* Epochs are issued at bind/start: each attempt takes the device's next epoch.
  The identity issued there is kept in the attempt row (its K_dev wrapped)
  until the bind completes; it can sign (a check-in that arrives first) and
  be retired like any other meanwhile, but an attempt that never completes
  leaves no identity row behind.
* bind/complete makes the principal's user the owner and records the identity
  as *pending*; the device's check-in (signed with that pending K_dev) makes it
  *active* and retires the older identities. A check-in that arrives first
  also completes the bind. Both are accepted for 7 days after bind/start
  (then 410 ``attempt_expired``); repeating either with the same Ack returns
  the same answer.
* When the owner changes, the previous owner's identities are retired at once.
* Unbind (owner only) clears the owner, retires every identity and supersedes
  pending attempts. An unbound device is owned by nobody, so §6.1's rule
  ("owned by someone else … only after its reset_ctr rose") no longer applies:
  the next user still needs the device's pairing window (physical access), but
  not a factory reset. A device that was never unbound keeps its owner and
  needs a reset for anyone else.
* A bind whose epoch is below the device's active or pending epoch, or whose
  device was meanwhile bound by someone else, is 409 ``attempt_superseded``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud.errors import (
    AckRefused,
    AttemptExpired,
    AttemptSuperseded,
    BadRequest,
    CloudProblem,
    DeviceRefused,
    HubUnowned,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    problem_from_ds1,
)
from cloud.keys import (
    PURPOSE_ANSWER,
    PURPOSE_K_DEV,
    PURPOSE_K_INIT,
    KeyEncryptionKey,
    SecretBytes,
    UnwrapError,
)
from cloud.settings import EntropySourceLike, Settings
from cloud.store.registry import (
    AttemptRecord,
    BindStartCount,
    DeviceRecord,
    IdentityRecord,
    Registry,
    RegistryTransaction,
    UserRecord,
)
from protocol.cloudside import (
    Identity,
    InitialKeys,
    build_seal,
    build_wrapped_identity,
    check_commitment,
    parse_challenge,
    transcript_hash,
    verify_ack,
    verify_challenge_tag,
)
from protocol.encoding import b64url_decode, b64url_encode, cbor_encode, hex_decode
from protocol.errors import AuthenticationError, DS1Error, SignatureError
from protocol.signature import parse_authorization, verify_request

log = logging.getLogger("doorstep.cloud")

Clock = Callable[[], float]

_DUMMY_DEV_ID = b"\x00" * 16
_BIND_DRAW = 16 + 32 + 12 + 16 + 32 + 12
_PRINCIPAL_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, or a hub acting for its owning user (§6.2)."""

    name: str  # "user:<id>" or "hub:<identifier hex>"
    user_id: int


@dataclass(frozen=True)
class DeviceCaller:
    """A device authenticated by a §6.3 signature with one of its identities."""

    identifier: bytes
    k_dev: SecretBytes


@dataclass(frozen=True)
class BindStartInput:
    """The four §6.1 fields as sent (base64url text)."""

    m1: str
    m2: str
    commissioner_pub: str
    commissioner_nonce: str


def hash_token(token: str) -> bytes:
    """Bearer tokens are 32 random bytes: SHA-256 is enough at rest."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def _decode(text: str, size: int | None, what: str) -> bytes:
    try:
        raw = b64url_decode(text)
    except DS1Error as exc:
        raise BadRequest(f"{what} is not base64url without padding", code=exc.code) from None
    if size is not None and len(raw) != size:
        raise BadRequest(f"{what} must be {size} bytes", code="wrong_size")
    return raw


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _json_text(text: str) -> str:
    return json.dumps(text)  # ensure_ascii, as in _json


#: The 201 body of bind/start, the bytes ``_json`` gives for it: base64url and hex
#: need no escaping, the model is escaped by ``_json_text``.
_ANSWER = (
    '{"attempt":"%s","ticket":"%s","seal":"%s","session_secret":"%s",'
    '"wrapped_identity":"%s","device":{"dev_id":"%s","model":%s},"expires_in":%d}'
)


class BindService:
    """§6 for many homes at once, over one :class:`Registry`."""

    def __init__(
        self,
        registry: Registry,
        kek: KeyEncryptionKey,
        settings: Settings,
        entropy: EntropySourceLike,
        clock: Clock,
    ) -> None:
        self.registry = registry
        self.kek = kek
        self.settings = settings
        self.entropy = entropy
        self.clock = clock
        # Known bearer tokens (by hash) for settings.token_cache_s: saves a
        # database round trip on every user request. Unknown tokens are not kept.
        self._principals: dict[bytes, tuple[Principal, float]] = {}
        # Same-cost stand-ins for an unknown device (timing, §6).
        self._dummy_k_init_wrapped = kek.wrap(PURPOSE_K_INIT, _DUMMY_DEV_ID, b"\x5a" * 32)

    def now(self) -> int:
        return int(self.clock())

    def _draw(self, n: int) -> bytes:
        try:
            data = self.entropy.read(n)
        except DS1Error as exc:
            raise ServiceUnavailable("entropy source unavailable", code=exc.code) from None
        except Exception:
            raise ServiceUnavailable(
                "entropy source unavailable", code="entropy_unavailable"
            ) from None
        if len(data) != n:
            raise ServiceUnavailable("entropy source unavailable", code="entropy_unavailable")
        return data

    # -- authentication -----------------------------------------------------------------

    async def authenticate_user(self, token: str) -> Principal:
        token_hash = hash_token(token)
        now = self.clock()
        cached = self._principals.get(token_hash)
        if cached is not None and cached[1] > now:
            return cached[0]

        async def body(tx: RegistryTransaction) -> UserRecord | None:
            return await tx.user_by_token_hash(token_hash)

        user = await self.registry.run(body)
        if user is None:
            raise Unauthorized("unknown bearer token", code="unauthorized")
        principal = Principal(f"user:{user.user_id}", user.user_id)
        if self.settings.token_cache_s > 0:
            if len(self._principals) >= _PRINCIPAL_CACHE_SIZE:
                self._principals.clear()
            self._principals[token_hash] = (principal, now + self.settings.token_cache_s)
        return principal

    async def _verify_signature(
        self, tx: RegistryTransaction, header: str, method: str, path: str, body: bytes
    ) -> tuple[IdentityRecord, SecretBytes]:
        try:
            auth = parse_authorization(header)
        except SignatureError as exc:
            raise problem_from_ds1(exc) from None
        identity = await tx.identity(auth.identifier)
        if identity is None or identity.state == "retired":
            raise Unauthorized("unknown or retired identifier", code="bad_signature")
        k_dev = self._unwrap(PURPOSE_K_DEV, identity.identifier, identity.k_dev_wrapped)
        now = self.clock()
        try:
            verify_request(
                auth, k_dev, method, path, body, now=now, max_skew=self.settings.max_skew_s
            )
        except SignatureError as exc:
            raise problem_from_ds1(exc) from None
        keep_until = int(max(now, auth.ts)) + self.settings.max_skew_s + 1
        if not await tx.use_nonce(auth.identifier, auth.nonce, keep_until):
            raise Unauthorized("signature nonce already used", code="nonce_reused")
        return identity, SecretBytes(k_dev)

    async def authenticate_hub(self, header: str, method: str, path: str, body: bytes) -> Principal:
        """A hub: an active identity of a device that has an owner (§6.2)."""

        async def run(tx: RegistryTransaction) -> tuple[IdentityRecord, DeviceRecord | None]:
            identity, _ = await self._verify_signature(tx, header, method, path, body)
            return identity, await tx.device(identity.dev_id)

        identity, device = await self.registry.run(run)
        if identity.state != "active" or device is None:
            raise Unauthorized("hubs sign with their active identity", code="bad_signature")
        if device.owner_id is None:
            raise HubUnowned("this hub has no owner; bind it first")
        return Principal(f"hub:{identity.identifier.hex()}", device.owner_id)

    async def authenticate_device(
        self, header: str, method: str, path: str, body: bytes
    ) -> DeviceCaller:

        async def run(tx: RegistryTransaction) -> tuple[IdentityRecord, SecretBytes]:
            return await self._verify_signature(tx, header, method, path, body)

        identity, k_dev = await self.registry.run(run)
        return DeviceCaller(identity.identifier, k_dev)

    def _unwrap(self, purpose: bytes, owner: bytes, wrapped: bytes) -> bytes:
        try:
            return self.kek.unwrap(purpose, owner, wrapped)
        except UnwrapError:
            log.error("a wrapped %s did not open: wrong KEK or tampered row", purpose.decode())
            raise ServiceUnavailable(
                "stored key material does not open", code="storage_unavailable"
            ) from None

    # -- §6.1 bind/start ------------------------------------------------------------------

    async def bind_start(
        self, principal: Principal, request: BindStartInput, client_address: str
    ) -> bytes:
        """The 201 body (exact JSON bytes) for a bind/start request."""
        # 1. decode
        m1 = _decode(request.m1, None, "m1")
        m2 = _decode(request.m2, None, "m2")
        commissioner_pub = _decode(request.commissioner_pub, 32, "commissioner_pub")
        commissioner_nonce = _decode(request.commissioner_nonce, 16, "commissioner_nonce")
        try:
            challenge = parse_challenge(m2)
            # 2. commitment
            check_commitment(m1, commissioner_pub, commissioner_nonce)
        except DS1Error as exc:
            raise problem_from_ds1(exc) from None
        now = self.now()
        request_hash = hashlib.sha256(
            "\n".join(
                (
                    principal.name,
                    request.m1,
                    request.m2,
                    request.commissioner_pub,
                    request.commissioner_nonce,
                )
            ).encode("utf-8")
        ).digest()

        # A hardware entropy supplement is slow (§7 of OPERATIONS.md): read it off the
        # event loop, before the transaction (SQLite runs bodies on the loop's thread).
        # Refused requests then read it too, which keeps their timing alike.
        early_draw = (
            await asyncio.to_thread(self._draw, _BIND_DRAW)
            if getattr(self.entropy, "hardware_active", False)
            else None
        )

        async def body(tx: RegistryTransaction) -> bytes | RateLimited | None:
            window = self.settings.rate_window_s
            start = now - now % window
            device, count, previous = await tx.open_bind_start(
                challenge.dev_id, challenge.n_d, start
            )
            # 3. rate limits: their counts are kept even when the request is refused
            limited = await self._rate_limit(
                tx, principal, challenge.dev_id, device, count.hits, client_address, now, start
            )
            if limited is not None:
                await tx.save_bind_start(challenge.dev_id, count, None)
                return limited
            # 4. device checks, then the attempt
            accepted, keys = self._device_challenge_ok(device, m1, m2, challenge)
            answer: bytes | None = None
            if previous is not None:
                answer = self._identical_retry(previous, principal, request_hash, now)
                accepted = accepted and answer is not None
            elif device is not None and device.owner_id not in (None, principal.user_id):
                bound_ctr = device.bound_reset_ctr if device.bound_reset_ctr is not None else -1
                accepted = accepted and challenge.reset_ctr > bound_ctr
            if not accepted or device is None or answer is not None:
                await tx.save_bind_start(challenge.dev_id, count, None)
            if not accepted or device is None:
                await tx.audit(
                    "refused",
                    now,
                    dev_id=challenge.dev_id,
                    user_id=principal.user_id,
                    principal=principal.name,
                    detail="bind/start",
                )
                return None
            if answer is not None:
                return answer
            return await self._new_attempt(
                tx,
                device,
                count,
                keys,
                principal,
                request_hash,
                m1,
                m2,
                challenge,
                commissioner_pub,
                commissioner_nonce,
                now,
                early_draw,
            )

        outcome = await self.registry.run(body)
        if isinstance(outcome, RateLimited):
            raise outcome
        if outcome is None:
            raise DeviceRefused()
        return outcome

    def _device_challenge_ok(
        self, device: DeviceRecord | None, m1: bytes, m2: bytes, challenge: Any
    ) -> tuple[bool, InitialKeys]:
        """Tag and registry checks, and the keys of K_init they used; an unknown device
        costs the same (all three keys are derived either way: one HKDF-Extract)."""
        if device is None:
            k_init = self.kek.unwrap(PURPOSE_K_INIT, _DUMMY_DEV_ID, self._dummy_k_init_wrapped)
        else:
            k_init = self._unwrap(PURPOSE_K_INIT, device.dev_id, device.k_init_wrapped)
        keys = InitialKeys.derive(k_init)
        try:
            verify_challenge_tag(keys, m1, m2)
            tag_ok = True
        except AuthenticationError:
            tag_ok = False
        if device is None:
            return False, keys
        return (
            tag_ok
            & (challenge.mac == device.mac)
            & (challenge.model == device.model)
            & (challenge.reset_ctr >= device.max_reset_ctr)
        ), keys

    def _identical_retry(
        self,
        attempt: AttemptRecord,
        principal: Principal,
        request_hash: bytes,
        now: int,
    ) -> bytes | None:
        """The first 201 for an identical request before ``expires_in``, else None."""
        if attempt.principal != principal.name or now >= attempt.expires_at:
            return None
        if not SecretBytes(attempt.request_hash).equals(request_hash):
            return None
        return self._unwrap(PURPOSE_ANSWER, attempt.attempt_id, attempt.answer_wrapped)

    async def _new_attempt(
        self,
        tx: RegistryTransaction,
        device: DeviceRecord,
        count: BindStartCount,
        keys: InitialKeys,
        principal: Principal,
        request_hash: bytes,
        m1: bytes,
        m2: bytes,
        challenge: Any,
        commissioner_pub: bytes,
        commissioner_nonce: bytes,
        now: int,
        draw: bytes | None,
    ) -> bytes:
        # One read, sliced in the order attempt id, R, seal nonce, identifier,
        # K_dev, W nonce: each read of the health-tested source has a fixed cost.
        if draw is None:
            draw = self._draw(_BIND_DRAW)
        attempt_id, session_secret, seal_nonce = draw[:16], draw[16:48], draw[48:60]
        identifier, k_dev, w_nonce = draw[60:76], draw[76:108], draw[108:120]
        # Each attempt takes the device's next epoch; the highest reset_ctr seen rises.
        epoch = device.last_epoch + 1
        await tx.save_bind_start(device.dev_id, count, epoch, challenge.reset_ctr)
        ticket = cbor_encode(
            {
                1: attempt_id,
                2: principal.name,
                3: now,
                4: self.settings.ticket_validity_s,
                5: 0,
            }
        )
        th = transcript_hash(m1, m2, commissioner_pub, commissioner_nonce, ticket)
        seal = build_seal(keys, th, challenge.n_d, session_secret, seal_nonce)
        wrapped_identity = build_wrapped_identity(
            keys, th, Identity(identifier, k_dev, epoch), w_nonce
        )
        answer = (
            _ANSWER
            % (
                b64url_encode(attempt_id),
                b64url_encode(ticket),
                b64url_encode(seal),
                b64url_encode(session_secret),
                b64url_encode(wrapped_identity),
                device.dev_id.hex(),
                _json_text(device.model),
                self.settings.attempt_validity_s,
            )
        ).encode("ascii")
        # The identity stays in the attempt row until the bind completes (_complete).
        await tx.insert_attempt(
            AttemptRecord(
                attempt_id=attempt_id,
                dev_id=device.dev_id,
                principal=principal.name,
                user_id=principal.user_id,
                request_hash=request_hash,
                th=th,
                identifier=identifier,
                epoch=epoch,
                reset_ctr=challenge.reset_ctr,
                answer_wrapped=self.kek.wrap(PURPOSE_ANSWER, attempt_id, answer),
                created_at=now,
                expires_at=now + self.settings.attempt_validity_s,
                state="pending",
                ack=None,
                completed_at=None,
                n_d=challenge.n_d,
                k_dev_wrapped=self.kek.wrap(PURPOSE_K_DEV, identifier, k_dev),
            )
        )
        return answer

    async def _rate_limit(
        self,
        tx: RegistryTransaction,
        principal: Principal,
        dev_id: bytes,
        device: DeviceRecord | None,
        device_hits: int,
        client_address: str,
        now: int,
        start: int,
    ) -> RateLimited | None:
        """Count this request in the user's and the address's buckets; the first bucket
        over its limit, if any.

        A registered device is counted in its own row (``device_hits``, read
        with it), an unknown dev_id in a ``dev:`` bucket here, with the same limit.
        """
        user_bucket, address_bucket = f"user:{principal.user_id}", f"addr:{client_address}"
        buckets = [user_bucket, address_bucket]
        if device is None:
            device_bucket = f"dev:{dev_id.hex()}"
            buckets.append(device_bucket)
        counts = await tx.hits(buckets, start)
        if device is None:
            device_hits = counts[device_bucket]
        for hits, limit, scope in (
            (counts[user_bucket], self.settings.rate_per_user, "user"),
            (device_hits, self.settings.rate_per_device, "device"),
            (counts[address_bucket], self.settings.rate_per_address, "client address"),
        ):
            if hits > limit:
                return RateLimited(start + self.settings.rate_window_s - now, scope)
        return None

    # -- §6.2 bind/complete and §6.4 check-in ----------------------------------------------

    async def bind_complete(self, principal: Principal, attempt_text: str, ack_text: str) -> bytes:
        attempt_id = _decode(attempt_text, 16, "attempt")
        ack = _decode(ack_text, 32, "ack")
        now = self.now()

        async def body(tx: RegistryTransaction) -> bytes:
            attempt = await tx.attempt(attempt_id)
            if attempt is None or attempt.user_id != principal.user_id:
                raise NotFound("no such attempt", code="unknown_attempt")
            device = await tx.device(attempt.dev_id, lock=True)
            attempt = await tx.attempt(attempt_id)  # re-read under the device lock
            assert device is not None and attempt is not None
            return await self._complete(tx, device, attempt, ack, now, via="bind_complete")

        return await self.registry.run(body)

    async def checkin(self, caller: DeviceCaller, ack_text: str) -> bytes:
        ack = _decode(ack_text, 32, "ack")
        now = self.now()

        async def run(tx: RegistryTransaction) -> bytes:
            identity = await tx.identity(caller.identifier)
            if identity is None:
                raise Unauthorized("unknown identifier", code="bad_signature")
            device = await tx.device(identity.dev_id, lock=True)
            identity = await tx.identity(caller.identifier)
            if identity is None or identity.state == "retired" or device is None:
                raise Unauthorized("identifier retired", code="bad_signature")
            attempt = await tx.attempt(identity.attempt_id)
            if attempt is None:
                raise AttemptExpired("the bind of this identity is no longer known")
            body = await self._complete(tx, device, attempt, ack, now, via="checkin")
            device = await tx.device(identity.dev_id)
            assert device is not None
            await self._activate(tx, device, identity, now)
            return body

        return await self.registry.run(run)

    async def _complete(
        self,
        tx: RegistryTransaction,
        device: DeviceRecord,
        attempt: AttemptRecord,
        ack: bytes,
        now: int,
        *,
        via: str,
    ) -> bytes:
        body = _json(
            {
                "dev_id": attempt.dev_id.hex(),
                "identifier": attempt.identifier.hex(),
                "epoch": attempt.epoch,
            }
        )
        if now > attempt.created_at + self.settings.completion_window_s:
            raise AttemptExpired("the attempt is older than the completion window")
        if attempt.state == "bound":
            if attempt.ack is None or not SecretBytes(attempt.ack).equals(ack):
                raise AckRefused("a different ack was already accepted for this attempt")
            return body
        if attempt.state == "superseded":
            raise AttemptSuperseded("a later bind of this device replaced this attempt")
        k_dev_wrapped = attempt.k_dev_wrapped
        if k_dev_wrapped is None:  # an attempt made before schema version 5: its own row
            identity = await tx.identity(attempt.identifier)
            if identity is None:
                raise AttemptExpired("the identity of this attempt is no longer known")
            k_dev_wrapped = identity.k_dev_wrapped
        k_dev = self._unwrap(PURPOSE_K_DEV, attempt.identifier, k_dev_wrapped)
        try:
            verify_ack(
                k_dev,
                attempt.dev_id,
                Identity(attempt.identifier, k_dev, attempt.epoch),
                attempt.th,
                ack,
            )
        except AuthenticationError:
            raise AckRefused("the ack does not verify") from None
        newest = max(device.active_epoch or 0, device.pending_epoch or 0)
        bound_ctr = device.bound_reset_ctr if device.bound_reset_ctr is not None else -1
        taken = device.owner_id not in (None, attempt.user_id) and attempt.reset_ctr <= bound_ctr
        if newest > attempt.epoch or taken:
            raise AttemptSuperseded("a later bind of this device replaced this attempt")
        owner_changed = device.owner_id != attempt.user_id
        if owner_changed:
            await tx.retire_identities(device.dev_id, below_epoch=attempt.epoch)
        await tx.mark_attempt_bound(attempt.attempt_id, ack, now)
        if attempt.k_dev_wrapped is not None:  # the identity leaves its attempt row
            await tx.insert_identity(
                IdentityRecord(
                    identifier=attempt.identifier,
                    dev_id=attempt.dev_id,
                    epoch=attempt.epoch,
                    k_dev_wrapped=attempt.k_dev_wrapped,
                    state="pending",
                    attempt_id=attempt.attempt_id,
                    issued_at=attempt.created_at,
                    activated_at=None,
                )
            )
        await tx.supersede_attempts(device.dev_id, below_epoch=attempt.epoch)
        active = (
            None
            if owner_changed or device.active_identifier is None
            else (device.active_identifier, device.active_epoch or 0)
        )
        await tx.set_binding(
            device.dev_id,
            owner_id=attempt.user_id,
            bound_reset_ctr=attempt.reset_ctr,
            bound_at=now,
            active=active,
            pending=(attempt.identifier, attempt.epoch),
            last_checkin=device.last_checkin,
        )
        await tx.audit(
            "bind",
            now,
            dev_id=device.dev_id,
            identifier=attempt.identifier,
            user_id=attempt.user_id,
            principal=attempt.principal,
            detail=f"via {via}, epoch {attempt.epoch}",
        )
        return body

    async def _activate(
        self, tx: RegistryTransaction, device: DeviceRecord, identity: IdentityRecord, now: int
    ) -> None:
        """Check-in: the identity becomes active, older ones are retired (§6.4)."""
        if identity.state == "pending":
            await tx.activate_identity(identity.identifier, now)
            await tx.retire_identities(device.dev_id, below_epoch=identity.epoch)
        pending = (
            (device.pending_identifier, device.pending_epoch or 0)
            if device.pending_identifier is not None
            and device.pending_identifier != identity.identifier
            and (device.pending_epoch or 0) > identity.epoch
            else None
        )
        await tx.set_binding(
            device.dev_id,
            owner_id=device.owner_id,
            bound_reset_ctr=device.bound_reset_ctr,
            bound_at=device.bound_at,
            active=(identity.identifier, identity.epoch),
            pending=pending,
            last_checkin=now,
        )
        await tx.audit(
            "checkin",
            now,
            dev_id=device.dev_id,
            identifier=identity.identifier,
            user_id=device.owner_id,
            detail=f"epoch {identity.epoch}",
        )

    # -- §6.5 owner views -------------------------------------------------------------------

    @staticmethod
    def device_view(device: DeviceRecord) -> dict[str, Any]:
        """What an owner sees: never keys."""
        identifier: bytes | None
        if device.pending_identifier is not None:
            identifier, epoch, state = device.pending_identifier, device.pending_epoch, "pending"
        else:
            identifier, epoch, state = device.active_identifier, device.active_epoch, "active"
        return {
            "identifier": identifier.hex() if identifier else None,
            "dev_id": device.dev_id.hex(),
            "model": device.model,
            "epoch": epoch,
            "state": state,
            "bound_at": device.bound_at,
            "last_checkin": device.last_checkin,
        }

    async def devices(self, principal: Principal) -> list[dict[str, Any]]:

        async def body(tx: RegistryTransaction) -> list[DeviceRecord]:
            return await tx.devices_of(principal.user_id)

        devices = await self.registry.run(body)
        return [self.device_view(device) for device in devices]

    async def _owned_device(
        self, tx: RegistryTransaction, principal: Principal, identifier_hex: str
    ) -> DeviceRecord:
        try:
            identifier = hex_decode(identifier_hex, 16)
        except DS1Error as exc:
            raise BadRequest("identifier must be 32 lowercase hex digits", code=exc.code) from None
        identity = await tx.identity(identifier)
        device = None if identity is None else await tx.device(identity.dev_id, lock=True)
        if (
            device is None
            or device.owner_id != principal.user_id
            or identifier not in (device.active_identifier, device.pending_identifier)
        ):
            raise NotFound("no such device among yours", code="unknown_device")
        return device

    async def device(self, principal: Principal, identifier_hex: str) -> dict[str, Any]:

        async def body(tx: RegistryTransaction) -> DeviceRecord:
            return await self._owned_device(tx, principal, identifier_hex)

        return self.device_view(await self.registry.run(body))

    async def unbind(self, principal: Principal, identifier_hex: str) -> None:
        now = self.now()

        async def body(tx: RegistryTransaction) -> None:
            device = await self._owned_device(tx, principal, identifier_hex)
            await tx.retire_identities(device.dev_id, below_epoch=None)
            await tx.supersede_attempts(device.dev_id, below_epoch=None)
            await tx.set_binding(
                device.dev_id,
                owner_id=None,
                bound_reset_ctr=device.bound_reset_ctr,
                bound_at=None,
                active=None,
                pending=None,
                last_checkin=None,
            )
            await tx.audit(
                "unbind",
                now,
                dev_id=device.dev_id,
                user_id=principal.user_id,
                principal=principal.name,
            )

        await self.registry.run(body)


__all__ = [
    "BindService",
    "BindStartInput",
    "CloudProblem",
    "DeviceCaller",
    "Principal",
    "hash_token",
]
