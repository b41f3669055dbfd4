"""The hub's local registry (aiosqlite) of the devices it brought in, with outcomes and timings."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS onboardings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    name TEXT NOT NULL,
    model TEXT,
    dev_id TEXT,
    identifier TEXT,
    status INTEGER NOT NULL,
    status_name TEXT NOT NULL,
    stage TEXT NOT NULL,
    message TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    final INTEGER NOT NULL,
    started_at REAL NOT NULL,
    duration_s REAL NOT NULL,
    timings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS onboardings_address ON onboardings(address);
"""


@dataclass(frozen=True)
class OnboardingRecord:
    address: str
    name: str
    model: str | None
    dev_id: str | None
    identifier: str | None
    status: int
    status_name: str
    stage: str
    message: str
    attempt: int
    final: bool
    started_at: float
    duration_s: float
    timings: dict[str, float]


class HubRegistry:
    """One row per onboarding attempt; ``final`` marks the last word on a device."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> HubRegistry:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.executescript(SCHEMA)
        await self._db.commit()
        return self

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> HubRegistry:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("registry is not open")
        return self._db

    async def record(self, rec: OnboardingRecord) -> None:
        await self.db.execute(
            "INSERT INTO onboardings (address, name, model, dev_id, identifier, status, "
            "status_name, stage, message, attempt, final, started_at, duration_s, timings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.address,
                rec.name,
                rec.model,
                rec.dev_id,
                rec.identifier,
                rec.status,
                rec.status_name,
                rec.stage,
                rec.message,
                rec.attempt,
                int(rec.final),
                rec.started_at,
                rec.duration_s,
                json.dumps(rec.timings),
            ),
        )
        await self.db.commit()

    async def all(self) -> list[OnboardingRecord]:
        async with self.db.execute(
            "SELECT address, name, model, dev_id, identifier, status, status_name, stage, "
            "message, attempt, final, started_at, duration_s, timings FROM onboardings ORDER BY id"
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            OnboardingRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
                bool(r[10]),
                r[11],
                r[12],
                json.loads(r[13]),
            )
            for r in rows
        ]

    async def latest_by_device(self) -> list[OnboardingRecord]:
        latest: dict[str, OnboardingRecord] = {}
        for rec in await self.all():
            latest[rec.address] = rec
        return sorted(latest.values(), key=lambda r: r.started_at)

    async def finished_addresses(self) -> set[str]:
        """Devices the hub must not try again: onboarded, or failed for good."""
        async with self.db.execute(
            "SELECT DISTINCT address FROM onboardings WHERE final = 1"
        ) as cursor:
            return {row[0] for row in await cursor.fetchall()}


def now() -> float:
    return time.time()
