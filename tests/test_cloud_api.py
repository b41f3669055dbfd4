"""The cloud's §6 endpoints in-process (httpx.ASGITransport), on SQLite and PostgreSQL.

The commissioner and the device are the protocol core's own state machines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cloud.client import CloudClient, CloudError, HubSigner
from cloud.settings import Settings
from cloud.store.registry import RegistryTransaction
from cloud_helpers import (
    PG_DSN,
    PG_SKIP_REASON,
    TEST_KEK,
    VECTORS,
    Cloud,
    CountingEntropy,
    SimDevice,
    accept_bind,
    add_user,
    bearer,
    finish_session,
    in_process_cloud,
    new_factory_record,
    onboard,
    pg_url,
    register,
    registered_device,
    start_session,
)
from protocol.encoding import b64url_decode, b64url_encode
from protocol.entropy import EntropySource
from protocol.factory import FactoryRecord

BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(not PG_DSN, reason=PG_SKIP_REASON)),
]


def backend_url(backend: str, tmp_path: object) -> str:
    return "sqlite:///:memory:" if backend == "sqlite" else pg_url()


@pytest.fixture(params=BACKENDS)
async def cloud(request: pytest.FixtureRequest) -> AsyncIterator[Cloud]:
    async with in_process_cloud(backend_url(request.param, None)) as c:
        yield c


def problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    assert "Traceback" not in response.text
    return dict(body)


# --- known answers ----------------------------------------------------------------------


async def test_vector_bind_start_and_complete_answers_reproduce_exactly() -> None:
    inputs = VECTORS["inputs"]
    draws = {d["name"]: bytes.fromhex(d["hex"]) for d in inputs["draws"]}
    cloud_draws = [
        draws[n] for n in ("attempt_id", "R", "seal_nonce", "identifier", "K_dev", "W_nonce")
    ]
    entropy = CountingEntropy(cloud_draws)
    async with in_process_cloud(
        "sqlite:///:memory:", entropy=entropy, clock=lambda: 1700000000.0
    ) as c:
        record = FactoryRecord.from_json(inputs["factory_record"])
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "vector-user")  # user id 1 → principal "user:1"
        http = VECTORS["http"]
        response = await c.client.post(
            "/v1/bind/start", json=http["bind_start_request"], headers=bearer(token)
        )
        assert response.status_code == 201
        assert response.json() == http["bind_start_answer"]
        response = await c.client.post(
            "/v1/bind/complete", json=http["bind_complete_request"], headers=bearer(token)
        )
        assert response.status_code == 200
        assert response.json() == http["bind_complete_answer"]


# --- happy paths -----------------------------------------------------------------------------


async def test_onboard_checkin_views_and_unbind(cloud: Cloud) -> None:
    device, token = await registered_device(cloud.registry, cloud.kek)
    record = device.record
    answer = await onboard(cloud.client, token, device)
    assert answer == {
        "dev_id": record.dev_id.hex(),
        "identifier": device.identifier.hex(),
        "epoch": 1,
    }

    view = (
        await cloud.client.get(f"/v1/devices/{device.identifier.hex()}", headers=bearer(token))
    ).json()
    assert view["state"] == "pending" and view["epoch"] == 1 and view["last_checkin"] is None

    body, headers = device.checkin_request()
    response = await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    assert response.status_code == 200 and response.json() == answer
    listing = (await cloud.client.get("/v1/devices", headers=bearer(token))).json()
    assert [v["state"] for v in listing] == ["active"]
    assert listing[0]["dev_id"] == record.dev_id.hex() and listing[0]["model"] == record.model
    assert set(listing[0]) == {
        "identifier",
        "dev_id",
        "model",
        "epoch",
        "state",
        "bound_at",
        "last_checkin",
    }

    # Re-onboarding by the same owner: epoch 2; the check-in retires epoch 1.
    old = (device.identifier, device.k_dev)
    device.active_epoch = 1
    second = await onboard(cloud.client, token, device)
    assert second["epoch"] == 2
    body, headers = device.checkin_request()
    assert (
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    ).status_code == 200
    stale = SimDevice(record, identifier=old[0], k_dev=old[1], ack=b"\0" * 32)
    body, headers = stale.checkin_request()
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "bad_signature",
    )

    # Unbind: owner removed, identities retired.
    response = await cloud.client.delete(
        f"/v1/devices/{device.identifier.hex()}", headers=bearer(token)
    )
    assert response.status_code == 204
    assert (await cloud.client.get("/v1/devices", headers=bearer(token))).json() == []
    body, headers = device.checkin_request()
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "bad_signature",
    )
    events = [e.event for e in await cloud.registry.run(lambda tx: tx.audit_entries(record.dev_id))]
    assert events == ["bind", "checkin", "bind", "checkin", "unbind"]


async def _identity_rows(cloud: Cloud, identifier: bytes) -> list[str]:
    async def body(tx: RegistryTransaction) -> list[str]:
        rows = await tx._tx.fetch("SELECT state FROM identities WHERE identifier = $1", identifier)
        return [str(row[0]) for row in rows]

    return await cloud.registry.run(body)


async def test_an_identity_lives_in_its_attempt_until_its_bind_completes(cloud: Cloud) -> None:
    device, token = await registered_device(cloud.registry, cloud.kek)
    session, ack = await accept_bind(cloud.client, token, device)
    assert session.answer is not None
    # Issued, and usable for a signature, but no identities row yet.
    assert await _identity_rows(cloud, device.identifier) == []
    issued = await cloud.registry.run(lambda tx: tx.identity(device.identifier))
    assert issued is not None and issued.state == "pending" and issued.epoch == 1
    complete = {"attempt": session.answer["attempt"], "ack": b64url_encode(ack)}
    assert (
        await cloud.client.post("/v1/bind/complete", json=complete, headers=bearer(token))
    ).status_code == 200
    assert await _identity_rows(cloud, device.identifier) == ["pending"]

    async def key_copies_in_attempts(tx: RegistryTransaction) -> int:
        row = await tx._tx.fetchrow(
            "SELECT COUNT(*) FROM attempts WHERE identifier = $1 AND k_dev_wrapped IS NOT NULL",
            device.identifier,
        )
        return int(row[0])

    assert await cloud.registry.run(key_copies_in_attempts) == 0  # the row holds the only one
    body, headers = device.checkin_request()
    assert (
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    ).status_code == 200
    assert await _identity_rows(cloud, device.identifier) == ["active"]


async def test_identities_still_in_their_attempt_are_retired_like_the_others(cloud: Cloud) -> None:
    """A newer check-in and an unbind retire identities whose bind never completed."""
    device, token = await registered_device(cloud.registry, cloud.kek)
    record = device.record
    await onboard(cloud.client, token, device)

    async def issued_only() -> SimDevice:
        """A bind/start the device accepted but nobody completed: its key, kept aside."""
        _, ack = await accept_bind(cloud.client, token, device)
        return SimDevice(record, identifier=device.identifier, k_dev=device.k_dev, ack=ack)

    # Epoch 2 is issued and left; epoch 3 completes and checks in: epoch 2 is retired.
    left = await issued_only()
    await onboard(cloud.client, token, device)
    body, headers = device.checkin_request()
    assert (
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    ).status_code == 200
    body, headers = left.checkin_request()
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "bad_signature",
    )

    # Epoch 4 is issued and left; the owner unbinds: epoch 4 is retired too.
    active = device.identifier
    left = await issued_only()
    response = await cloud.client.delete(f"/v1/devices/{active.hex()}", headers=bearer(token))
    assert response.status_code == 204
    body, headers = left.checkin_request()
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "bad_signature",
    )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_binds_started_before_version_5_still_complete(backend: str) -> None:
    """An attempt written by a version-4 server has its identity in its own row."""
    url = backend_url(backend, None)
    async with in_process_cloud(url) as c:
        device, token = await registered_device(c.registry, c.kek)
        session, ack = await accept_bind(c.client, token, device)
        assert session.answer is not None

        async def as_version_4_wrote_it(tx: RegistryTransaction) -> None:
            await tx._tx.execute(
                "INSERT INTO identities (identifier, dev_id, epoch, k_dev_wrapped, state, attempt_id, issued_at) "
                "SELECT identifier, dev_id, epoch, k_dev_wrapped, 'pending', attempt_id, created_at "
                "FROM attempts WHERE identifier = $1",
                device.identifier,
            )
            await tx._tx.execute(
                "UPDATE attempts SET k_dev_wrapped = NULL WHERE identifier = $1", device.identifier
            )

        await c.registry.run(as_version_4_wrote_it)
        complete = {"attempt": session.answer["attempt"], "ack": b64url_encode(ack)}
        assert (
            await c.client.post("/v1/bind/complete", json=complete, headers=bearer(token))
        ).status_code == 200
        body, headers = device.checkin_request()
        assert (
            await c.client.post("/v1/devices/checkin", content=body, headers=headers)
        ).status_code == 200
        stored = await c.registry.run(lambda tx: tx.identity(device.identifier))
        assert stored is not None and stored.state == "active"


async def test_checkin_completes_a_bind_whose_complete_never_arrived(cloud: Cloud) -> None:
    device, token = await registered_device(cloud.registry, cloud.kek, "bob")
    session, _ = await accept_bind(cloud.client, token, device)
    assert session.answer is not None
    body, headers = device.checkin_request()
    response = await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    assert response.status_code == 200
    # The user became the owner; a late bind/complete gets the same answer.
    late = await cloud.client.post(
        "/v1/bind/complete",
        json={"attempt": session.answer["attempt"], "ack": b64url_encode(device.ack)},
        headers=bearer(token),
    )
    assert late.status_code == 200 and late.json() == response.json()
    listing = (await cloud.client.get("/v1/devices", headers=bearer(token))).json()
    assert listing[0]["state"] == "active"


async def test_client_drives_every_endpoint_and_hub_signs_for_its_owner(cloud: Cloud) -> None:
    hub_record, lock_record = new_factory_record("Doorstep Hub"), new_factory_record()
    await register(cloud.registry, cloud.kek, [hub_record, lock_record])
    token = await add_user(cloud.registry, "carol")
    transport = cloud.client._transport  # the same in-process ASGI transport
    async with CloudClient("http://cloud.test", token=token, transport=transport) as user:
        hub = SimDevice(hub_record)
        session = start_session(hub)
        session.answer = await user.bind_start(session.request)
        ack = finish_session(hub, session)
        assert (await user.bind_complete(session.answer["attempt"], ack))["epoch"] == 1
        await user.checkin(hub.identifier, hub.k_dev, hub.ack)
        assert (await user.device(hub.identifier))["state"] == "active"

    # The hub onboards a lock for its owner.
    signer = HubSigner(hub.identifier, hub.k_dev)
    async with CloudClient("http://cloud.test", signer=signer, transport=transport) as hub_client:
        lock = SimDevice(lock_record)
        session = start_session(lock)
        session.answer = await hub_client.bind_start(session.request)
        ticket = b64url_decode(session.answer["ticket"])
        assert f"hub:{hub.identifier.hex()}".encode() in ticket
        ack = finish_session(lock, session)
        await hub_client.bind_complete(session.answer["attempt"], ack)
        names = {v["dev_id"] for v in await hub_client.devices()}
        assert names == {hub_record.dev_id.hex(), lock_record.dev_id.hex()}
    async with CloudClient("http://cloud.test", token=token, transport=transport) as user:
        await user.unbind(lock.identifier)
        with pytest.raises(CloudError) as info:
            await user.device(lock.identifier)
        assert (info.value.status, info.value.code) == (404, "unknown_device")


@pytest.mark.parametrize(
    ("status", "code", "seen"),
    [
        (502, "evil\n[hub] Doorstep-0142 (C8:2B:96:1A:01:42): onboarded as 00000000", "http_502"),
        (400, "\x1b[2J" + "x" * 30, "http_400"),
        (429, "a" * 41, "http_429"),
        (429, ["rate_limited"], "http_429"),
        (429, "rate_limited", "rate_limited"),
    ],
)
async def test_a_problem_code_not_of_our_shape_is_not_taken(
    status: int, code: object, seen: str
) -> None:
    """Whatever answers at the cloud's URL (a proxy, say) writes the problem's code, and the
    hub printed it in its log and registry as is: newlines could fake its lines."""

    async def hostile(scope: dict[str, object], receive: object, send: Any) -> None:
        body = json.dumps({"type": "about:blank", "title": "no", "status": status, "code": code})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/problem+json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    transport = httpx.ASGITransport(app=hostile)
    async with CloudClient("http://cloud.test", token="t", transport=transport) as user:
        with pytest.raises(CloudError) as info:
            await user.devices()
    assert (info.value.status, info.value.code) == (status, seen)


async def test_identical_retry_returns_the_first_answer_and_others_are_refused(
    cloud: Cloud,
) -> None:
    record = new_factory_record()
    await register(cloud.registry, cloud.kek, [record])
    alice, mallory = (
        await add_user(cloud.registry, "alice"),
        await add_user(cloud.registry, "mallory"),
    )
    session = start_session(SimDevice(record))
    first = await cloud.client.post("/v1/bind/start", json=session.request, headers=bearer(alice))
    again = await cloud.client.post("/v1/bind/start", json=session.request, headers=bearer(alice))
    assert first.status_code == again.status_code == 201
    assert first.content == again.content
    other = await cloud.client.post("/v1/bind/start", json=session.request, headers=bearer(mallory))
    problem(other, 403, "device_refused")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_every_bind_start_is_counted_and_only_a_new_attempt_moves_epoch_and_reset_ctr(
    backend: str,
) -> None:
    """bind/start reads the device once and writes it back once, on every path: a refusal,
    an identical retry, a replay and a rate-limited request count, and none of them moves
    the device's epoch or its highest reset_ctr (a forged M2 must not raise it)."""
    url = backend_url(backend, None)
    settings = Settings(
        database_url=url, rate_per_user=100, rate_per_device=5, rate_per_address=100
    )
    async with in_process_cloud(url, settings=settings) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        alice, bob = await add_user(c.registry, "alice"), await add_user(c.registry, "bob")

        async def row() -> tuple[int, int, int]:
            async def body(tx: RegistryTransaction) -> tuple[int, int, int]:
                found = await tx._tx.fetchrow(
                    "SELECT rate_hits, last_epoch, max_reset_ctr FROM devices WHERE dev_id = $1",
                    record.dev_id,
                )
                return (found[0], found[1], found[2])

            return await c.registry.run(body)

        async def start(request: dict[str, str], token: str) -> int:
            response = await c.client.post("/v1/bind/start", json=request, headers=bearer(token))
            return response.status_code

        forged = SimDevice(
            FactoryRecord(record.dev_id, record.mac, os.urandom(32), record.model), reset_ctr=3
        )
        assert await start(start_session(forged).request, alice) == 403
        assert await row() == (1, 0, -1)
        request = start_session(SimDevice(record, reset_ctr=3)).request
        assert await start(request, alice) == 201
        assert await row() == (2, 1, 3)
        assert await start(request, alice) == 201  # the identical retry
        assert await row() == (3, 1, 3)
        assert await start(request, bob) == 403  # the same (dev_id, N_D), another principal
        assert await row() == (4, 1, 3)
        assert await start(start_session(SimDevice(record, reset_ctr=3)).request, alice) == 201
        assert await row() == (5, 2, 3)
        assert await start(start_session(SimDevice(record, reset_ctr=9)).request, alice) == 429
        assert await row() == (6, 2, 3)  # counted, nothing else


# --- hostile input ---------------------------------------------------------------------------


async def test_every_device_refusal_looks_the_same(cloud: Cloud) -> None:
    owned, fresh = new_factory_record(), new_factory_record()
    await register(cloud.registry, cloud.kek, [owned, fresh])
    alice, bob = await add_user(cloud.registry, "alice"), await add_user(cloud.registry, "bob")
    await onboard(cloud.client, alice, SimDevice(owned))

    refusals = []
    unknown = SimDevice(new_factory_record())  # never registered
    refusals.append(start_session(unknown).request)
    wrong_key = SimDevice(FactoryRecord(fresh.dev_id, fresh.mac, os.urandom(32), fresh.model))
    refusals.append(start_session(wrong_key).request)  # bad tag
    wrong_mac = SimDevice(FactoryRecord(fresh.dev_id, os.urandom(6), fresh.k_init, fresh.model))
    refusals.append(start_session(wrong_mac).request)
    wrong_model = SimDevice(FactoryRecord(fresh.dev_id, fresh.mac, fresh.k_init, "Other"))
    refusals.append(start_session(wrong_model).request)
    refusals.append(start_session(SimDevice(owned)).request)  # owned by alice, no reset
    replayed = start_session(SimDevice(fresh)).request
    assert (
        await cloud.client.post("/v1/bind/start", json=replayed, headers=bearer(alice))
    ).status_code == 201
    refusals.append(replayed)  # same (dev_id, N_D), another principal

    bodies = set()
    for request in refusals:
        response = await cloud.client.post("/v1/bind/start", json=request, headers=bearer(bob))
        problem(response, 403, "device_refused")
        bodies.add(response.content)
    assert len(bodies) == 1

    # reset_ctr below the highest seen; then a reset lets bob take alice's device.
    stale = SimDevice(fresh, reset_ctr=0)
    await onboard(cloud.client, bob, SimDevice(owned, reset_ctr=1))
    response = await cloud.client.post(
        "/v1/bind/start", json=start_session(stale).request, headers=bearer(bob)
    )
    assert response.status_code == 201
    response = await cloud.client.post(
        "/v1/bind/start",
        json=start_session(SimDevice(owned, reset_ctr=0)).request,
        headers=bearer(bob),
    )
    problem(response, 403, "device_refused")


async def test_malformed_requests_get_exact_codes(cloud: Cloud) -> None:
    record = new_factory_record()
    await register(cloud.registry, cloud.kek, [record])
    token = await add_user(cloud.registry, "alice")
    good = start_session(SimDevice(record)).request
    post = cloud.client.post
    json_headers = bearer(token) | {"content-type": "application/json"}

    problem(
        await post("/v1/bind/start", content=b"{not json", headers=json_headers),
        400,
        "malformed_json",
    )
    problem(
        await post("/v1/bind/start", json={"m1": good["m1"]}, headers=bearer(token)),
        422,
        "invalid_request",
    )
    problem(
        await post("/v1/bind/start", json=good | {"m1": "AQ=="}, headers=bearer(token)),
        422,
        "invalid_request",
    )
    problem(
        await post("/v1/bind/start", json=good | {"m1": "A"}, headers=bearer(token)),
        400,
        "bad_base64",
    )
    short_pub = good | {"commissioner_pub": b64url_encode(b"x" * 31)}
    problem(await post("/v1/bind/start", json=short_pub, headers=bearer(token)), 400, "wrong_size")
    bad_nonce = good | {"commissioner_nonce": b64url_encode(os.urandom(16))}
    problem(
        await post("/v1/bind/start", json=bad_nonce, headers=bearer(token)), 400, "bad_commitment"
    )
    swapped = good | {"m1": good["m2"], "m2": good["m1"]}
    response = await post("/v1/bind/start", json=swapped, headers=bearer(token))
    assert response.status_code == 400 and response.json()["code"] in {
        "wrong_message",
        "wrong_size",
    }
    problem(
        await post(
            "/v1/bind/start",
            json=good | {"m2": b64url_encode(b"\x01\x02" + b"\0" * 20)},
            headers=bearer(token),
        ),
        400,
        "cbor_trailing_bytes",
    )

    problem(await post("/v1/bind/start", json=good), 401, "unauthorized")
    problem(await post("/v1/bind/start", json=good, headers=bearer("nope")), 401, "unauthorized")
    problem(
        await post("/v1/bind/start", json=good, headers={"authorization": "Basic eA=="}),
        401,
        "unauthorized",
    )
    problem(
        await post("/v1/bind/start", json=good, headers={"authorization": "DS1-HMAC id=zz"}),
        401,
        "bad_signature",
    )

    unknown = {"attempt": b64url_encode(os.urandom(16)), "ack": b64url_encode(os.urandom(32))}
    problem(
        await post("/v1/bind/complete", json=unknown, headers=bearer(token)), 404, "unknown_attempt"
    )
    problem(
        await post("/v1/bind/complete", json=unknown | {"attempt": "AAAA"}, headers=bearer(token)),
        400,
        "wrong_size",
    )

    problem(await cloud.client.get("/v1/nowhere"), 404, "not_found")
    refused = await cloud.client.put("/v1/bind/start", json=good)
    problem(refused, 405, "method_not_allowed")
    assert refused.headers["allow"] == "POST"
    both = await cloud.client.put("/v1/devices/" + "ab" * 16, headers=bearer(token))
    problem(both, 405, "method_not_allowed")
    assert both.headers["allow"] == "DELETE, GET"  # two routes share this path
    problem(await cloud.client.get("/v1/devices/XYZ", headers=bearer(token)), 400, "bad_hex")
    problem(
        await cloud.client.get(f"/v1/devices/{os.urandom(16).hex()}", headers=bearer(token)),
        404,
        "unknown_device",
    )


async def test_the_bind_start_front_and_the_fastapi_route_answer_alike(cloud: Cloud) -> None:
    """Plain ``application/json`` is served by the ASGI front; any other spelling of the
    content type goes to the FastAPI route. Both must give the same status, headers and body."""
    record = new_factory_record()
    await register(cloud.registry, cloud.kek, [record])
    token = await add_user(cloud.registry, "alice")
    good = start_session(SimDevice(record)).request
    cases: list[tuple[dict[str, str], dict[str, str]]] = [
        (good, bearer(token)),  # the second answer is the identical retry of the first
        (start_session(SimDevice(new_factory_record())).request, bearer(token)),  # unknown device
        (good | {"m1": "A"}, bearer(token)),
        (good | {"commissioner_nonce": b64url_encode(os.urandom(16))}, bearer(token)),
        (good, {}),
        (good, bearer("nope")),
        (good, {"authorization": "Basic eA=="}),
        (good, {"authorization": "DS1-HMAC id=zz"}),
    ]
    front = cloud.app.front
    for body, auth in cases:
        answers = []
        for content_type in ("application/json", "application/json; charset=utf-8"):
            answered_before = front.answered
            response = await cloud.client.post(
                "/v1/bind/start",
                content=json.dumps(body).encode(),
                headers=auth | {"content-type": content_type},
            )
            answers.append(
                (
                    response.status_code,
                    response.content,
                    response.headers["content-type"],
                    response.headers.get("www-authenticate"),
                )
            )
            # 201s show who answered: the front for plain JSON, the route otherwise
            served_by_front = front.answered - answered_before
            assert served_by_front == (
                response.status_code == 201 and content_type == "application/json"
            )
        assert answers[0] == answers[1], (body.keys(), auth.keys())
    assert answers[0][0] == 401
    assert front.answered == 1
    # Fields the model ignores, and refusals worded by FastAPI, still work through the front.
    extra = start_session(SimDevice(record)).request | {"note": "ignored"}
    response = await cloud.client.post("/v1/bind/start", json=extra, headers=bearer(token))
    assert response.status_code == 201
    problem(
        await cloud.client.post("/v1/bind/start", json=good | {"m2": 5}, headers=bearer(token)),
        422,
        "invalid_request",
    )
    deep = b"[" * 100000
    problem(
        await cloud.client.post(
            "/v1/bind/start",
            content=deep,
            headers=bearer(token) | {"content-type": "application/json"},
        ),
        413,
        "payload_too_large",
    )
    nested = b"[" * 5000 + b"]" * 5000
    response = await cloud.client.post(
        "/v1/bind/start",
        content=nested,
        headers=bearer(token) | {"content-type": "application/json"},
    )
    assert 400 <= response.status_code < 500, response.text


async def test_the_front_reads_the_first_of_repeated_headers_like_the_route(cloud: Cloud) -> None:
    record = new_factory_record()
    await register(cloud.registry, cloud.kek, [record])
    token = await add_user(cloud.registry, "alice")
    body = json.dumps(start_session(SimDevice(record)).request).encode()
    answers = []
    for content_type in ("application/json", "application/json; charset=utf-8"):
        headers = [
            ("authorization", "DS1-HMAC id=zz"),
            ("authorization", f"Bearer {token}"),
            ("content-type", content_type),
        ]
        response = await cloud.client.post("/v1/bind/start", content=body, headers=headers)
        answers.append((response.status_code, response.json()["code"]))
    assert answers == [(401, "bad_signature")] * 2


class RecordingHardware:
    """A hardware RNG for the real EntropySource: OS bytes, noting each read and its thread."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, str]] = []

    def read(self, n: int) -> bytes:
        self.reads.append((n, threading.current_thread().name))
        return os.urandom(n)


async def test_a_hardware_backed_source_is_read_off_the_event_loop() -> None:
    hardware = RecordingHardware()
    entropy = EntropySource(hardware=hardware)
    async with in_process_cloud("sqlite:///:memory:", entropy=entropy) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "alice")
        answer = await onboard(c.client, token, SimDevice(record))
        assert answer["dev_id"] == record.dev_id.hex()
        reads = len(hardware.reads)
        unknown = start_session(SimDevice(new_factory_record())).request
        refused = await c.client.post("/v1/bind/start", json=unknown, headers=bearer(token))
        problem(refused, 403, "device_refused")
    # A refusal reads as much as an answer (same timing), and never on the loop's thread.
    assert [n for n, _ in hardware.reads[reads:]] == [120]
    assert hardware.reads[0][0] == 1024  # the start-up test, then one 120-byte read per bind
    assert threading.current_thread().name not in {name for _, name in hardware.reads}


async def test_other_users_attempt_bad_ack_and_expiry(cloud: Cloud) -> None:
    now = [time.time()]
    async with in_process_cloud("sqlite:///:memory:", clock=lambda: now[0]) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        alice, eve = await add_user(c.registry, "alice"), await add_user(c.registry, "eve")
        device = SimDevice(record)
        session = start_session(device)
        session.answer = (
            await c.client.post("/v1/bind/start", json=session.request, headers=bearer(alice))
        ).json()
        ack = finish_session(device, session)
        complete = {"attempt": session.answer["attempt"], "ack": b64url_encode(ack)}
        problem(
            await c.client.post("/v1/bind/complete", json=complete, headers=bearer(eve)),
            404,
            "unknown_attempt",
        )
        wrong = complete | {"ack": b64url_encode(os.urandom(32))}
        problem(
            await c.client.post("/v1/bind/complete", json=wrong, headers=bearer(alice)),
            403,
            "bad_ack",
        )
        now[0] += 7 * 86400 + 1
        problem(
            await c.client.post("/v1/bind/complete", json=complete, headers=bearer(alice)),
            410,
            "attempt_expired",
        )
        body, headers = device.checkin_request(ts=int(now[0]))
        problem(
            await c.client.post("/v1/devices/checkin", content=body, headers=headers),
            410,
            "attempt_expired",
        )
        # Identical retry after expires_in is a replay: refused.
        again = await c.client.post("/v1/bind/start", json=session.request, headers=bearer(alice))
        problem(again, 403, "device_refused")


async def test_forged_replayed_and_stale_signatures_are_refused(cloud: Cloud) -> None:
    device, token = await registered_device(cloud.registry, cloud.kek)
    record = device.record
    await onboard(cloud.client, token, device)
    nonce = os.urandom(16)
    body, headers = device.checkin_request(nonce=nonce)
    assert (
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    ).status_code == 200
    replay = await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    problem(replay, 401, "nonce_reused")
    body, headers = device.checkin_request(ts=int(time.time()) - 301)
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "clock_skew",
    )
    body, headers = device.checkin_request()
    tampered = body.replace(b'"ack"', b'"ack" ')
    problem(
        await cloud.client.post("/v1/devices/checkin", content=tampered, headers=headers),
        401,
        "bad_signature",
    )
    forged = SimDevice(record, identifier=device.identifier, k_dev=os.urandom(32), ack=device.ack)
    body, headers = forged.checkin_request()
    problem(
        await cloud.client.post("/v1/devices/checkin", content=body, headers=headers),
        401,
        "bad_signature",
    )
    problem(
        await cloud.client.post("/v1/devices/checkin", json={"ack": "x"}, headers=bearer(token)),
        401,
        "bad_signature",
    )
    # A pending identity (bound, not checked in) is not a hub: it cannot sign bind/start.
    pending_record = new_factory_record()
    await register(cloud.registry, cloud.kek, [pending_record])
    pending = SimDevice(pending_record)
    await onboard(cloud.client, token, pending)
    session = start_session(SimDevice(new_factory_record()))
    raw = json.dumps(session.request).encode()
    auth = pending.sign("POST", "/v1/bind/start", raw)
    response = await cloud.client.post(
        "/v1/bind/start",
        content=raw,
        headers={"authorization": auth, "content-type": "application/json"},
    )
    problem(response, 401, "bad_signature")


async def test_oversize_bodies_are_refused_with_413(cloud: Cloud) -> None:
    token = await add_user(cloud.registry, "alice")
    big = json.dumps({"m1": "A" * 20000}).encode()
    headers = bearer(token) | {"content-type": "application/json"}
    problem(
        await cloud.client.post("/v1/bind/start", content=big, headers=headers),
        413,
        "payload_too_large",
    )

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b" " * 1024

    response = await cloud.client.post("/v1/bind/start", content=stream(), headers=headers)
    problem(response, 413, "payload_too_large")


async def test_rate_limits_answer_429_with_retry_after() -> None:
    settings = Settings(rate_per_user=3, rate_per_device=100, rate_per_address=100)
    async with in_process_cloud("sqlite:///:memory:", settings=settings) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "alice")
        for _ in range(3):
            response = await c.client.post(
                "/v1/bind/start",
                json=start_session(SimDevice(record)).request,
                headers=bearer(token),
            )
            assert response.status_code == 201
        response = await c.client.post(
            "/v1/bind/start", json=start_session(SimDevice(record)).request, headers=bearer(token)
        )
        problem(response, 429, "rate_limited")
        assert 1 <= int(response.headers["retry-after"]) <= 60
        # The commitment is checked before the rate limit.
        bad = start_session(SimDevice(record)).request | {
            "commissioner_nonce": b64url_encode(os.urandom(16))
        }
        problem(
            await c.client.post("/v1/bind/start", json=bad, headers=bearer(token)),
            400,
            "bad_commitment",
        )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_device_limit_holds_alike_for_registered_and_unknown_dev_ids(
    backend: str,
) -> None:
    """A registered device is counted in its own row, an unknown dev_id in a bucket:
    the same limit, the same 429, and a new window starts both over."""
    url = backend_url(backend, None)
    now = [1_800_000_000.0]
    settings = Settings(
        database_url=url, rate_per_user=100, rate_per_device=2, rate_per_address=100
    )
    async with in_process_cloud(url, settings=settings, clock=lambda: now[0]) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "alice")
        known = lambda: start_session(SimDevice(record)).request  # noqa: E731
        unknown_record = new_factory_record()
        unknown = lambda: start_session(SimDevice(unknown_record)).request  # noqa: E731
        for request, first in ((known, 201), (unknown, 403)):
            for _ in range(2):
                response = await c.client.post(
                    "/v1/bind/start", json=request(), headers=bearer(token)
                )
                assert response.status_code == first
            limited = await c.client.post("/v1/bind/start", json=request(), headers=bearer(token))
            problem(limited, 429, "rate_limited")
            assert "device" in limited.json()["detail"]
        now[0] += settings.rate_window_s
        for request, first in ((known, 201), (unknown, 403)):
            response = await c.client.post("/v1/bind/start", json=request(), headers=bearer(token))
            assert response.status_code == first


async def test_secrets_never_in_responses_or_logs(
    cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    device, token = await registered_device(cloud.registry, cloud.kek)
    record = device.record
    texts = []
    original = cloud.client.send

    async def recording_send(request: httpx.Request, **kwargs: object) -> httpx.Response:
        response = await original(request, **kwargs)  # type: ignore[arg-type]
        await response.aread()
        texts.append(response.text)
        return response

    cloud.client.send = recording_send  # type: ignore[method-assign]
    await onboard(cloud.client, token, device)
    body, headers = device.checkin_request()
    await cloud.client.post("/v1/devices/checkin", content=body, headers=headers)
    await cloud.client.get("/v1/devices", headers=bearer(token))
    await cloud.client.post(
        "/v1/bind/complete", json={"attempt": "A" * 22, "ack": "B" * 43}, headers=bearer(token)
    )
    haystack = "\n".join(texts) + caplog.text + repr(device.record)
    for secret in (record.k_init, device.k_dev, TEST_KEK):
        assert secret.hex() not in haystack and b64url_encode(secret) not in haystack
    assert token not in haystack
    stored = await cloud.registry.run(lambda tx: tx.device(record.dev_id))
    assert stored is not None and record.k_init not in stored.k_init_wrapped
    assert record.k_init.hex() not in repr(stored)


async def test_unknown_device_timing_is_close_to_a_bad_tag() -> None:
    """Reported, not asserted tightly: median of many refusals for each path."""
    settings = Settings(rate_per_user=10**6, rate_per_device=10**6, rate_per_address=10**6)
    async with in_process_cloud("sqlite:///:memory:", settings=settings) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "alice")
        wrong_key = SimDevice(
            FactoryRecord(record.dev_id, record.mac, os.urandom(32), record.model)
        )
        unknown = SimDevice(new_factory_record())
        requests = {
            "bad_tag": start_session(wrong_key).request,
            "unknown": start_session(unknown).request,
        }
        samples: dict[str, list[float]] = {"bad_tag": [], "unknown": []}
        for _ in range(300):
            for name, request in requests.items():
                started = time.perf_counter()
                response = await c.client.post(
                    "/v1/bind/start", json=request, headers=bearer(token)
                )
                samples[name].append(time.perf_counter() - started)
                assert response.status_code == 403
        medians = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
        print(
            f"\nmedian refusal µs: {medians}, difference {medians['unknown'] - medians['bad_tag']:+.1f} µs"
        )
        assert abs(medians["unknown"] - medians["bad_tag"]) < 0.5 * medians["bad_tag"]


async def test_the_openapi_schema_documents_credentials_and_problem_answers(cloud: Cloud) -> None:
    """What /docs shows a client author: how to authenticate, and each error's body."""
    schema = (await cloud.client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer" and schemes["ds1_hmac"]["scheme"] == "DS1-HMAC"
    assert set(schema["components"]["schemas"]["Problem"]["required"]) >= {"code", "status"}
    operations = [(p, m, op) for p, ops in schema["paths"].items() for m, op in ops.items()]
    assert len(operations) == 7
    for path, method, op in operations:
        if path == "/v1/health":
            assert "security" not in op
            continue
        assert op["security"], (method, path)
        errors = {int(status): r for status, r in op["responses"].items() if int(status) >= 400}
        assert 401 in errors and 503 in errors, (method, path)
        for answer in errors.values():  # problem+json, with its schema; nothing else
            content = answer["content"]
            assert list(content) == ["application/problem+json"], (method, path)
            assert content["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    by_path = {(p, m): op for p, m, op in operations}
    assert by_path[("/v1/devices/checkin", "post")]["security"] == [{"ds1_hmac": []}]
    assert 429 in {int(s) for s in by_path[("/v1/bind/start", "post")]["responses"]}
    assert 429 not in {int(s) for s in by_path[("/v1/devices", "get")]["responses"]}


async def test_credentials_come_before_the_body_and_the_body_must_be_json(cloud: Cloud) -> None:
    """No credentials: 401, whatever fields the JSON body has (not 422 naming the expected
    ones); a body sent as another media type: 415, not a complaint about its fields."""
    _device, token = await registered_device(cloud.registry, cloud.kek)
    for path in ("/v1/bind/start", "/v1/bind/complete", "/v1/devices/checkin"):
        refused = await cloud.client.post(path, json={})
        problem(refused, 401, "unauthorized")
        assert "m1" not in refused.text and "ack" not in refused.text
        other = await cloud.client.post(
            path, content=b"m1=x", headers=bearer(token) | {"content-type": "text/plain"}
        )
        body = problem(other, 415, "unsupported_media_type")
        assert body["detail"] == "send the body as application/json, not text/plain"
    problem(await cloud.client.get("/v1/devices/" + "ab" * 16), 401, "unauthorized")


async def test_the_bearer_scheme_is_case_insensitive(cloud: Cloud) -> None:
    """RFC 9110 §11.1: ``bearer`` and ``BEARER`` are ``Bearer``; another scheme is refused."""
    device, token = await registered_device(cloud.registry, cloud.kek)
    for scheme in ("bearer", "BEARER", "Bearer"):
        headers = {"authorization": f"{scheme} {token}"}
        assert (await cloud.client.get("/v1/devices", headers=headers)).status_code == 200
    request = start_session(device).request
    started = await cloud.client.post(
        "/v1/bind/start", json=request, headers={"authorization": f"bearer {token}"}
    )
    assert started.status_code == 201, started.text
    refused = await cloud.client.get("/v1/devices", headers={"authorization": f"Token {token}"})
    problem(refused, 401, "unauthorized")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fifty_concurrent_bind_starts_for_one_challenge(backend: str) -> None:
    settings = Settings(rate_per_user=10**6, rate_per_device=10**6, rate_per_address=10**6)
    async with in_process_cloud(backend_url(backend, None), settings=settings) as c:
        record = new_factory_record()
        await register(c.registry, c.kek, [record])
        tokens = [await add_user(c.registry, f"user{i}") for i in range(50)]
        request = start_session(SimDevice(record)).request
        responses = await asyncio.gather(
            *(c.client.post("/v1/bind/start", json=request, headers=bearer(t)) for t in tokens)
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(201) == 1 and statuses.count(403) == 49, statuses
        winner = tokens[[r.status_code for r in responses].index(201)]
        first = next(r for r in responses if r.status_code == 201)
        retries = await asyncio.gather(
            *(
                c.client.post("/v1/bind/start", json=request, headers=bearer(winner))
                for _ in range(10)
            )
        )
        assert all(r.status_code == 201 and r.content == first.content for r in retries)


async def test_wrong_kek_file_and_missing_kek_are_clear_errors(tmp_path: object) -> None:
    from cloud.app import create_app
    from cloud.errors import ConfigurationError
    from cloud.keys import load_kek

    with pytest.raises(ConfigurationError) as info:
        load_kek(None, env={})
    assert info.value.code == "kek_missing"
    with pytest.raises(ConfigurationError) as info:
        load_kek(None, env={"DOORSTEP_KEK": "short"})
    assert info.value.code == "kek_invalid"
    os.environ.pop("DOORSTEP_KEK", None)
    os.environ.pop("DOORSTEP_KEK_FILE", None)
    with pytest.raises(ConfigurationError):
        create_app(Settings())
    assert load_kek(None, env={"DOORSTEP_KEK": b64url_encode(TEST_KEK)}) == TEST_KEK


def test_served_processes_keep_their_start_up_heap_out_of_the_collector(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """A full collection over the start-up objects held the loop for 27–40 ms under load."""
    import gc

    import uvicorn

    from cloud.app import app_from_env
    from doorstep_cli import main

    monkeypatch.setenv("DOORSTEP_KEK", b64url_encode(TEST_KEK))
    monkeypatch.setenv("DOORSTEP_CLOUD_DB", f"sqlite:///{tmp_path}/cloud.db")
    monkeypatch.setenv("DOORSTEP_CLOUD_LOG_LEVEL", "warning")  # serve sets it: restore it after
    served: list[int] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: served.append(gc.get_freeze_count()))
    gc.unfreeze()
    try:
        assert main(["cloud", "serve", "--port", "0"]) == 0
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        app_from_env()  # what each of several workers builds
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
    assert served[0] > 10_000  # frozen before uvicorn started serving


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DOORSTEP_CLOUD_CHECKPOINT_S", "soon", "DOORSTEP_CLOUD_CHECKPOINT_S must be a number"),
        ("DOORSTEP_CLOUD_RATE_USER", "1.5", "DOORSTEP_CLOUD_RATE_USER must be a whole number"),
        ("DOORSTEP_CLOUD_MAINTENANCE_S", "0", "DOORSTEP_CLOUD_MAINTENANCE_S must be above 0"),
        ("DOORSTEP_CLOUD_RATE_WINDOW", "0", "DOORSTEP_CLOUD_RATE_WINDOW must be at least 1"),
        ("DOORSTEP_CLOUD_RATE_DEVICE", "-3", "DOORSTEP_CLOUD_RATE_DEVICE must be at least 1"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_words_a_bad_setting_and_exits(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: object,
    name: str,
    value: str,
    message: str,
    workers: str,
) -> None:
    import uvicorn

    from doorstep_cli import main

    monkeypatch.setenv("DOORSTEP_KEK", b64url_encode(TEST_KEK))
    monkeypatch.setenv("DOORSTEP_CLOUD_DB", f"sqlite:///{tmp_path}/cloud.db")
    monkeypatch.setenv("DOORSTEP_CLOUD_LOG_LEVEL", "warning")  # serve sets it: restore it after
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: pytest.fail("served with a bad setting"))
    assert main(["cloud", "serve", "--port", "0", "--workers", workers]) == 1
    error = capsys.readouterr().err
    assert message in error and "[bad_settings]" in error and "Traceback" not in error


def test_the_log_level_reaches_the_clouds_own_messages() -> None:
    """``--log-level error`` hides the cloud's warnings, ``info`` shows its information
    (it showed only warnings, whatever the level); a level it does not know is refused."""
    from cloud.app import _Stderr, configure_logging
    from cloud.errors import ConfigurationError

    logger = logging.getLogger("doorstep")
    saved = logger.level, list(logger.handlers)
    try:
        configure_logging("error")
        assert not logger.isEnabledFor(logging.WARNING)
        configure_logging("info")
        assert logger.isEnabledFor(logging.INFO) and not logger.isEnabledFor(logging.DEBUG)
        assert sum(isinstance(h, _Stderr) for h in logger.handlers) == 1  # not one per call
        with pytest.raises(ConfigurationError) as info:
            configure_logging("loud")
        assert info.value.code == "bad_settings"
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]


async def test_the_201_body_is_compact_json_with_the_model_escaped() -> None:
    """The bind/start body is formatted directly (not through json.dumps): the same bytes
    json.dumps gives, also for a model with a quote, a backslash and non-ASCII letters."""
    model = 'Lämp "Ö" \\ ☃'
    record = new_factory_record(model)
    async with in_process_cloud("sqlite:///:memory:") as c:
        await register(c.registry, c.kek, [record])
        token = await add_user(c.registry, "alice")
        request = start_session(SimDevice(record)).request
        response = await c.client.post("/v1/bind/start", json=request, headers=bearer(token))
    assert response.status_code == 201
    body = response.json()
    assert body["device"] == {"dev_id": record.dev_id.hex(), "model": model}
    assert response.content == json.dumps(body, separators=(",", ":")).encode("ascii")
