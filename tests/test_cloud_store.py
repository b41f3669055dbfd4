"""The storage layer's transaction semantics, on SQLite (group commit) and PostgreSQL.

``Registry.run(body)`` promises: everything a body wrote commits together or
not at all; a body that raises leaves nothing behind and does not disturb the
bodies it shared a SQLite batch (one COMMIT) with; a failed COMMIT fails every
body of its batch; a result is only handed back once it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import httpx
import pytest

from cloud.app import create_app
from cloud.keys import KeyEncryptionKey
from cloud.settings import Settings
from cloud.store.database import (
    _BATCH_LIMIT,
    _CHECKPOINT_MAX_DEFERRED,
    BodySuspended,
    SqliteDatabase,
    _in_connection_thread,
)
from cloud.store.registry import Registry, RegistryTransaction, open_registry
from cloud_helpers import (
    PG_DSN,
    PG_SKIP_REASON,
    TEST_KEK,
    CountingEntropy,
    add_user,
    drop_pg_schema,
    in_process_cloud,
    new_factory_record,
    pg_url,
    register,
)


class Boom(Exception):
    pass


@contextlib.asynccontextmanager
async def backend_registry(
    backend: str, tmp_path: Path, *, migrate: bool = True
) -> AsyncIterator[Registry]:
    """A registry on a fresh SQLite file or PostgreSQL schema, closed (and dropped) after."""
    if backend == "postgresql" and not PG_DSN:
        pytest.skip(PG_SKIP_REASON)
    url = f"sqlite:///{tmp_path}/c.db" if backend == "sqlite" else pg_url()
    registry = await open_registry(url, migrate=migrate, create=True)
    try:
        yield registry
    finally:
        await registry.close()
        if backend == "postgresql":
            await drop_pg_schema(url)


async def _user_names(registry: Registry) -> list[str]:
    names = await registry.run(lambda tx: tx.user_names())
    return sorted(names.values())


async def _add(registry: Registry, name: str, *, fail: bool = False) -> int:
    async def body(tx: RegistryTransaction) -> int:
        user_id = await tx.add_user(name, name.encode().ljust(32, b"\0"), 0)
        if fail:
            raise Boom(name)
        return user_id

    return await registry.run(body)


async def test_a_failing_body_is_rolled_back_alone_within_its_batch(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:
        database = registry.database
        assert isinstance(database, SqliteDatabase)
        before = database.batches
        results = await asyncio.gather(
            _add(registry, "ann"),
            _add(registry, "bob", fail=True),
            _add(registry, "cy"),
            return_exceptions=True,
        )
        # All three shared one COMMIT, and only bob's body was undone.
        assert database.batches == before + 1
        assert isinstance(results[1], Boom) and str(results[1]) == "bob"
        assert isinstance(results[0], int) and isinstance(results[2], int)
        assert await _user_names(registry) == ["ann", "cy"]
    finally:
        await registry.close()


async def test_a_failed_commit_fails_every_body_of_the_batch(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:

        async def dangling(tx: RegistryTransaction) -> None:
            # A foreign key checked only at COMMIT: the whole batch's COMMIT fails.
            await tx._tx.execute("PRAGMA defer_foreign_keys = ON")
            await tx._tx.execute(
                "INSERT INTO identities (identifier, dev_id, epoch, k_dev_wrapped, state, "
                "attempt_id, issued_at) VALUES ($1, $2, 1, $3, 'pending', $4, 0)",
                b"i" * 16,
                b"no such device!!",
                b"w",
                b"a" * 16,
            )

        results = await asyncio.gather(
            _add(registry, "ann"),
            registry.run(dangling),
            _add(registry, "cy"),
            return_exceptions=True,
        )
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
        assert await _user_names(registry) == []
        # The connection is usable again: the next batch commits.
        await _add(registry, "dee")
        assert await _user_names(registry) == ["dee"]
    finally:
        await registry.close()


async def test_a_body_that_awaits_anything_else_is_refused_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:

        async def wanders(tx: RegistryTransaction) -> None:
            await tx.add_user("eve", b"e" * 32, 0)
            await asyncio.sleep(0)

        with pytest.raises(BodySuspended, match="may only await its transaction"):
            await registry.run(wanders)
        assert await _user_names(registry) == []
    finally:
        await registry.close()


async def test_many_concurrent_bodies_all_commit_in_few_batches(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:
        database = registry.database
        assert isinstance(database, SqliteDatabase)
        before = database.batches
        ids = await asyncio.gather(*(_add(registry, f"u{i:03d}") for i in range(200)))
        assert len(set(ids)) == 200
        assert len(await _user_names(registry)) == 200
        assert database.batches - before <= 200 // _BATCH_LIMIT + 2  # batched, not one COMMIT each
    finally:
        await registry.close()


async def test_results_are_returned_only_after_they_are_on_disk(tmp_path: Path) -> None:
    """The moment a body's result arrives, another connection already reads its write."""
    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")

    async def add_then_look(name: str) -> None:
        await _add(registry, name)
        with contextlib.closing(sqlite3.connect(path)) as other:
            row = other.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
        assert row is not None, f"{name} was answered before it was committed"

    try:
        await asyncio.gather(*(add_then_look(f"w{i}") for i in range(40)))
    finally:
        await registry.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a POSIX call")
async def test_checkpoints_run_on_a_thread_that_yields_the_cpu_to_requests(tmp_path: Path) -> None:
    """A checkpoint after 10 s of load is ~200 ms of CPU; it must not take it from the loop."""
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:
        database = registry.database
        assert isinstance(database, SqliteDatabase)

        def nice(_conn: sqlite3.Connection) -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        assert database._checkpointer is not None
        assert await _in_connection_thread(database._checkpointer, nice) == 19
        # The writer's thread (waits for other processes, heavy bodies) keeps its priority.
        assert await _in_connection_thread(database._conn, nice) == os.getpriority(
            os.PRIO_PROCESS, 0
        )
        await _add(registry, "ann")
        await database.checkpoint()  # still works at that priority
        assert await _user_names(registry) == ["ann"]
    finally:
        await registry.close()


def _wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number: SQLite adds one each time the WAL starts over."""
    return int.from_bytes(path.with_name(path.name + "-wal").read_bytes()[12:16], "big")


async def test_checkpoints_let_the_wal_start_over_while_requests_keep_writing(
    tmp_path: Path,
) -> None:
    """Passive checkpoints alone never caught up with a busy writer: the WAL only grew."""
    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")
    database = registry.database
    assert isinstance(database, SqliteDatabase)
    writing = True
    written = 0

    async def writer(k: int) -> None:
        nonlocal written
        while writing:
            await _add(registry, f"w{k}-{written}")
            written += 1

    writers = [asyncio.create_task(writer(k)) for k in range(8)]
    try:
        while written < 500:
            await asyncio.sleep(0.01)
        restarts = _wal_restarts(path)
        # A busy host may defer the last copy: this many calls finish at least once.
        for _ in range(_CHECKPOINT_MAX_DEFERRED + 2):
            await database.checkpoint()  # the writers keep committing meanwhile
            until = written + 50
            while written < until:
                await asyncio.sleep(0.01)
        assert _wal_restarts(path) > restarts
    finally:
        writing = False
        await asyncio.gather(*writers)
        await registry.close()
    # Nothing was lost on the way.
    reopened = await open_registry(f"sqlite:///{path}")
    try:
        assert len(await _user_names(reopened)) == written
    finally:
        await reopened.close()


async def test_a_serving_app_checkpoints_and_prunes_on_its_own(tmp_path: Path) -> None:
    """The lifespan's maintenance task: WAL checkpoints every checkpoint_interval_s, pruning
    every maintenance_interval_s (here a rate window older than two windows)."""
    path = tmp_path / "m.db"
    now = 1_000_000
    settings = Settings(
        database_url=f"sqlite:///{path}", maintenance_interval_s=0.05, checkpoint_interval_s=0.01
    )
    app = create_app(settings, kek=TEST_KEK, entropy=CountingEntropy(), clock=lambda: now)

    def windows() -> list[int]:
        with contextlib.closing(sqlite3.connect(path)) as other:
            rows = other.execute("SELECT window_start FROM rate_counters ORDER BY window_start")
            return [int(row[0]) for row in rows]

    async with app.router.lifespan_context(app):
        registry = app.state.cloud["service"].registry
        old, current = now - 3 * settings.rate_window_s, now - now % settings.rate_window_s
        await registry.run(lambda tx: tx.hits(["user:1"], old))
        await registry.run(lambda tx: tx.hits(["user:1"], current))
        restarts = _wal_restarts(path)
        written = 0
        for _ in range(1000):  # at most ~10 s
            if _wal_restarts(path) > restarts and windows() == [current]:
                break
            await _add(registry, f"u{written}")
            written += 1
            await asyncio.sleep(0.01)
        assert _wal_restarts(path) > restarts
        assert windows() == [current]


async def test_a_checkpoint_whose_passes_never_get_short_defers_the_writers_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last copy (the writer's pause) waits for a short pass, but only so many times."""
    from cloud.store import database as db

    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")
    database = registry.database
    assert isinstance(database, SqliteDatabase)
    paused: list[int] = []
    monkeypatch.setattr(db, "_checkpoint_passive", lambda conn: paused.append(database.batches))
    try:
        monkeypatch.setattr(db, "_CHECKPOINT_SHORT_PASS_S", -1.0)  # no pass is ever short
        for round_ in range(db._CHECKPOINT_MAX_DEFERRED + 1):
            await _add(registry, f"u{round_}")
            await database.checkpoint()
        assert len(paused) == 1  # deferred _CHECKPOINT_MAX_DEFERRED times, then done anyway
        await database.checkpoint()
        assert len(paused) == 1  # nothing written since: nothing to do
        monkeypatch.setattr(db, "_CHECKPOINT_SHORT_PASS_S", 60.0)  # every pass is short
        await _add(registry, "v")
        await database.checkpoint()
        assert len(paused) == 2
    finally:
        await registry.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds descriptors in /proc")
async def test_the_checkpointers_thread_syncs_both_files_before_the_writers_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's last copy syncs the database file and the WAL: what the passes wrote
    must already be on disk then, synced by the checkpointer's thread, not the loop's,
    through a descriptor of our own, not SQLite's (a write error is reported once per open
    file: one reported to us must not be hidden from SQLite)."""
    from cloud.store import database as db

    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")
    database = registry.database
    assert isinstance(database, SqliteDatabase)
    loop_thread = threading.get_native_id()
    steps: list[tuple[str, str, bool]] = []
    real_fdatasync = os.fdatasync
    assert database._sync_file is not None
    sqlites = {  # SQLite's own descriptors of the two files, open since the connections
        int(fd)
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}") in (str(path), f"{path}-wal")
    } - {database._sync_file.fd}
    assert sqlites

    def fdatasync(fd: int) -> None:
        assert fd not in sqlites, fd
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        steps.append(("sync", name, threading.get_native_id() == loop_thread))
        real_fdatasync(fd)

    def copy(conn: sqlite3.Connection) -> None:
        steps.append(("copy", "", threading.get_native_id() == loop_thread))

    monkeypatch.setattr(db.os, "fdatasync", fdatasync)
    monkeypatch.setattr(db, "_checkpoint_passive", copy)
    monkeypatch.setattr(db, "_CHECKPOINT_SHORT_PASS_S", 60.0)  # every pass is short
    try:
        await _add(registry, "ann")
        await database.checkpoint()
        assert steps == [
            ("sync", "c.db", False),
            ("sync", "c.db-wal", False),
            ("copy", "", True),  # the writer's pause, between two batches
        ]
    finally:
        await registry.close()


async def test_a_sync_that_fails_leaves_the_checkpoint_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that fails a write: our descriptor got its own report of it, SQLite's get
    theirs, so the writer's copy goes on and SQLite's own syncs decide, as without ours."""
    from cloud.store import database as db

    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")
    database = registry.database
    assert isinstance(database, SqliteDatabase)
    copies: list[int] = []
    real_copy = db._checkpoint_passive
    real_fdatasync = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def copy(conn: sqlite3.Connection) -> None:
        copies.append(1)
        real_copy(conn)

    monkeypatch.setattr(db, "_checkpoint_passive", copy)
    monkeypatch.setattr(db, "_CHECKPOINT_SHORT_PASS_S", 60.0)  # every pass is short
    try:
        await _add(registry, "ann")
        monkeypatch.setattr(db.os, "fdatasync", failing)
        with caplog.at_level("WARNING", logger="doorstep.cloud"):
            await database.checkpoint()
            assert copies == [1]
            await _add(registry, "bo")
            await database.checkpoint()  # still failing: not said again
            monkeypatch.setattr(db.os, "fdatasync", real_fdatasync)  # the disk is fine again
            await _add(registry, "cy")
            await database.checkpoint()
        assert [r.getMessage() for r in caplog.records] == [
            "no sync before a checkpoint: Input/output error",
            "syncs before checkpoints work again",
        ]
        assert copies == [1, 1, 1]
        assert await _user_names(registry) == ["ann", "bo", "cy"]
    finally:
        await registry.close()


async def test_closing_one_of_two_databases_on_a_file_keeps_the_others_locks(
    tmp_path: Path,
) -> None:
    """Our descriptor of the file is shared and closed with the last user: closing it
    earlier would drop the POSIX locks of the one still open, and another process could
    then remove the WAL under it."""
    path = tmp_path / "c.db"
    first = await open_registry(f"sqlite:///{path}")
    second = await open_registry(f"sqlite:///{path}")
    try:
        for registry in (first, second):
            assert isinstance(registry.database, SqliteDatabase)
        assert first.database._sync_file is second.database._sync_file  # type: ignore[attr-defined]
        await _add(first, "ann")
        await first.close()
        await _add(second, "bo")
    except BaseException:
        await second.close()
        raise
    await _another_process_writes_and_nothing_is_lost(second, path)


async def _another_process_writes_and_nothing_is_lost(registry: Registry, path: Path) -> None:
    """Another process adds "cy" and closes the file (it must not remove the WAL under
    ``registry``, which then adds "dee" and is closed): all four users are kept."""
    try:
        await _write_from_another_process(path, "cy")
        assert path.with_name(path.name + "-wal").exists()
        await _add(registry, "dee")
    finally:
        await registry.close()
    reopened = await open_registry(f"sqlite:///{path}")
    try:
        assert sorted(await _user_names(reopened)) == ["ann", "bo", "cy", "dee"]
    finally:
        await reopened.close()


async def _write_from_another_process(path: Path, name: str) -> None:
    """A user added by another process, which then closes the file."""
    other = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        'c.execute("INSERT INTO users (name, token_hash, created_at) VALUES (?, ?, 0)", '
        "(sys.argv[2], sys.argv[2].encode()))\n"
        "c.close()\n"
    )
    done = await asyncio.create_subprocess_exec(sys.executable, "-c", other, str(path), name)
    assert await done.wait() == 0


async def test_syncing_for_a_checkpoint_keeps_the_locks_other_processes_rely_on(
    tmp_path: Path,
) -> None:
    """The sync once opened and closed the database file: closing it dropped this process's
    POSIX locks, SQLite's too. Another process that then closed the file took itself for
    its last user and removed the WAL, and what the cloud wrote after that was lost."""
    path = tmp_path / "c.db"
    registry = await open_registry(f"sqlite:///{path}")
    try:
        database = registry.database
        assert isinstance(database, SqliteDatabase)
        await _add(registry, "ann")
        await database.checkpoint()
        await _add(registry, "bo")
    except BaseException:
        await registry.close()
        raise
    await _another_process_writes_and_nothing_is_lost(registry, path)


async def test_no_statement_of_a_batch_outlives_it(tmp_path: Path) -> None:
    """A body that reads one row of many must not leave its statement open: an open
    statement holds a snapshot, and the writer's checkpoint then fails."""
    registry = await open_registry(f"sqlite:///{tmp_path}/c.db")
    try:
        for name in ("ann", "bo", "cy"):
            await _add(registry, name)

        async def first_of_many_then_fail(tx: RegistryTransaction) -> None:
            await tx._tx.fetchrow("SELECT name FROM users")
            raise Boom("after reading")

        # The kept traceback keeps the body's frame, and so its transaction, alive.
        with pytest.raises(Boom) as failed:
            await registry.run(first_of_many_then_fail)
        database = registry.database
        assert isinstance(database, SqliteDatabase)
        conn: sqlite3.Connection = database._conn._conn  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0  # not busy
        assert failed.value.args == ("after reading",)
    finally:
        await registry.close()


def test_the_aiosqlite_hook_we_rely_on_exists() -> None:
    # cloud.store.database runs whole batches through this (underscored) hook.
    assert callable(aiosqlite.Connection._execute)
    assert isinstance(aiosqlite.Connection._conn, property)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_rate_counters_count_each_bucket_in_one_statement(
    tmp_path: Path, backend: str
) -> None:
    async with backend_registry(backend, tmp_path) as registry:
        buckets = ["user:1", "dev:ab", "addr:203.0.113.7"]
        assert await registry.run(lambda tx: tx.hits(buckets, 60)) == dict.fromkeys(buckets, 1)
        await registry.run(lambda tx: tx.hits(buckets[:1], 60))
        assert await registry.run(lambda tx: tx.hits(buckets, 60)) == {
            "user:1": 3,
            "dev:ab": 2,
            "addr:203.0.113.7": 2,
        }
        # Another window starts from one again.
        assert await registry.run(lambda tx: tx.hits(["user:1"], 120)) == {"user:1": 1}


async def test_a_known_token_is_trusted_for_token_cache_s_then_asked_again() -> None:
    """A user removed from the database loses access once the cache entry expires."""
    now = [1_000_000.0]
    settings = Settings(token_cache_s=5.0)
    async with in_process_cloud("sqlite:///:memory:", settings=settings, clock=lambda: now[0]) as c:
        await register(c.registry, KeyEncryptionKey(TEST_KEK), [new_factory_record()])
        token = await add_user(c.registry, "alice")

        async def devices() -> httpx.Response:
            return await c.client.get("/v1/devices", headers={"authorization": f"Bearer {token}"})

        assert (await devices()).status_code == 200
        await c.registry.run(lambda tx: tx._tx.execute("DELETE FROM users"))
        now[0] += 4.9
        assert (await devices()).status_code == 200  # still cached
        now[0] += 0.2
        response = await devices()
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"


async def test_unknown_tokens_are_not_cached() -> None:
    async with in_process_cloud("sqlite:///:memory:") as c:
        headers = {"authorization": "Bearer not-a-token"}
        for _ in range(3):
            response = await c.client.get("/v1/devices", headers=headers)
            assert response.status_code == 401
        service = c.app.state.cloud["service"]
        assert service._principals == {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_version_3_keeps_every_replay_record_inside_its_attempt(
    backend: str, tmp_path: Path
) -> None:
    """A database written by version 2 (replays in their own table) upgrades in place."""
    async with backend_registry(backend, tmp_path, migrate=False) as registry:
        assert await registry.migrate(up_to=2) == [1, 2]
        record = new_factory_record()
        await register(registry, KeyEncryptionKey(TEST_KEK), [record])
        await add_user(registry, "alice")
        attempt_id, n_d = b"A" * 16, b"N" * 16

        async def old_rows(tx: RegistryTransaction) -> None:
            await tx._tx.execute(
                "INSERT INTO attempts (attempt_id, dev_id, principal, user_id, request_hash, th, "
                "identifier, epoch, reset_ctr, answer_wrapped, created_at, expires_at, state) "
                "VALUES ($1, $2, 'user:1', 1, $3, $3, $4, 1, 0, $3, 100, 220, 'pending')",
                attempt_id,
                record.dev_id,
                b"h" * 32,
                b"I" * 16,
            )
            await tx._tx.execute(
                "INSERT INTO replays (dev_id, n_d, attempt_id, keep_until) VALUES ($1, $2, $3, 9)",
                record.dev_id,
                n_d,
                attempt_id,
            )

        await registry.run(old_rows)
        assert await registry.migrate(up_to=3) == [3]
        assert await registry.migrate() == [4, 5, 6]
        assert await registry.migrate() == []

        async def lookups(tx: RegistryTransaction) -> tuple[object, object]:
            return await tx.replay(record.dev_id, n_d), await tx.replay(record.dev_id, b"M" * 16)

        found, other = await registry.run(lookups)
        assert found is not None and found.attempt_id == attempt_id and found.n_d == n_d
        assert other is None

        async def old_server_still_writes(tx: RegistryTransaction) -> None:
            # a version-2 server during a rolling upgrade: its table is still there
            await tx._tx.execute(
                "INSERT INTO replays (dev_id, n_d, attempt_id, keep_until) VALUES ($1, $2, $3, 9)",
                record.dev_id,
                b"O" * 16,
                b"C" * 16,
            )

        await registry.run(old_server_still_writes)

        async def same_challenge_again(tx: RegistryTransaction) -> None:
            await tx._tx.execute(
                "INSERT INTO attempts (attempt_id, dev_id, principal, user_id, request_hash, th, "
                "identifier, epoch, reset_ctr, answer_wrapped, created_at, expires_at, state, n_d) "
                "VALUES ($1, $2, 'user:1', 1, $3, $3, $4, 2, 0, $3, 100, 220, 'pending', $5)",
                b"B" * 16,
                record.dev_id,
                b"h" * 32,
                b"J" * 16,
                n_d,
            )

        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await registry.run(same_challenge_again)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_version_6_indexes_owned_devices_only_and_owner_lists_stay_whole(
    backend: str, tmp_path: Path
) -> None:
    """Unowned devices (every freshly registered one) leave the owner index."""
    async with backend_registry(backend, tmp_path, migrate=False) as registry:
        assert await registry.migrate(up_to=5) == [1, 2, 3, 4, 5]
        records = [new_factory_record() for _ in range(4)]
        await register(registry, KeyEncryptionKey(TEST_KEK), records)
        await add_user(registry, "alice")
        await add_user(registry, "bob")
        owners = {1: [records[2], records[0]], 2: [records[3]]}  # records[1]: nobody's

        async def bind(tx: RegistryTransaction) -> None:
            for owner, owned in owners.items():
                for at, record in enumerate(owned):
                    await tx._tx.execute(
                        "UPDATE devices SET owner_id = $1, bound_at = $2 WHERE dev_id = $3",
                        owner,
                        100 + at,
                        record.dev_id,
                    )

        await registry.run(bind)
        assert await registry.migrate() == [6]

        for owner, owned in owners.items():
            listed = await registry.run(lambda tx, o=owner: tx.devices_of(o))
            assert [d.dev_id for d in listed] == [r.dev_id for r in owned]

        if backend == "sqlite":
            sql = "SELECT name, sql FROM sqlite_master WHERE name LIKE 'devices_own%'"
        else:
            # This test's own schema: other schemas of the database may hold the same tables.
            sql = (
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND indexname LIKE 'devices_own%'"
            )
        ((name, definition),) = await registry.run(lambda tx: tx._tx.fetch(sql))
        assert name == "devices_owned"  # the old devices_owner is gone
        assert "WHERE" in definition and "owner_id IS NOT NULL" in definition
        if backend == "sqlite":
            plan = await registry.run(
                lambda tx: tx._tx.fetch(
                    "EXPLAIN QUERY PLAN SELECT * FROM devices WHERE owner_id = $1 "
                    "ORDER BY bound_at, dev_id",
                    1,
                )
            )
            assert any("USING INDEX devices_owned" in row[3] for row in plan)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_bulk_import_registers_every_record_with_its_own_wrapped_k_init(
    backend: str, tmp_path: Path
) -> None:
    """Batches commit in order with progress; each K_init opens for its own device only."""
    from cloud.cli import import_factory_records
    from cloud.keys import PURPOSE_K_INIT, UnwrapError

    draws: list[int] = []

    def rng(n: int) -> bytes:
        draws.append(n)
        return os.urandom(n)

    kek = KeyEncryptionKey(TEST_KEK, rng=rng)
    records = [new_factory_record() for _ in range(20)]
    done: list[int] = []
    async with backend_registry(backend, tmp_path) as registry:
        await import_factory_records(registry, kek, records, batch=7, progress=done.append)
        assert done == [7, 14, 20]
        assert draws == [7 * 12, 7 * 12, 6 * 12]  # one draw of nonces per batch
        stored = [await registry.run(lambda tx, r=r: tx.device(r.dev_id)) for r in records]
    nonces = set()
    for record, device in zip(records, stored, strict=True):
        assert device is not None and (device.mac, device.model) == (record.mac, record.model)
        assert kek.unwrap(PURPOSE_K_INIT, record.dev_id, device.k_init_wrapped) == record.k_init
        nonces.add(device.k_init_wrapped[:12])
    assert len(nonces) == len(records)
    other = records[1].dev_id
    assert stored[0] is not None
    with pytest.raises(UnwrapError):  # bound to its device: it does not open as another's
        kek.unwrap(PURPOSE_K_INIT, other, stored[0].k_init_wrapped)


def test_settings_that_would_forget_a_challenge_too_soon_are_refused() -> None:
    from cloud.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        Settings(completion_window_s=0, attempt_validity_s=86400, replay_margin_s=300)
    assert info.value.code == "bad_settings"
    assert Settings().attempt_retention_s >= Settings().attempt_validity_s + 300


@pytest.mark.parametrize(
    "field",
    [
        "maintenance_interval_s",  # the maintenance task would spin
        "checkpoint_interval_s",
        "rate_window_s",  # every bind/start would divide by zero
        "rate_per_user",
        "rate_per_device",
        "rate_per_address",
    ],
)
def test_intervals_windows_and_limits_must_be_above_zero(field: str) -> None:
    from cloud.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        Settings(**{field: 0})
    assert info.value.code == "bad_settings"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_device_count_from_a_clock_behind_joins_the_current_window(
    tmp_path: Path, backend: str
) -> None:
    """Instances whose clocks differ: the one behind neither resets nor rewinds the window."""
    async with backend_registry(backend, tmp_path) as registry:
        record = new_factory_record()
        await register(registry, KeyEncryptionKey(TEST_KEK), [record])

        async def count(window: int, dev_id: bytes = record.dev_id) -> int:
            async def body(tx: RegistryTransaction) -> int:
                device, count, replay = await tx.open_bind_start(dev_id, b"N" * 16, window)
                assert replay is None
                await tx.save_bind_start(dev_id, count, None)
                assert device is None or device.dev_id == record.dev_id
                return count.hits

            return await registry.run(body)

        assert [await count(120), await count(120)] == [1, 2]
        assert await count(60) == 3  # a clock behind: still the current window
        assert await count(120) == 4
        assert await count(180) == 1  # the next window starts over
        assert await count(180, b"\x00" * 16) == 0  # unknown: counted in rate_counters


async def test_a_closed_database_refuses_new_work(tmp_path: Path) -> None:
    registry = await open_registry(f"sqlite:///{tmp_path}/closed.db")
    await _add(registry, "before")
    await registry.close()
    with pytest.raises(ConnectionError, match="database closed"):
        await _add(registry, "after")


async def test_a_durable_registry_syncs_every_commit_and_finds_registered_devices(
    tmp_path: Path,
) -> None:
    """The factory's registry: a COMMIT is on disk when it returns (the server's is not)."""
    records = [new_factory_record() for _ in range(3)]
    unknown = new_factory_record().dev_id

    async def synchronous(tx: RegistryTransaction) -> int:
        row = await tx._tx.fetchrow("PRAGMA synchronous")
        return int(row[0])

    for durable, expected in ((True, 2), (False, 1)):  # FULL, NORMAL
        registry = await open_registry(f"sqlite:///{tmp_path}/{durable}.db", durable=durable)
        try:
            assert await registry.run(synchronous) == expected
            await register(registry, KeyEncryptionKey(TEST_KEK), records)

            async def found(tx: RegistryTransaction) -> set[bytes]:
                return await tx.registered([unknown, *(r.dev_id for r in records)])

            assert await registry.run(found) == {r.dev_id for r in records}
        finally:
            await registry.close()
