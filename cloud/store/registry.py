"""The Registry: every read and write the cloud makes, as domain operations.

Callers pass a body to ``await registry.run(body)``: ``body(tx)`` calls the
:class:`RegistryTransaction` methods, and everything it does commits or rolls
back together (a bind writes owner, identity and audit row in ONE transaction).
A body awaits nothing but ``tx`` (on SQLite it runs on the database thread,
batched with other bodies under one COMMIT — see ``cloud.store.database``).
Device rows are locked (``FOR UPDATE`` on PostgreSQL, the single writer on
SQLite) before any decision about a device, so concurrent requests for one
device are serialised on every backend.
"""

# SQL text is built only from the constant column lists below; values are always bound.
# ruff: noqa: S608

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cloud.errors import ConfigurationError
from cloud.store.database import Database, Row, Transaction, open_database
from cloud.store.schema import LATEST_VERSION, MIGRATIONS

T = TypeVar("T")


@dataclass(frozen=True, repr=False)
class DeviceRecord:
    """A registered device (factory data plus binding state). K_init stays wrapped."""

    dev_id: bytes
    mac: bytes
    model: str
    k_init_wrapped: bytes
    registered_at: int
    max_reset_ctr: int
    bound_reset_ctr: int | None
    owner_id: int | None
    last_epoch: int
    active_identifier: bytes | None
    active_epoch: int | None
    pending_identifier: bytes | None
    pending_epoch: int | None
    bound_at: int | None
    last_checkin: int | None

    def __repr__(self) -> str:
        return f"DeviceRecord(dev_id={self.dev_id.hex()}, owner={self.owner_id})"


@dataclass(frozen=True, repr=False)
class IdentityRecord:
    identifier: bytes
    dev_id: bytes
    epoch: int
    k_dev_wrapped: bytes
    state: str  # pending | active | retired
    attempt_id: bytes
    issued_at: int
    activated_at: int | None

    def __repr__(self) -> str:
        return f"IdentityRecord(identifier={self.identifier.hex()}, state={self.state})"


@dataclass(frozen=True, repr=False)
class AttemptRecord:
    """A BindAttempt as stored: what bind/complete and check-in need later."""

    attempt_id: bytes
    dev_id: bytes
    principal: str
    user_id: int
    request_hash: bytes
    th: bytes
    identifier: bytes
    epoch: int
    reset_ctr: int
    answer_wrapped: bytes
    created_at: int
    expires_at: int
    state: str  # pending | bound | superseded
    ack: bytes | None
    completed_at: int | None
    n_d: bytes | None  # the device's N_D: (dev_id, n_d) is unique, the replay record
    #: The issued identity's K_dev, wrapped, until the bind completes (None for
    #: attempts made before schema version 5: their identity has its own row).
    k_dev_wrapped: bytes | None = None

    def __repr__(self) -> str:
        return f"AttemptRecord(dev_id={self.dev_id.hex()}, state={self.state})"


@dataclass(frozen=True)
class UserRecord:
    user_id: int
    name: str


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: int
    event: str
    dev_id: bytes | None
    identifier: bytes | None
    user_id: int | None
    principal: str | None
    detail: str


def _b(value: Any) -> Any:
    # asyncpg returns bytes for BYTEA already; SQLite returns bytes for BLOB.
    return bytes(value) if isinstance(value, memoryview) else value


def _record(cls: Any, row: Row) -> Any:
    return cls(*(_b(row[i]) for i in range(len(row))))


_DEVICE_COLUMNS = (
    "dev_id, mac, model, k_init_wrapped, registered_at, max_reset_ctr, bound_reset_ctr, "
    "owner_id, last_epoch, active_identifier, active_epoch, pending_identifier, "
    "pending_epoch, bound_at, last_checkin"
)
_IDENTITY_COLUMNS = (
    "identifier, dev_id, epoch, k_dev_wrapped, state, attempt_id, issued_at, activated_at"
)
_ATTEMPT_COLUMNS = (
    "attempt_id, dev_id, principal, user_id, request_hash, th, identifier, epoch, reset_ctr, "
    "answer_wrapped, created_at, expires_at, state, ack, completed_at, n_d, k_dev_wrapped"
)
_DEVICE_WIDTH = len(_DEVICE_COLUMNS.split(","))


def _prefixed(columns: str, alias: str) -> str:
    return ", ".join(f"{alias}.{name.strip()}" for name in columns.split(","))


#: The device, its bind/start count and the replay record, in one statement (SQLite:
#: the batch holds the database's write lock, so the read is also the lock).
_OPEN_BIND_START_SQLITE = (
    f"SELECT {_prefixed(_DEVICE_COLUMNS, 'd')}, d.rate_window, d.rate_hits, "
    f"{_prefixed(_ATTEMPT_COLUMNS, 'a')} FROM devices d "
    "LEFT JOIN attempts a ON a.dev_id = d.dev_id AND a.n_d = $2 WHERE d.dev_id = $1"
)
_OPEN_BIND_START_LOCK = (
    f"SELECT {_DEVICE_COLUMNS}, rate_window, rate_hits FROM devices WHERE dev_id = $1 FOR UPDATE"
)


@functools.cache
def _hits_sql(buckets: int) -> str:
    values = ", ".join(f"(${i + 2}, $1, 1)" for i in range(buckets))
    return (
        f"INSERT INTO rate_counters (bucket, window_start, hits) VALUES {values} "
        "ON CONFLICT (bucket, window_start) DO UPDATE SET hits = rate_counters.hits + 1 "
        "RETURNING bucket, hits"
    )


@dataclass(frozen=True)
class BindStartCount:
    """A device's bind/start count: the window it counts in, and the requests in it."""

    window_start: int
    hits: int


_NO_COUNT = BindStartCount(0, 0)


class RegistryTransaction:
    """Domain operations inside one database transaction."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    # -- devices --------------------------------------------------------------------

    async def device(self, dev_id: bytes, *, lock: bool = False) -> DeviceRecord | None:
        sql = f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE dev_id = $1"
        row = await self._tx.fetchrow(sql + (" FOR UPDATE" if lock else ""), dev_id)
        return None if row is None else _record(DeviceRecord, row)

    async def open_bind_start(
        self, dev_id: bytes, n_d: bytes | None, window_start: int
    ) -> tuple[DeviceRecord | None, BindStartCount, AttemptRecord | None]:
        """Lock the device, and read it with its bind/start count and the replay record.

        ``(device, count, attempt)``: the device (None if unknown), its count in
        the window that starts at ``window_start`` including this request (to be
        saved with :meth:`save_bind_start`), and the attempt that already
        answered ``(dev_id, n_d)``, if any. On SQLite this is one statement. On
        PostgreSQL the replay record is read after the lock is held: a read in
        the locking statement would not see an attempt committed while it waited.
        """
        if self._tx.dialect == "sqlite":
            row = await self._tx.fetchrow(_OPEN_BIND_START_SQLITE, dev_id, n_d)
            if row is None:
                return None, _NO_COUNT, None
            device = DeviceRecord(*row[:_DEVICE_WIDTH])
            replay = (
                None if row[_DEVICE_WIDTH + 2] is None else AttemptRecord(*row[_DEVICE_WIDTH + 2 :])
            )
        else:
            row = await self._tx.fetchrow(_OPEN_BIND_START_LOCK, dev_id)
            # Read for an unknown dev_id too: a round trip less would tell it apart.
            replay = None if n_d is None else await self.replay(dev_id, n_d)
            if row is None:
                return None, _NO_COUNT, None
            device = _record(DeviceRecord, row[:_DEVICE_WIDTH])
        window, hits = row[_DEVICE_WIDTH], row[_DEVICE_WIDTH + 1]
        # An instance whose clock is behind counts into the current window
        # rather than starting an older one over.
        if window is not None and window >= window_start:
            count = BindStartCount(window, hits + 1)
        else:
            count = BindStartCount(window_start, 1)
        return device, count, replay

    async def save_bind_start(
        self, dev_id: bytes, count: BindStartCount, last_epoch: int | None, reset_ctr: int = -1
    ) -> None:
        """Write what :meth:`open_bind_start` read back: the count, the device's last
        epoch and the highest reset_ctr seen (raised to ``reset_ctr`` if lower).

        One statement of the same shape on every path, an unknown dev_id (no
        row) included, so that refusals cost alike.
        """
        await self._tx.execute(
            "UPDATE devices SET rate_window = $2, rate_hits = $3, "
            "last_epoch = COALESCE($4, last_epoch), "
            "max_reset_ctr = CASE WHEN max_reset_ctr > $5 THEN max_reset_ctr ELSE $5 END "
            "WHERE dev_id = $1",
            dev_id,
            count.window_start,
            count.hits,
            last_epoch,
            reset_ctr,
        )

    async def register_devices(
        self, rows: Iterable[tuple[bytes, bytes, str, bytes]], now: int
    ) -> None:
        """Insert factory records ``(dev_id, mac, model, k_init_wrapped)`` in one batch."""
        await self._tx.executemany(
            "INSERT INTO devices (dev_id, mac, model, k_init_wrapped, registered_at) "
            "VALUES ($1, $2, $3, $4, $5)",
            [(*row, now) for row in rows],
        )

    async def set_binding(
        self,
        dev_id: bytes,
        *,
        owner_id: int | None,
        bound_reset_ctr: int | None,
        bound_at: int | None,
        active: tuple[bytes, int] | None,
        pending: tuple[bytes, int] | None,
        last_checkin: int | None,
    ) -> None:
        await self._tx.execute(
            "UPDATE devices SET owner_id = $2, bound_reset_ctr = $3, bound_at = $4, "
            "active_identifier = $5, active_epoch = $6, pending_identifier = $7, "
            "pending_epoch = $8, last_checkin = $9 WHERE dev_id = $1",
            dev_id,
            owner_id,
            bound_reset_ctr,
            bound_at,
            active[0] if active else None,
            active[1] if active else None,
            pending[0] if pending else None,
            pending[1] if pending else None,
            last_checkin,
        )

    async def devices_of(self, owner_id: int) -> list[DeviceRecord]:
        rows = await self._tx.fetch(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE owner_id = $1 ORDER BY bound_at, dev_id",
            owner_id,
        )
        return [_record(DeviceRecord, row) for row in rows]

    async def all_devices(self, limit: int, offset: int = 0) -> list[DeviceRecord]:
        rows = await self._tx.fetch(
            f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY registered_at, dev_id "
            "LIMIT $1 OFFSET $2",
            limit,
            offset,
        )
        return [_record(DeviceRecord, row) for row in rows]

    async def registered(self, dev_ids: Sequence[bytes]) -> set[bytes]:
        """Those of ``dev_ids`` that are registered devices."""
        found: set[bytes] = set()
        for start in range(0, len(dev_ids), 500):  # bound the number of parameters
            chunk = dev_ids[start : start + 500]
            marks = ", ".join(f"${i + 1}" for i in range(len(chunk)))
            rows = await self._tx.fetch(
                f"SELECT dev_id FROM devices WHERE dev_id IN ({marks})", *chunk
            )
            found.update(_b(row[0]) for row in rows)
        return found

    async def some_device(self) -> DeviceRecord | None:
        """Any one registered device (None if there are none)."""
        row = await self._tx.fetchrow(f"SELECT {_DEVICE_COLUMNS} FROM devices LIMIT 1")
        return None if row is None else _record(DeviceRecord, row)

    async def count_devices(self) -> int:
        row = await self._tx.fetchrow("SELECT COUNT(*) FROM devices")
        return int(row[0]) if row else 0

    # -- identities -----------------------------------------------------------------

    async def identity(self, identifier: bytes) -> IdentityRecord | None:
        """The identity ``identifier``: its own row, or the attempt that issued it.

        An identity lives in its attempt until the bind completes (schema
        version 5); there it is *pending*, or *retired* once its epoch is below
        the device's ``retired_below`` (see :meth:`retire_identities`). One
        statement, so one snapshot: under PostgreSQL's READ COMMITTED a bind
        completing between two reads could otherwise hide it from both.
        """
        row = await self._tx.fetchrow(
            f"SELECT {_IDENTITY_COLUMNS} FROM identities WHERE identifier = $1 "
            "UNION ALL "
            "SELECT a.identifier, a.dev_id, a.epoch, a.k_dev_wrapped, "
            "CASE WHEN a.epoch < COALESCE(d.retired_below, 0) THEN 'retired' "
            "ELSE 'pending' END, a.attempt_id, a.created_at, CAST(NULL AS BIGINT) "
            "FROM attempts a JOIN devices d ON d.dev_id = a.dev_id "
            "WHERE a.identifier = $1 AND a.k_dev_wrapped IS NOT NULL AND a.state <> 'bound' "
            "LIMIT 1",
            identifier,
        )
        return None if row is None else _record(IdentityRecord, row)

    async def insert_identity(self, identity: IdentityRecord) -> None:
        await self._tx.execute(
            f"INSERT INTO identities ({_IDENTITY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            identity.identifier,
            identity.dev_id,
            identity.epoch,
            identity.k_dev_wrapped,
            identity.state,
            identity.attempt_id,
            identity.issued_at,
            identity.activated_at,
        )

    async def activate_identity(self, identifier: bytes, now: int) -> None:
        await self._tx.execute(
            "UPDATE identities SET state = 'active', activated_at = $2 WHERE identifier = $1",
            identifier,
            now,
        )

    async def retire_identities(self, dev_id: bytes, *, below_epoch: int | None) -> None:
        """Retire the device's non-retired identities (all, or those under an epoch).

        Those still living in their attempt are retired by raising the device's
        ``retired_below`` watermark (to every epoch issued so far, for all).
        """
        if below_epoch is None:
            await self._tx.execute(
                "UPDATE identities SET state = 'retired' WHERE dev_id = $1 AND state <> 'retired'",
                dev_id,
            )
            await self._tx.execute(
                "UPDATE devices SET retired_below = last_epoch + 1 WHERE dev_id = $1", dev_id
            )
        else:
            await self._tx.execute(
                "UPDATE identities SET state = 'retired' "
                "WHERE dev_id = $1 AND state <> 'retired' AND epoch < $2",
                dev_id,
                below_epoch,
            )
            await self._tx.execute(
                "UPDATE devices SET retired_below = $2 WHERE dev_id = $1 "
                "AND (retired_below IS NULL OR retired_below < $2)",
                dev_id,
                below_epoch,
            )

    # -- attempts (and with them the (dev_id, N_D) replay records) -----------------

    async def attempt(self, attempt_id: bytes) -> AttemptRecord | None:
        row = await self._tx.fetchrow(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE attempt_id = $1", attempt_id
        )
        return None if row is None else _record(AttemptRecord, row)

    async def insert_attempt(self, attempt: AttemptRecord) -> None:
        await self._tx.execute(
            f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) VALUES "
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            attempt.attempt_id,
            attempt.dev_id,
            attempt.principal,
            attempt.user_id,
            attempt.request_hash,
            attempt.th,
            attempt.identifier,
            attempt.epoch,
            attempt.reset_ctr,
            attempt.answer_wrapped,
            attempt.created_at,
            attempt.expires_at,
            attempt.state,
            attempt.ack,
            attempt.completed_at,
            attempt.n_d,
            attempt.k_dev_wrapped,
        )

    async def mark_attempt_bound(self, attempt_id: bytes, ack: bytes, now: int) -> None:
        await self._tx.execute(
            # The identity (and its wrapped K_dev) now has its own row.
            "UPDATE attempts SET state = 'bound', ack = $2, completed_at = $3, "
            "k_dev_wrapped = NULL WHERE attempt_id = $1",
            attempt_id,
            ack,
            now,
        )

    async def supersede_attempts(self, dev_id: bytes, *, below_epoch: int | None) -> None:
        if below_epoch is None:
            await self._tx.execute(
                "UPDATE attempts SET state = 'superseded' WHERE dev_id = $1 AND state = 'pending'",
                dev_id,
            )
        else:
            await self._tx.execute(
                "UPDATE attempts SET state = 'superseded' "
                "WHERE dev_id = $1 AND state = 'pending' AND epoch < $2",
                dev_id,
                below_epoch,
            )

    async def replay(self, dev_id: bytes, n_d: bytes) -> AttemptRecord | None:
        """The attempt that already answered ``(dev_id, N_D)``, if any."""
        row = await self._tx.fetchrow(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE dev_id = $1 AND n_d = $2", dev_id, n_d
        )
        return None if row is None else _record(AttemptRecord, row)

    # -- signatures, rate limits ------------------------------------------------------

    async def use_nonce(self, identifier: bytes, nonce: bytes, keep_until: int) -> bool:
        """Record a §6.3 nonce; False if it was already used."""
        row = await self._tx.fetchrow(
            "INSERT INTO sig_nonces (identifier, nonce, keep_until) VALUES ($1, $2, $3) "
            "ON CONFLICT (identifier, nonce) DO NOTHING RETURNING keep_until",
            identifier,
            nonce,
            keep_until,
        )
        return row is not None

    async def hits(self, buckets: Sequence[str], window_start: int) -> dict[str, int]:
        """Count one request in each (distinct) bucket in one statement; their counts."""
        rows = await self._tx.fetch(_hits_sql(len(buckets)), window_start, *buckets)
        return {row[0]: row[1] for row in rows}

    # -- users ------------------------------------------------------------------------

    async def add_user(self, name: str, token_hash: bytes, now: int) -> int:
        row = await self._tx.fetchrow(
            "INSERT INTO users (name, token_hash, created_at) VALUES ($1, $2, $3) "
            "RETURNING user_id",
            name,
            token_hash,
            now,
        )
        assert row is not None
        return int(row[0])

    async def user_by_token_hash(self, token_hash: bytes) -> UserRecord | None:
        row = await self._tx.fetchrow(
            "SELECT user_id, name FROM users WHERE token_hash = $1", token_hash
        )
        return None if row is None else UserRecord(int(row[0]), str(row[1]))

    async def user_by_name(self, name: str) -> UserRecord | None:
        row = await self._tx.fetchrow("SELECT user_id, name FROM users WHERE name = $1", name)
        return None if row is None else UserRecord(int(row[0]), str(row[1]))

    async def user_names(self) -> dict[int, str]:
        rows = await self._tx.fetch("SELECT user_id, name FROM users")
        return {int(row[0]): str(row[1]) for row in rows}

    # -- audit --------------------------------------------------------------------------

    async def audit(
        self,
        event: str,
        now: int,
        *,
        dev_id: bytes | None = None,
        identifier: bytes | None = None,
        user_id: int | None = None,
        principal: str | None = None,
        detail: str = "",
    ) -> None:
        await self._tx.execute(
            "INSERT INTO audit_log (at, event, dev_id, identifier, user_id, principal, detail) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            now,
            event,
            dev_id,
            identifier,
            user_id,
            principal,
            detail,
        )

    async def audit_entries(self, dev_id: bytes | None = None) -> list[AuditEntry]:
        columns = "seq, at, event, dev_id, identifier, user_id, principal, detail"
        if dev_id is None:
            rows = await self._tx.fetch(f"SELECT {columns} FROM audit_log ORDER BY seq")
        else:
            rows = await self._tx.fetch(
                f"SELECT {columns} FROM audit_log WHERE dev_id = $1 ORDER BY seq", dev_id
            )
        return [_record(AuditEntry, row) for row in rows]

    # -- maintenance --------------------------------------------------------------------

    async def prune(self, now: int, *, attempt_retention_s: int, rate_window_s: int) -> None:
        """Drop expired nonces, rate windows and stale unbound attempts (with their replay records).

        ``replays`` only holds what servers before schema version 3 wrote.
        """
        await self._tx.execute("DELETE FROM sig_nonces WHERE keep_until < $1", now)
        await self._tx.execute("DELETE FROM replays WHERE keep_until < $1", now)
        await self._tx.execute(
            "DELETE FROM rate_counters WHERE window_start < $1", now - 2 * rate_window_s
        )
        cutoff = now - attempt_retention_s
        await self._tx.execute(
            "DELETE FROM identities WHERE state = 'pending' AND attempt_id IN "
            "(SELECT attempt_id FROM attempts WHERE state <> 'bound' AND created_at < $1)",
            cutoff,
        )
        await self._tx.execute(
            "DELETE FROM attempts WHERE state <> 'bound' AND created_at < $1", cutoff
        )


class Registry:
    """The storage interface of the cloud over one :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @property
    def dialect(self) -> str:
        return self.database.dialect

    async def run(
        self, body: Callable[[RegistryTransaction], Awaitable[T]], *, heavy: bool = False
    ) -> T:
        """``body(tx)`` in one transaction; its result, or its exception with nothing kept.

        ``heavy``: a body that may take long (bulk writes, pruning), run off the event loop.
        """

        async def wrapped(tx: Transaction) -> T:
            return await body(RegistryTransaction(tx))

        return await self.database.run(wrapped, heavy=heavy)

    async def schema_version(self) -> int:
        async def body(tx: Transaction) -> int:
            await _ensure_version_table(tx, self.dialect)
            row = await tx.fetchrow("SELECT MAX(version) FROM schema_version")
            return int(row[0]) if row is not None and row[0] is not None else 0

        return await self.database.run(body)

    async def migrate(self, up_to: int | None = None) -> list[int]:
        """Apply missing migrations (up to ``up_to``, default all); returns the versions applied.

        Safe to run concurrently.
        """

        async def body(tx: Transaction) -> list[int]:
            applied: list[int] = []
            if self.dialect == "postgresql":
                # Serialise concurrent migrators (several server processes starting).
                await tx.execute("SELECT pg_advisory_xact_lock(7461836)")
            await _ensure_version_table(tx, self.dialect)
            row = await tx.fetchrow("SELECT MAX(version) FROM schema_version")
            current = int(row[0]) if row is not None and row[0] is not None else 0
            for version, statements in MIGRATIONS:
                if version <= current or (up_to is not None and version > up_to):
                    continue
                for statement in statements[self.dialect]:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    version,
                    int(time.time()),
                )
                applied.append(version)
            return applied

        try:
            return await self.database.run(body, heavy=True)
        except (ConfigurationError, ConnectionError):
            raise
        except Exception as exc:  # nothing was applied (one transaction): say why in one line
            raise ConfigurationError(
                f"cannot bring the database's schema up to date: {type(exc).__name__}: {exc}",
                code="database_unavailable",
            ) from exc

    async def is_current(self) -> bool:
        return await self.schema_version() == LATEST_VERSION

    async def checkpoint(self) -> None:
        await self.database.checkpoint()

    async def close(self) -> None:
        await self.database.close()


async def _ensure_version_table(tx: Transaction, dialect: str) -> None:
    bigint = "BIGINT" if dialect == "postgresql" else "INTEGER"
    await tx.execute(
        f"CREATE TABLE IF NOT EXISTS schema_version (version {bigint} PRIMARY KEY, "
        f"applied_at {bigint} NOT NULL)"
    )


async def open_registry(
    url: str, *, migrate: bool = True, durable: bool = False, create: bool | None = None
) -> Registry:
    """The registry at ``url``, its schema brought up to date unless ``migrate`` is False.

    ``create`` (default: ``migrate``): a PostgreSQL ``schema=`` that does not exist
    yet is created; otherwise it is refused (a mistyped name is not a new, empty cloud).

    ``durable``: each commit survives a power loss once it returns (see
    :func:`~cloud.store.database.open_database`).

    A schema that cannot be brought up to date (a database that holds other
    tables of the same names, say) is a :class:`ConfigurationError`
    (``database_unavailable``), with the database closed again.
    """
    create = migrate if create is None else create
    registry = Registry(await open_database(url, durable=durable, create=create))
    if migrate:
        try:
            await registry.migrate()
        except BaseException:
            await registry.close()  # an open connection's thread would keep the process alive
            raise
    return registry
