"""The phone's local record of onboardings (issue 6, "My devices"), in an aiosqlite database.

One row per onboarding attempt: when, which device (advertised name, model as
registered in the cloud), the new identifier's short form, the DS1 status
(§4) and how long it took. Nothing secret is stored: no passphrase, no SSID,
no token, no key. The connection is opened lazily on first use so the
database lives in whichever event loop runs the app (Textual runs its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from phone.commissioner import OnboardingReport
from protocol.errors import Status

SCHEMA = """
CREATE TABLE IF NOT EXISTS onboardings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    device_name TEXT NOT NULL,
    address TEXT NOT NULL,
    model TEXT NOT NULL,
    identifier TEXT NOT NULL,
    status INTEGER NOT NULL,
    status_name TEXT NOT NULL,
    message TEXT NOT NULL,
    duration_s REAL NOT NULL
)
"""


@dataclass(frozen=True)
class HistoryEntry:
    at: float  # unix seconds
    device_name: str
    address: str
    model: str
    identifier: str  # short form (8 hex digits), "" when none was issued
    status: int
    status_name: str
    message: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @classmethod
    def from_report(
        cls,
        report: OnboardingReport,
        *,
        at: float,
        name: str,
        address: str,
        label: str | None = None,
        message: str | None = None,
    ) -> HistoryEntry:
        """``label`` replaces the status name ("cancelled", "error"), ``message`` the report's."""
        device = report.device
        return cls(
            at=at,
            device_name=device.name if device else name,
            address=device.address if device else address,
            model=device.model if device else "",
            identifier=report.short_id,
            status=int(report.status),
            status_name=label or report.status.name.lower(),
            message=message or ("Cancelled." if label == "cancelled" else report.message),
            duration_s=report.total_s,
        )


class History:
    """Onboarding history at ``path`` (``":memory:"`` for tests)."""

    def __init__(self, path: Path | str, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.wall_clock = wall_clock
        self._db: aiosqlite.Connection | None = None

    @classmethod
    def in_memory(cls) -> History:
        return cls(":memory:")

    async def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            if isinstance(self.path, Path):
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = await aiosqlite.connect(str(self.path))
            await db.execute(SCHEMA)
            await db.commit()
            self._db = db
        return self._db

    async def add(self, entry: HistoryEntry) -> None:
        db = await self._conn()
        await db.execute(
            "INSERT INTO onboardings (at, device_name, address, model, identifier, status,"
            " status_name, message, duration_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.at,
                entry.device_name,
                entry.address,
                entry.model,
                entry.identifier,
                entry.status,
                entry.status_name,
                entry.message,
                entry.duration_s,
            ),
        )
        await db.commit()

    async def record(
        self,
        report: OnboardingReport,
        *,
        name: str,
        address: str,
        label: str | None = None,
        message: str | None = None,
    ) -> HistoryEntry:
        entry = HistoryEntry.from_report(
            report, at=self.wall_clock(), name=name, address=address, label=label, message=message
        )
        await self.add(entry)
        return entry

    async def recent(self, limit: int = 100) -> list[HistoryEntry]:
        db = await self._conn()
        async with db.execute(
            "SELECT at, device_name, address, model, identifier, status, status_name, message,"
            " duration_s FROM onboardings ORDER BY at DESC, id DESC LIMIT ?",
            (limit,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            HistoryEntry(
                float(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4]),
                int(r[5]),
                str(r[6]),
                str(r[7]),
                float(r[8]),
            )
            for r in rows
        ]

    async def known_models(self) -> dict[str, str]:
        """Device name → model, from earlier onboardings (the list shows it before pairing)."""
        db = await self._conn()
        async with db.execute(
            "SELECT device_name, model FROM onboardings WHERE model != '' ORDER BY at"
        ) as cursor:
            rows = await cursor.fetchall()
        return {str(name): str(model) for name, model in rows}

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
