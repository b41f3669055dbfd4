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
import errno
import logging
import os
import re
import sqlite3
import threading
import time
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
    """The statements one transaction can run (``dialect`` as in :class:`Database`)."""

    dialect: str

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
    propagates. A body must only await its ``tx`` (on SQLite it runs in one
    step, where nothing else can be awaited). ``heavy=True`` marks a body that
    may take long (bulk import, pruning): SQLite runs it off the event loop.
    """

    dialect: str

    async def run(self, body: Body[T], *, heavy: bool = False) -> T: ...

    async def close(self) -> None: ...

    async def checkpoint(self) -> None: ...


# --- SQLite ---------------------------------------------------------------------------


class _SqliteTransaction:
    """Statements on the raw ``sqlite3`` connection, inside a batch's transaction.

    The methods are coroutines so that one body serves both backends, but they
    never suspend: :func:`_drive` runs a body to completion in one step.
    """

    __slots__ = ("_cursor",)
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        # One cursor for the batch: Connection.execute would make one per statement.
        self._cursor = conn.cursor()

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        return self._cursor.execute(_to_sqlite(sql), args).fetchone()

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return self._cursor.execute(_to_sqlite(sql), args).fetchall()

    async def execute(self, sql: str, *args: Any) -> None:
        self._cursor.execute(_to_sqlite(sql), args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._cursor.executemany(_to_sqlite(sql), rows)

    def close(self) -> None:
        """Finish the batch's statement, read to the end or not: none may outlive it."""
        self._cursor.close()


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


_BATCH_LIMIT = 16  # bodies per COMMIT; also bounds how long one batch holds the loop
_BUSY_TIMEOUT_MS = 10000
_CHECKPOINT_NICE = 19  # the lowest priority: see _lower_thread_priority
#: Background checkpoint passes before the last frames are copied between batches
#: (see SqliteDatabase.checkpoint); a pass this short left only a few frames behind it.
_CHECKPOINT_PASSES = 4
_CHECKPOINT_SHORT_PASS_S = 0.005
#: Checkpoints in a row whose passes never got short leave the last frames for
#: the next one (copying them held the writer 5–15 ms); after this many the last
#: frames are copied anyway, so that the WAL still starts over.
_CHECKPOINT_MAX_DEFERRED = 4
#: When the WAL starts over, a file larger than this is cut back to it (it
#: otherwise stays as large as the largest backlog ever was). Well above what
#: one checkpoint interval writes at full load (~120 MB a second here), because
#: cutting the file and growing it again held the next COMMIT for 10–20 ms.
_WAL_SIZE_LIMIT = 256 * 1024 * 1024


class SqliteDatabase:
    """One aiosqlite connection in WAL mode, with group commit.

    SQLite has a single writer, so bodies are queued and run in batches: one
    ``BEGIN IMMEDIATE`` … ``COMMIT`` per batch, each body inside its own
    ``SAVEPOINT`` so that a body that raises is rolled back alone. A body's
    result is handed back only after the batch's COMMIT, so nothing is
    answered that is not on disk; if the COMMIT fails, every body of the
    batch fails with it.

    A batch of ordinary bodies runs on the event loop's thread, statements
    and COMMIT alike: once ``BEGIN IMMEDIATE`` holds the write lock nothing in
    the batch waits for a lock, and in WAL mode with ``synchronous=NORMAL`` a
    COMMIT appends to the WAL without an fsync. Handing batches to a thread
    instead cost ~20 % more CPU per request in GIL hand-offs and added up to
    a switch interval (5 ms) of latency per hop (``bench/cloud_load.py``).
    What can wait runs on aiosqlite's connection thread: a ``BEGIN
    IMMEDIATE`` that finds another process writing (the loop's attempt uses
    ``busy_timeout=0``, the thread's waits up to 10 s), and ``heavy`` bodies
    (bulk import, pruning, migrations), each alone in its batch. Batches are
    capped at ``_BATCH_LIMIT`` bodies so one never holds the loop for long.

    ``BEGIN IMMEDIATE`` with a busy timeout keeps several server processes on
    one file correct. Automatic WAL checkpoints are off: the maintenance task
    calls :meth:`checkpoint`, which does the copying on a second connection's
    thread, so it never waits in the request queue.
    """

    dialect = "sqlite"

    def __init__(
        self,
        conn: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection | None = None,
        sync_file: _SyncFile | None = None,
    ) -> None:
        self._conn = conn
        self._checkpointer = checkpointer
        #: our own descriptor of the database file, for the sync before the writer's copy
        self._sync_file = sync_file
        self._sync_failing = False  # the last such sync failed (see checkpoint)
        self._queue: list[tuple[Body[Any], asyncio.Future[Any], bool]] = []
        #: ``fn(connection)`` to run on the loop's thread between two batches
        self._between: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._checkpointed_at = -1  # self.batches when the last finished checkpoint began
        self._checkpoints_deferred = 0  # in a row, see _CHECKPOINT_MAX_DEFERRED
        self._closed = False
        self.batches = 0  # for benchmarks: how many COMMITs served how many bodies
        self.bodies = 0

    @classmethod
    async def open(cls, path: str, *, durable: bool = False) -> SqliteDatabase:
        """Open (creating it and its directory if need be) the database file at ``path``.

        A file that is not a SQLite database, or one that cannot be opened,
        raises :class:`ConfigurationError` (``database_unavailable``) with
        nothing left open. ``durable``: every COMMIT is on disk before it
        returns (``synchronous=FULL``: the WAL is fsynced), so a commit also
        survives a power loss; for bulk writes whose outcome is published
        elsewhere (the factory's record files), not for the server.
        """
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot create the directory of the database {path}: {exc.strerror}",
                    code="database_unavailable",
                ) from None
        # The writer never waits on the loop's thread: see _run_light.
        conn = await cls._connect(path, busy_timeout_ms=0)
        try:
            if durable:
                await conn.execute("PRAGMA synchronous=FULL")
            checkpointer = None if path == ":memory:" else await cls._connect(path)
            if checkpointer is not None:
                await _in_connection_thread(checkpointer, _lower_thread_priority)
        except BaseException:
            await conn.close()
            raise
        return cls(conn, checkpointer, None if checkpointer is None else _SyncFile.take(path))

    @staticmethod
    async def _connect(path: str, busy_timeout_ms: int = _BUSY_TIMEOUT_MS) -> aiosqlite.Connection:
        # Used from the loop's thread and aiosqlite's, never at the same time.
        conn = aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
        try:
            await conn
        except sqlite3.Error as exc:
            await _thread_ended(conn)
            raise _unusable(path, exc) from None
        try:
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",  # WAL: durable across process crashes
                f"PRAGMA busy_timeout={busy_timeout_ms}",
                "PRAGMA foreign_keys=ON",
                "PRAGMA wal_autocheckpoint=0",
                f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}",
                "PRAGMA cache_size=-65536",
            ):
                await conn.execute(pragma)
        except BaseException as exc:
            # An open connection's thread would keep the process from ever exiting.
            await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise _unusable(path, exc) from None
            raise
        return conn

    async def run(self, body: Body[T], *, heavy: bool = False) -> T:
        if self._closed:
            raise ConnectionError("database closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((body, future, heavy))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    def _next_batch(self) -> list[tuple[Body[Any], asyncio.Future[Any], bool]]:
        """Up to ``_BATCH_LIMIT`` light bodies in order, or one heavy body alone."""
        self._queue = [item for item in self._queue if not item[1].done()]  # callers gone
        if self._queue and self._queue[0][2]:
            batch, self._queue = self._queue[:1], self._queue[1:]
            return batch
        size = 0
        while size < min(len(self._queue), _BATCH_LIMIT) and not self._queue[size][2]:
            size += 1
        batch, self._queue = self._queue[:size], self._queue[size:]
        return batch

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on aiosqlite's thread.

        If the caller is cancelled meanwhile, this still waits for ``fn`` to
        finish before passing the cancellation on, so that the connection is
        never used from two threads at once.
        """
        task = asyncio.ensure_future(_in_connection_thread(self._conn, fn, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)
            raise

    async def _run_light(self, bodies: list[Body[Any]]) -> list[tuple[bool, Any]]:
        conn: sqlite3.Connection = self._conn._conn  # type: ignore[attr-defined]
        if conn.in_transaction:  # never expected: do not build on a stray transaction
            conn.execute("ROLLBACK")
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout is 0 on this connection
        except sqlite3.OperationalError as exc:
            # Extended codes (e.g. SQLITE_BUSY_RECOVERY) carry the primary code in the low byte.
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            # Another process is writing: wait for it off the event loop.
            try:
                await self._on_thread(_begin_waiting)
            except BaseException:
                if conn.in_transaction:  # cancelled after the BEGIN succeeded
                    conn.execute("ROLLBACK")
                raise
        return _run_and_commit(conn, bodies)

    async def _between_batches(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` on the loop's thread, outside any transaction, between batches."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._between.append((fn, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

    def _run_between(self) -> None:
        conn: sqlite3.Connection = self._conn._conn  # type: ignore[attr-defined]
        ops, self._between = self._between, []
        for fn, future in ops:
            if future.done():
                continue
            try:
                future.set_result(fn(conn))
            except Exception as exc:
                future.set_exception(exc)

    async def _flush(self) -> None:
        try:
            while self._queue or self._between:
                await asyncio.sleep(0)  # let requests that are already readable join
                self._run_between()
                batch = self._next_batch()
                if not batch:
                    continue
                bodies = [body for body, _, _ in batch]
                try:
                    if batch[0][2]:
                        outcomes = await self._on_thread(_run_batch, bodies)
                    else:
                        outcomes = await self._run_light(bodies)
                except BaseException as exc:  # the COMMIT (or BEGIN) failed: all of them did
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                self.batches += 1
                self.bodies += len(batch)
                for (_, future, _), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; the work is committed anyway
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None
            if self._queue or self._between:  # cancelled mid-way: fail the rest, don't hang them
                for future in [f for _, f, _ in self._queue] + [f for _, f in self._between]:
                    if not future.done():
                        future.set_exception(ConnectionError("database closed"))
                self._queue, self._between = [], []

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file, so that the next write starts the WAL over.

        SQLite starts the WAL over only when a write begins with every frame
        already copied. A PASSIVE checkpoint copies the frames that were there
        when it began, and under steady load more are always appended while it
        runs, so checkpoints of that kind alone let the WAL grow without bound
        (1.6 GB after 16 s of full load in ``bench/cloud_load.py``), and every
        request got slower as it grew. So: passes on the checkpointer's thread
        (concurrent with requests, at low priority) until one is short, which
        leaves only the few frames appended during it; those are copied on the
        writer's connection between two batches, where nothing can be appended
        meanwhile (that copy, with its two fsyncs, is the writer's pause; the
        files are synced on the checkpointer's thread just before). If
        no pass got short, that copy would be long: it is left for the next
        call, at most ``_CHECKPOINT_MAX_DEFERRED`` times in a row. Nothing is
        done if nothing was written since the last finished checkpoint.
        """
        if self._checkpointer is None or self._closed:  # an in-memory database has no WAL
            return
        written = self.batches
        if written == self._checkpointed_at:
            return
        short = False
        for _ in range(_CHECKPOINT_PASSES):
            started = time.monotonic()
            await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if time.monotonic() - started < _CHECKPOINT_SHORT_PASS_S:
                short = True
                break
        if not short and self._checkpoints_deferred < _CHECKPOINT_MAX_DEFERRED:
            self._checkpoints_deferred += 1
            return
        # What the passes wrote is synced here, not in the writer's pause; what was
        # appended meanwhile is copied by one more pass.
        if self._sync_file is not None:
            try:
                await _in_connection_thread(self._checkpointer, self._sync_file.sync)
            except OSError as exc:
                # Reported on our own descriptors only: SQLite's report it again to SQLite,
                # whose copy below syncs as it always did. Said once while it lasts.
                if not self._sync_failing:
                    log.warning("no sync before a checkpoint: %s", exc.strerror or exc)
                self._sync_failing = True
            else:
                if self._sync_failing:
                    log.warning("syncs before checkpoints work again")
                self._sync_failing = False
        await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        if not self._closed:
            # busy_timeout is 0 here: if another process is checkpointing, this just returns.
            await self._between_batches(_checkpoint_passive)
            self._checkpoints_deferred = 0
            self._checkpointed_at = written

    async def close(self) -> None:
        self._closed = True
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
        try:
            if self._checkpointer is not None:
                # On the connection that waits for other processes (busy_timeout 10 s).
                # A file this process may only read cannot be checkpointed: that is
                # for a writer to do, and no reason to leave the connections open.
                try:
                    await self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.info("no checkpoint on close: %s", exc)
                finally:
                    await self._checkpointer.close()
        finally:
            await self._conn.close()
            if self._sync_file is not None:
                self._sync_file.release()
                self._sync_file = None


async def _thread_ended(conn: aiosqlite.Connection) -> None:
    """Wait (at most 5 s) for the thread of a connection that failed to open to end.

    aiosqlite stops it without waiting; if the loop closed first (the command
    ended at once), the thread's last reply raised "Event loop is closed" there,
    printed as two tracebacks after the one-line error.
    """
    # aiosqlite 0.22 keeps its thread in ``_thread``; before, the connection was the thread.
    thread = conn if isinstance(conn, threading.Thread) else getattr(conn, "_thread", None)
    for _ in range(5000):
        if thread is None or not thread.is_alive():
            return
        await asyncio.sleep(0.001)


def _unusable(path: str, exc: sqlite3.Error) -> ConfigurationError:
    """A file that is no SQLite database (or cannot be opened as one), in one line."""
    return ConfigurationError(
        f"cannot use {path} as the cloud's SQLite database: {exc}", code="database_unavailable"
    )


def _lower_thread_priority(_conn: sqlite3.Connection) -> None:
    """On the checkpointer's thread: yield the CPU to the event loop's thread.

    A checkpoint copies every page written since the last one into the
    database file, ~200 ms of CPU after 10 s of full load. At normal priority
    it took that time from the loop whenever the cores were busy, and every
    request in flight waited (p99 40–70 ms at half the peak rate in
    ``bench/cloud_load.py``). Linux schedules threads by their own nice value;
    elsewhere, or if refused, the checkpoint just runs at normal priority.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _CHECKPOINT_NICE)


class _SyncFile:
    """Our own read-only descriptor of a database file, to ``fdatasync`` it and its WAL.

    The writer's final checkpoint copy syncs both files, and the database file
    then held every page the background passes had copied (they sync it only
    when they reach the end of the WAL, which under load they never do):
    megabytes. Synced on the checkpointer's thread first, the writer's pause
    went from p90 8 ms, at most 10–12 ms, to p90 2.1–2.8 ms, at most 3.9 ms
    (``bench/cloud_load.py``).

    Why a descriptor of our own, kept open: a write error is reported once per
    open file, so a sync through one of SQLite's would take the report SQLite
    needs (it then marks the WAL copied over pages that never reached the
    disk); ours gets its own report and SQLite still gets its. And closing any
    descriptor of the database file drops every POSIX lock the process holds on
    it, SQLite's too (another process may then take the database for unused
    and remove its WAL): so there is one per file and process, shared, closed
    when the last :class:`SqliteDatabase` on the file closes, after its
    connections. The WAL holds no such locks: it is opened for each sync.
    """

    _open: dict[tuple[int, int], _SyncFile] = {}

    def __init__(self, key: tuple[int, int], fd: int, wal: str) -> None:
        self.key, self.fd, self.wal, self.users = key, fd, wal, 1

    @classmethod
    def take(cls, path: str) -> _SyncFile | None:
        """The file's shared descriptor (opened if this is the first user), or None."""
        try:
            info = os.stat(path)
            shared = cls._open.get((info.st_dev, info.st_ino))
            if shared is not None:
                shared.users += 1
                return shared
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None  # the writer's copy syncs everything, as without this
        opened = os.fstat(fd)
        shared = cls._open[(opened.st_dev, opened.st_ino)] = _SyncFile(
            (opened.st_dev, opened.st_ino), fd, os.path.realpath(path) + "-wal"
        )
        return shared

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            del self._open[self.key]
            os.close(self.fd)

    def sync(self, _conn: sqlite3.Connection) -> None:
        """On the checkpointer's thread: the database file, then its WAL. Raises OSError."""
        _datasync(self.fd)
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            _datasync(fd)
        finally:
            os.close(fd)


def _datasync(fd: int) -> None:
    try:
        getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # a file that cannot be synced
            raise


def _checkpoint_passive(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _begin_waiting(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting up to ``_BUSY_TIMEOUT_MS`` for another writer."""
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _run_and_commit(conn: sqlite3.Connection, bodies: list[Body[Any]]) -> list[tuple[bool, Any]]:
    """In the open transaction: each body in its own SAVEPOINT, then COMMIT (or ROLLBACK)."""
    tx = _SqliteTransaction(conn)
    outcomes: list[tuple[bool, Any]] = []
    try:
        try:
            for body in bodies:
                conn.execute("SAVEPOINT body")
                try:
                    outcomes.append((True, _drive(body, tx)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO body")
                    outcomes.append((False, exc))
                conn.execute("RELEASE body")
        finally:
            tx.close()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _run_batch(conn: sqlite3.Connection, bodies: list[Body[Any]]) -> list[tuple[bool, Any]]:
    """On the connection thread: every one of ``bodies`` in one transaction."""
    _begin_waiting(conn)
    return _run_and_commit(conn, bodies)


async def _in_connection_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(sqlite3_connection, *args)`` on aiosqlite's connection thread.

    aiosqlite exposes only statement-level calls; a whole batch needs its
    (long-standing, if underscored) ``_execute`` hook, the one its own methods
    use. ``tests/test_cloud_store.py`` pins this down for the installed version.
    """
    return await conn._execute(lambda: fn(conn._conn, *args))  # type: ignore[no-any-return]


# --- PostgreSQL -----------------------------------------------------------------------


class _PostgresTransaction:
    dialect = "postgresql"

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
    async def open(
        cls, dsn: str, schema: str | None, max_size: int = 10, *, create: bool = True
    ) -> PostgresDatabase:
        """A pool on ``dsn`` (``schema`` created if ``create``, else it must exist).

        A server that cannot be reached, a database or role that does not exist, a
        refused login or a bad connection option is a :class:`ConfigurationError`
        (``database_unavailable``) naming the database without credentials.
        """
        import asyncpg

        settings: dict[str, str] = {}
        try:
            if schema is not None:
                conn = await asyncpg.connect(dsn)
                try:
                    if create:
                        try:
                            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                        except asyncpg.UniqueViolationError:
                            pass  # another process created it at the same moment
                    elif not await conn.fetchval(
                        "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema
                    ):
                        raise ConfigurationError(
                            f"no schema {schema} in {where_postgres(dsn)} "
                            "(create it with `doorstep cloud migrate`)",
                            code="database_unavailable",
                        )
                finally:
                    await conn.close()
                settings["search_path"] = schema
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_size, server_settings=settings
            )
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            raise ConfigurationError(
                f"cannot use the PostgreSQL database {where_postgres(dsn)}: {first_line(exc)}",
                code="database_unavailable",
            ) from None
        return cls(pool)

    async def run(self, body: Body[T], *, heavy: bool = False) -> T:
        async with self._pool.acquire() as conn, conn.transaction():
            return await body(_PostgresTransaction(conn))

    async def checkpoint(self) -> None:
        """PostgreSQL checkpoints itself."""

    async def close(self) -> None:
        await self._pool.close()


def where_postgres(dsn: str) -> str:
    """``host:port/database`` of a PostgreSQL URL: never its user or password."""
    parts = urlsplit(dsn)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    # libpq's ?host=/run/postgresql (a Unix socket directory) names the host too
    host = parts.hostname or dict(parse_qsl(parts.query)).get("host") or "localhost"
    return f"{host}{port}{parts.path or '/'}"


def first_line(exc: BaseException) -> str:
    """An error's first line, at most 200 characters (PostgreSQL's DETAIL and HINT lines
    may quote row contents)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


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


async def open_database(url: str, *, durable: bool = False, create: bool = True) -> Database:
    """Open the database named by ``url`` (see the module docstring).

    ``durable``: a commit survives a power loss once it returns (PostgreSQL's
    default; on SQLite see :meth:`SqliteDatabase.open`). ``create``: a
    PostgreSQL ``schema=`` that does not exist yet is created (else refused).
    """
    if url.startswith("sqlite:"):
        return await SqliteDatabase.open(sqlite_path(url), durable=durable)
    if url.startswith(("postgresql://", "postgres://")):
        dsn, schema = split_postgres_url(url)
        return await PostgresDatabase.open(dsn, schema, create=create)
    raise ConfigurationError(
        f"unsupported database URL (use sqlite:///PATH or postgresql://…): {url.split('@')[-1]}",
        code="bad_database_url",
    )
