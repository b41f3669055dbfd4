"""The cloud as real uvicorn processes: happy path over TCP, two processes on one
PostgreSQL, and crash consistency under kill -9."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from cloud.client import CloudClient, CloudError
from cloud.keys import KeyEncryptionKey
from cloud.store.registry import open_registry
from cloud_helpers import (
    PG_DSN,
    PG_SKIP_REASON,
    TEST_KEK,
    ServerProcess,
    SimDevice,
    add_user,
    drop_pg_schema,
    finish_session,
    new_factory_record,
    pg_url,
    register,
    start_session,
)
from protocol.encoding import b64url_encode


async def _prepare(url: str, devices: int, users: int = 1) -> tuple[list[SimDevice], list[str]]:
    registry = await open_registry(url)
    try:
        records = [new_factory_record() for _ in range(devices)]
        await register(registry, KeyEncryptionKey(TEST_KEK), records)
        tokens = [await add_user(registry, f"user{i}") for i in range(users)]
    finally:
        await registry.close()
    return [SimDevice(r) for r in records], tokens


async def test_real_server_happy_path_with_the_client(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cloud.db"
    (device,), (token,) = await _prepare(url, 1)
    server = ServerProcess(url, log_path=tmp_path / "server.log")
    server.start()
    try:
        async with CloudClient(server.base_url, token=token) as cloud:
            session = start_session(device)
            session.answer = await cloud.bind_start(session.request)
            ack = finish_session(device, session)
            answer = await cloud.bind_complete(session.answer["attempt"], ack)
            assert await cloud.checkin(device.identifier, device.k_dev, ack) == answer
            assert [d["state"] for d in await cloud.devices()] == ["active"]
            docs = httpx.get(server.base_url + "/docs")
            assert docs.status_code == 200 and "swagger" in docs.text.lower()
            assert "/v1/bind/start" in httpx.get(server.base_url + "/openapi.json").json()["paths"]
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert token not in log and b64url_encode(device.k_dev) not in log


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP_REASON)
async def test_two_processes_share_postgresql(tmp_path: Path) -> None:
    url = pg_url()
    devices, (token,) = await _prepare(url, 2)
    servers = [
        ServerProcess(url, DOORSTEP_CLOUD_RATE_USER="4", log_path=tmp_path / f"s{i}.log")
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        a, b = (CloudClient(s.base_url, token=token) for s in servers)
        async with a, b:
            device = devices[0]
            session = start_session(device)
            session.answer = await a.bind_start(session.request)
            ack = finish_session(device, session)
            assert (await b.bind_complete(session.answer["attempt"], ack))["epoch"] == 1
            # The per-user limit (4 per window, 1 used) holds across both processes.
            results = []
            for i in range(6):
                client = (a, b)[i % 2]
                try:
                    await client.bind_start(start_session(devices[1]).request)
                    results.append(201)
                except CloudError as error:
                    results.append(error.status)
                    if error.status == 429:
                        assert error.code == "rate_limited" and error.retry_after
            assert results.count(201) == 3 and results.count(429) == 3, results
    finally:
        for server in servers:
            server.stop()
        await drop_pg_schema(url)


async def test_kill_9_leaves_every_device_bound_or_untouched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cloud.db"
    count = 40
    devices, (token,) = await _prepare(url, count)
    server = ServerProcess(url, log_path=tmp_path / "server.log",
                           DOORSTEP_CLOUD_RATE_USER="100000", DOORSTEP_CLOUD_RATE_ADDRESS="100000")
    server.start()
    started: dict[int, tuple[str, bytes]] = {}

    async def bind(i: int, device: SimDevice, cloud: CloudClient) -> None:
        session = start_session(device)
        session.answer = await cloud.bind_start(session.request)
        ack = finish_session(device, session)
        started[i] = (session.answer["attempt"], ack)
        await cloud.bind_complete(session.answer["attempt"], ack)
        await cloud.checkin(device.identifier, device.k_dev, ack)

    async with CloudClient(server.base_url, token=token, timeout=5) as cloud:
        tasks = [asyncio.create_task(bind(i, d, cloud)) for i, d in enumerate(devices)]
        deadline = time.monotonic() + 20
        while len(started) < count // 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        server.kill()  # SIGKILL mid-load
        await asyncio.gather(*tasks, return_exceptions=True)

    # After the crash: every device is fully bound (owner + identity + audit row) or untouched.
    db = sqlite3.connect(f"{tmp_path}/cloud.db")
    rows = db.execute(
        "SELECT d.dev_id, d.owner_id, d.pending_identifier, d.active_identifier, "
        "(SELECT COUNT(*) FROM audit_log a WHERE a.dev_id = d.dev_id AND a.event = 'bind') "
        "FROM devices d"
    ).fetchall()
    db.close()
    bound = 0
    for _dev_id, owner, pending, active, binds in rows:
        if owner is None:
            assert pending is None and active is None and binds == 0
        else:
            bound += 1
            assert (pending or active) is not None and binds == 1
    print(f"\nbound before the crash: {bound}/{count}; attempts started: {len(started)}")

    # Restart; clients that retry succeed.
    server = ServerProcess(url, port=server.port, log_path=tmp_path / "server.log",
                           DOORSTEP_CLOUD_RATE_USER="100000", DOORSTEP_CLOUD_RATE_ADDRESS="100000")
    server.start()
    try:
        async with CloudClient(server.base_url, token=token) as cloud:
            for i, device in enumerate(devices):
                if i in started:
                    attempt, ack = started[i]
                    await cloud.bind_complete(attempt, ack)
                    await cloud.checkin(device.identifier, device.k_dev, ack)
                else:
                    await bind(i, device, cloud)
            views = await cloud.devices()
            assert len(views) == count and {v["state"] for v in views} == {"active"}
    finally:
        server.stop()
