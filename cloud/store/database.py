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
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosqlite

from cloud.errors import ConfigurationError

Row = Any  # sqlite3.Row or asyncpg.Record: both index by column name

_PLACEHOLDER = re.compile(r"\$(\d+)")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class Transaction(Protocol):
    """The statements one transaction can run."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class Database(Protocol):
    """A connection (pool) with transactions; ``dialect`` picks DDL tokens."""

    dialect: str

    def transaction(self) -> AbstractTransactionContext: ...

    async def close(self) -> None: ...

    async def checkpoint(self) -> None: ...


class AbstractTransactionContext(Protocol):
    async def __aenter__(self) -> Transaction: ...

    async def __aexit__(self, *exc: object) -> bool | None: ...


# --- SQLite ---------------------------------------------------------------------------


class _SqliteTransaction:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self._conn.execute_fetchall(_to_sqlite(sql), args)
        return next(iter(rows), None)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.execute_fetchall(_to_sqlite(sql), args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(_to_sqlite(sql), args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(_to_sqlite(sql), rows)


_SQLITE_CACHE: dict[str, str] = {}


def _to_sqlite(sql: str) -> str:
    converted = _SQLITE_CACHE.get(sql)
    if converted is None:
        converted = _PLACEHOLDER.sub(r"?\1", sql).replace(" FOR UPDATE", "")
        _SQLITE_CACHE[sql] = converted
    return converted


class SqliteDatabase:
    """One aiosqlite connection in WAL mode; transactions are serialised by a lock.

    SQLite has a single writer anyway; one connection per process with
    ``BEGIN IMMEDIATE`` also keeps several server processes on one file correct
    (``busy_timeout`` makes them wait instead of failing). Automatic WAL
    checkpoints are off: :meth:`checkpoint` runs from the maintenance task.
    """

    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> SqliteDatabase:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
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
        return cls(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTransaction(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    def transaction(self) -> AbstractTransactionContext:
        return self._transaction()

    async def checkpoint(self) -> None:
        async with self._lock:
            await self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def close(self) -> None:
        async with self._lock:
            await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await self._conn.close()


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
    """An asyncpg pool; each transaction is READ COMMITTED with row locks (FOR UPDATE)."""

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

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PostgresTransaction(conn)

    def transaction(self) -> AbstractTransactionContext:
        return self._transaction()

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
