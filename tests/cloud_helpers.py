"""Shared pieces for the cloud tests: deterministic entropy, a real commissioner
and device built from the protocol core, and an in-process cloud.

Nothing here is mocked: the commissioner and device are the protocol core's
own state machines; the cloud is the real app over a real database.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cloud.app import create_app
from cloud.keys import PURPOSE_K_INIT, KeyEncryptionKey
from cloud.service import hash_token
from cloud.settings import Settings
from cloud.store.registry import Registry, RegistryTransaction, open_registry
from protocol.cloudside import open_wrapped_identity
from protocol.encoding import b64url_decode, b64url_encode
from protocol.factory import FactoryRecord
from protocol.handshake import CommissionerHandshake, DeviceHandshake
from protocol.schedule import bind_ack
from protocol.signature import sign_request

ROOT = Path(__file__).resolve().parent.parent
# The verbatim copy kept with the tests (a clone has no ../shared; test_vectors compares them).
VECTORS = json.loads((ROOT / "tests" / "vectors" / "ds1.json").read_text())
if not VECTORS:  # pragma: no cover
    raise RuntimeError("vectors missing")

TEST_KEK = hashlib.sha256(b"doorstep test kek").digest()
PG_DSN = os.environ.get("DOORSTEP_TEST_PG_DSN")
PG_SKIP_REASON = "DOORSTEP_TEST_PG_DSN not set (PostgreSQL tests need a server)"


class CountingEntropy:
    """Deterministic draws: a scripted prefix, then SHA-256 of a counter."""

    def __init__(self, scripted: Iterable[bytes] = (), seed: bytes = b"") -> None:
        self._scripted = b"".join(scripted)
        self._counter = itertools.count()
        self._seed = seed or uuid.uuid4().bytes
        self.reads: list[int] = []

    def read(self, n: int) -> bytes:
        self.reads.append(n)
        if self._scripted:
            value, self._scripted = self._scripted[:n], self._scripted[n:]
            assert len(value) == n, "scripted draws ran out mid-read"
            return value
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self._seed + str(next(self._counter)).encode()).digest()
        return out[:n]


def os_rng(n: int) -> bytes:
    return os.urandom(n)


def new_factory_record(model: str = "Doorstep Lock D1") -> FactoryRecord:
    return FactoryRecord(os.urandom(16), os.urandom(6), os.urandom(32), model)


async def register(
    registry: Registry, kek: KeyEncryptionKey, records: Iterable[FactoryRecord]
) -> None:
    rows = [
        (r.dev_id, r.mac, r.model, kek.wrap(PURPOSE_K_INIT, r.dev_id, r.k_init)) for r in records
    ]
    now = int(time.time())

    async def body(tx: RegistryTransaction) -> None:
        await tx.register_devices(rows, now)

    await registry.run(body)


async def add_user(registry: Registry, name: str) -> str:
    token = b64url_encode(os.urandom(32))

    async def body(tx: RegistryTransaction) -> None:
        await tx.add_user(name, hash_token(token), int(time.time()))

    await registry.run(body)
    return token


async def registered_device(
    registry: Registry, kek: KeyEncryptionKey, user: str = "alice"
) -> tuple[SimDevice, str]:
    """A factory-fresh device registered in the cloud, and a new user's bearer token."""
    device = SimDevice(new_factory_record())
    await register(registry, kek, [device.record])
    return device, await add_user(registry, user)


@dataclass
class SimDevice:
    """A device as the protocol core models it, with its stored identity."""

    record: FactoryRecord
    reset_ctr: int = 0
    active_epoch: int = 0
    identifier: bytes = b""
    k_dev: bytes = b""
    epoch: int = 0
    ack: bytes = b""
    handshake: DeviceHandshake | None = field(default=None, repr=False)

    def challenge(self, m1: bytes, rng: Callable[[int], bytes] = os_rng) -> bytes:
        self.handshake = DeviceHandshake(self.record, reset_ctr=self.reset_ctr, fw="1.0.0", rng=rng)
        return self.handshake.receive_hello(m1)

    def accept(self, m3: bytes, wrapped_identity: bytes) -> tuple[bytes, bytes]:
        """Process M3 and PROVISION's W; returns (M4, Ack) and stores the pending identity."""
        assert self.handshake is not None
        m4, result = self.handshake.receive_auth(m3)
        identity = open_wrapped_identity(
            result.k_wrap, result.th, wrapped_identity, self.active_epoch
        )
        self.identifier, self.k_dev, self.epoch = (
            identity.identifier,
            identity.k_dev,
            identity.epoch,
        )
        self.ack = bind_ack(self.k_dev, self.record.dev_id, self.identifier, self.epoch, result.th)
        return m4, self.ack

    def sign(
        self, method: str, path: str, body: bytes, ts: int | None = None, nonce: bytes | None = None
    ) -> str:
        return sign_request(
            self.identifier,
            self.k_dev,
            method,
            path,
            body,
            int(time.time()) if ts is None else ts,
            nonce or os.urandom(16),
        )

    def checkin_request(
        self, ts: int | None = None, nonce: bytes | None = None
    ) -> tuple[bytes, dict[str, str]]:
        body = json.dumps({"ack": b64url_encode(self.ack)}).encode()
        return body, {
            "authorization": self.sign("POST", "/v1/devices/checkin", body, ts, nonce),
            "content-type": "application/json",
        }


@dataclass
class Onboarding:
    """One commissioner session up to the cloud's answer."""

    commissioner: CommissionerHandshake
    request: dict[str, str]
    answer: dict[str, Any] | None = None


def start_session(device: SimDevice) -> Onboarding:
    commissioner = CommissionerHandshake(os_rng)
    m1 = commissioner.hello()
    m2 = device.challenge(m1)
    request = commissioner.receive_challenge(m2)
    return Onboarding(commissioner, request.to_json())


def finish_session(device: SimDevice, onboarding: Onboarding) -> bytes:
    """Feed the cloud's answer to commissioner and device; returns the device's Ack."""
    answer = onboarding.answer
    assert answer is not None
    m3 = onboarding.commissioner.receive_cloud_answer(
        b64url_decode(answer["ticket"]),
        b64url_decode(answer["seal"]),
        b64url_decode(answer["session_secret"]),
    )
    m4, ack = device.accept(m3, b64url_decode(answer["wrapped_identity"]))
    result = onboarding.commissioner.receive_auth_ok(m4)
    assert len(result.sas) == 6
    return ack


async def accept_bind(
    client: httpx.AsyncClient, token: str, device: SimDevice
) -> tuple[Onboarding, bytes]:
    """bind/start → handshake, the device accepting; the session and the device's Ack."""
    session = start_session(device)
    response = await client.post("/v1/bind/start", json=session.request, headers=bearer(token))
    assert response.status_code == 201, response.text
    session.answer = response.json()
    return session, finish_session(device, session)


async def onboard(client: httpx.AsyncClient, token: str, device: SimDevice) -> dict[str, Any]:
    """bind/start → handshake → bind/complete; returns the bind/complete answer."""
    session, ack = await accept_bind(client, token, device)
    assert session.answer is not None
    response = await client.post(
        "/v1/bind/complete",
        json={"attempt": session.answer["attempt"], "ack": b64url_encode(ack)},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def pg_url() -> str:
    """A PostgreSQL URL with a fresh schema (runs and tests never collide)."""
    assert PG_DSN is not None
    schema = "t_" + uuid.uuid4().hex[:16]
    separator = "&" if "?" in PG_DSN else "?"
    return f"{PG_DSN}{separator}schema={schema}"


async def drop_pg_schema(url: str) -> None:
    import asyncpg

    from cloud.store.database import split_postgres_url

    dsn, schema = split_postgres_url(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@dataclass
class Cloud:
    """An in-process cloud with its registry, KEK and an ASGI client."""

    registry: Registry
    kek: KeyEncryptionKey
    client: httpx.AsyncClient
    app: Any


@asynccontextmanager
async def in_process_cloud(
    url: str,
    *,
    settings: Settings | None = None,
    entropy: Any = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Cloud]:
    registry = await open_registry(url)
    kek = KeyEncryptionKey(TEST_KEK)
    settings = settings or Settings(database_url=url)
    app = create_app(
        settings, registry=registry, kek=kek, entropy=entropy or CountingEntropy(), clock=clock
    )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://cloud.test") as client:
        try:
            yield Cloud(registry, kek, client, app)
        finally:
            await registry.close()
            if url.startswith("postgresql"):
                await drop_pg_schema(url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DOORSTEP_KEK"] = b64url_encode(TEST_KEK)
    env["DOORSTEP_CLOUD_DB"] = url
    env.pop("DOORSTEP_KEK_FILE", None)
    env.update(extra)
    return env


class ServerProcess:
    """``python -m doorstep_cli cloud serve`` on a free port of 127.0.0.1."""

    def __init__(
        self, url: str, *, port: int | None = None, log_path: Path | None = None, **env: str
    ) -> None:
        self.url = url
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = server_env(url, **env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "doorstep_cli",
                "cloud",
                "serve",
                "--db",
                self.url,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=output,
            stderr=output,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if httpx.get(self.base_url + "/v1/health", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
