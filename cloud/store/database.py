"""Database adapters: one small transaction interface over aiosqlite and asyncpg.

SQL is written once in PostgreSQL's ``$1, $2 …`` placeholder style; the SQLite
adapter rewrites it to SQLite's equivalent ``?1, ?2 …`` and drops
``FOR UPDATE`` (SQLite serialises writers with ``BEGIN IMMEDIATE``).

URLs: ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (as in
SQLAlchemy; ``sqlite:///:memory:`` for tests) and
``postgresql://user@host:port/db[?schema=name]`` — ``schema`` selects a
PostgreSQL schema (created if needed), so test runs and tenants don't collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosqlite

from cloud.errors import ConfigurationError

Row = Any  # sqlite3.Row or asyncpg.Record: both index by column name

log = logging.getLogger("doorstep.cloud")

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class Transaction(Protocol):
    """The statements one transaction can run."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


T = TypeVar("T")
Body = Callable[[Transaction], Awaitable[T]]


class Database(Protocol):
    """A connection (pool) running transaction bodies; ``dialect`` picks DDL tokens.

    ``await db.run(body)`` runs ``body(tx)`` in one transaction and returns its
    result; if ``body`` raises, nothing it wrote is kept and the exception
    propagates. A body must only await its ``tx`` (on SQLite it runs on the
    database thread, where nothing else can be awaited).
    """

    dialect: str

    async def run(self, body: Body[T]) -> T: ...

    async def close(self) -> None: ...

    async def checkpoint(self) -> None: ...


# --- SQLite ---------------------------------------------------------------------------


class _SqliteTransaction:
    """Statements on the raw ``sqlite3`` connection, called on aiosqlite's thread.

    The methods are coroutines so that one body serves both backends, but they
    never suspend: :func:`_drive` runs a body to completion in one step.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return self._conn.execute(_to_sqlite(sql), args).fetchone()

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._conn.execute(_to_sqlite(sql), args).fetchall()

    async def execute(self, sql: str, *args: Any) -> None:
        self._conn.execute(_to_sqlite(sql), args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._conn.executemany(_to_sqlite(sql), rows)


class BodySuspended(RuntimeError):
    """A SQLite transaction body awaited something other than its transaction."""


def _drive(body: Body[T], tx: Transaction) -> T:
    coroutine = body(tx)
    try:
        coroutine.send(None)  # type: ignore[attr-defined]
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    coroutine.close()  # type: ignore[attr-defined]
    raise BodySuspended("a SQLite transaction body may only await its transaction")


_SQLITE_CACHE: dict[str, str] = {}


def _to_sqlite(sql: str) -> str:
    converted = _SQLITE_CACHE.get(sql)
    if converted is None:
        converted = _PLACEHOLDER.sub(r"?\1", sql).replace(" FOR UPDATE", "")
        _SQLITE_CACHE[sql] = converted
    return converted


_BATCH_LIMIT = 64


class SqliteDatabase:
    """One aiosqlite connection in WAL mode, with group commit.

    SQLite has a single writer, so bodies are queued and run in batches on
    aiosqlite's connection thread: one ``BEGIN IMMEDIATE`` … ``COMMIT`` per
    batch, each body inside its own ``SAVEPOINT`` so that a body that raises
    is rolled back alone. A body's result is handed back only after the
    batch's COMMIT, so nothing is answered that is not on disk; if the COMMIT
    fails, every body of the batch fails with it. One thread hop per batch
    instead of one per statement is what lets one process answer thousands of
    bind/starts per second.

    ``BEGIN IMMEDIATE`` with ``busy_timeout`` keeps several server processes on
    one file correct. Automatic WAL checkpoints are off: :meth:`checkpoint`
    runs a PASSIVE checkpoint from the maintenance task on a second
    connection, so it never waits in the request queue.
    """

    dialect = "sqlite"

    def __init__(
        self, conn: aiosqlite.Connection, checkpointer: aiosqlite.Connection | None = None
    ) -> None:
        self._conn = conn
        self._checkpointer = checkpointer
        self._queue: list[tuple[Body[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0  # for benchmarks: how many COMMITs served how many bodies
        self.bodies = 0

    @classmethod
    async def open(cls, path: str) -> SqliteDatabase:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = await cls._connect(path)
        checkpointer = None if path == ":memory:" else await cls._connect(path)
        return cls(conn, checkpointer)

    @staticmethod
    async def _connect(path: str) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",  # WAL: durable across process crashes
            "PRAGMA busy_timeout=10000",
            "PRAGMA foreign_keys=ON",
            "PRAGMA wal_autocheckpoint=0",
            "PRAGMA cache_size=-65536",
        ):
            await conn.execute(pragma)
        return conn

    async def run(self, body: Body[T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((body, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:_BATCH_LIMIT], self._queue[_BATCH_LIMIT:]
                batch = [item for item in batch if not item[1].done()]  # callers gone
                if not batch:
                    continue
                try:
                    bodies = [body for body, _ in batch]
                    outcomes = await _in_connection_thread(self._conn, _run_batch, bodies)
                except BaseException as exc:  # the COMMIT (or BEGIN) failed: all of them did
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                self.batches += 1
                self.bodies += len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; the work is committed anyway
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None
            if self._queue:  # cancelled mid-way: fail the rest rather than hang them
                for _, future in self._queue:
                    if not future.done():
                        future.set_exception(ConnectionError("database closed"))
                self._queue = []

    async def checkpoint(self) -> None:
        await (self._checkpointer or self._conn).execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def close(self) -> None:
        if self.batches:
            log.info(
                "SQLite group commit: %d transaction bodies in %d batches (%.1f per COMMIT)",
                self.bodies,
                self.batches,
                self.bodies / self.batches,
            )
        if self._flusher is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._flusher)
        if self._checkpointer is not None:
            await self._checkpointer.close()
        await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        await self._conn.close()


def _run_batch(conn: sqlite3.Connection, bodies: list[Body[Any]]) -> list[tuple[bool, Any]]:
    """On the connection thread: every one of ``bodies`` in one transaction."""
    tx = _SqliteTransaction(conn)
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for body in bodies:
            conn.execute("SAVEPOINT body")
            try:
                outcomes.append((True, _drive(body, tx)))
            except Exception as exc:
                conn.execute("ROLLBACK TO body")
                outcomes.append((False, exc))
            conn.execute("RELEASE body")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


async def _in_connection_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on aiosqlite's connection thread.

    aiosqlite exposes only statement-level calls; a whole batch needs its
    (long-standing, if underscored) ``_execute`` hook, the one its own methods
    use. ``tests/test_cloud_store.py`` pins this down for the installed version.
    """
    return await conn._execute(lambda: fn(conn._conn, *args))  # type: ignore[no-any-return]


# --- PostgreSQL -----------------------------------------------------------------------


class _PostgresTransaction:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return await self._conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(sql, *args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)


class PostgresDatabase:
    """An asyncpg pool; each body runs in a READ COMMITTED transaction with row locks."""

    dialect = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, schema: str | None, max_size: int = 10) -> PostgresDatabase:
        import asyncpg

        settings: dict[str, str] = {}
        if schema is not None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            except asyncpg.UniqueViolationError:
                pass  # another process created it at the same moment
            finally:
                await conn.close()
            settings["search_path"] = schema
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, server_settings=settings
        )
        return cls(pool)

    async def run(self, body: Body[T]) -> T:
        async with self._pool.acquire() as conn, conn.transaction():
            return await body(_PostgresTransaction(conn))

    async def checkpoint(self) -> None:
        """PostgreSQL checkpoints itself."""

    async def close(self) -> None:
        await self._pool.close()


# --- URLs -----------------------------------------------------------------------------


def split_postgres_url(url: str) -> tuple[str, str | None]:
    """``(dsn without our schema= parameter, schema or None)``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for key, value in query if key == "schema"), None)
    rest = [(key, value) for key, value in query if key != "schema"]
    if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            "schema= must be a lowercase SQL identifier", code="bad_database_url"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def sqlite_path(url: str) -> str:
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigurationError(
            "SQLite URLs look like sqlite:///path/to/cloud.db", code="bad_database_url"
        )
    # As in SQLAlchemy: sqlite:///relative.db, sqlite:////absolute/path.db
    return url[len(prefix) :]


async def open_database(url: str) -> Database:
    """Open the database named by ``url`` (see the module docstring)."""
    if url.startswith("sqlite:"):
        return await SqliteDatabase.open(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        dsn, schema = split_postgres_url(url)
        return await PostgresDatabase.open(dsn, schema)
    raise ConfigurationError(
        f"unsupported database URL (use sqlite:///PATH or postgresql://…): {url.split('@')[-1]}",
        code="bad_database_url",
    )
