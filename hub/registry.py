"""The hub's local registry (aiosqlite) of the devices it brought in, with outcomes and timings."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

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


IN_PROGRESS = -1  # status of a row whose onboarding has not ended (yet, or ever: hub killed)


class HubRegistryError(Exception):
    """The registry file cannot be used (not a database, unreadable, read-only)."""


async def _thread_ended(conn: aiosqlite.Connection) -> None:
    """Wait (at most 5 s) for the thread of a connection that failed to open to end
    (aiosqlite stops it without waiting)."""
    thread = conn if isinstance(conn, threading.Thread) else getattr(conn, "_thread", None)
    for _ in range(5000):
        if thread is None or not thread.is_alive():
            return
        await asyncio.sleep(0.001)


class HubRegistry:
    """One row per onboarding attempt; ``final`` marks the last word on a device.

    A row is written when an attempt starts (status ``IN_PROGRESS``) and
    completed when it ends, so an attempt cut short by a crash is still known
    after a restart and can be settled against the cloud.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> HubRegistry:
        """Open (creating it if need be) the registry file.

        A file that is no SQLite database, or one that cannot be opened or written,
        is a :class:`HubRegistryError` with nothing left open: a connection's thread
        left behind kept the process from ever exiting.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = aiosqlite.connect(self.path)
        try:
            await db
        except sqlite3.Error as exc:
            await _thread_ended(db)
            raise HubRegistryError(f"cannot open the hub registry {self.path}: {exc}") from None
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.executescript(SCHEMA)
            await db.commit()
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise HubRegistryError(
                    f"{self.path} is not a usable hub registry: {exc}"
                ) from None
            raise
        self._db = db
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

    async def begin(self, address: str, name: str, attempt: int, started_at: float) -> int:
        """Note an attempt as it starts; returns its row id."""
        cursor = await self.db.execute(
            "INSERT INTO onboardings (address, name, status, status_name, stage, message, "
            "attempt, final, started_at, duration_s, timings) "
            "VALUES (?, ?, ?, 'in_progress', 'Connect', 'in progress', ?, 0, ?, 0, '{}')",
            (address, name, IN_PROGRESS, attempt, started_at),
        )
        await self.db.commit()
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def note_device(self, row_id: int, dev_id: str, model: str) -> None:
        """The cloud named the device (after bind/start): enough to settle it later."""
        await self.db.execute(
            "UPDATE onboardings SET dev_id = ?, model = ? WHERE id = ?", (dev_id, model, row_id)
        )
        await self.db.commit()

    async def finish(self, row_id: int, rec: OnboardingRecord) -> None:
        await self.db.execute(
            "UPDATE onboardings SET model = ?, dev_id = ?, identifier = ?, status = ?, "
            "status_name = ?, stage = ?, message = ?, final = ?, duration_s = ?, timings = ? "
            "WHERE id = ?",
            (
                rec.model,
                rec.dev_id,
                rec.identifier,
                rec.status,
                rec.status_name,
                rec.stage,
                rec.message,
                int(rec.final),
                rec.duration_s,
                json.dumps(rec.timings),
                row_id,
            ),
        )
        await self.db.commit()

    async def unfinished(self) -> list[tuple[int, OnboardingRecord]]:
        async with self.db.execute(
            f"SELECT id, {_COLUMNS} FROM onboardings WHERE status = ? ORDER BY id",  # noqa: S608 - constant columns
            (IN_PROGRESS,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [(r[0], _row(r[1:])) for r in rows]

    async def all(self) -> list[OnboardingRecord]:
        async with self.db.execute(
            f"SELECT {_COLUMNS} FROM onboardings ORDER BY id"  # noqa: S608 - constant columns
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row(r) for r in rows]

    async def latest_by_device(self) -> list[OnboardingRecord]:
        latest: dict[str, OnboardingRecord] = {}
        for rec in await self.all():
            latest[rec.address] = rec
        return sorted(latest.values(), key=lambda r: r.started_at)

    async def onboarded_count(self) -> int:
        """How many devices (by address) this hub has onboarded so far."""
        async with self.db.execute(
            "SELECT COUNT(DISTINCT address) FROM onboardings WHERE status = 0"
        ) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def finished_addresses(self) -> set[str]:
        """Devices the hub must not try again: onboarded, or failed for good."""
        async with self.db.execute(
            "SELECT DISTINCT address FROM onboardings WHERE final = 1"
        ) as cursor:
            return {row[0] for row in await cursor.fetchall()}


_COLUMNS = (
    "address, name, model, dev_id, identifier, status, status_name, stage, message, attempt, "
    "final, started_at, duration_s, timings"
)


def _row(r: Any) -> OnboardingRecord:
    return OnboardingRecord(
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


def now() -> float:
    return time.time()
