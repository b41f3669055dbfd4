"""``doorstep cloud …``: serve the §6 API and administer devices and users.

Sub-commands: ``serve``, ``migrate``, ``factory new`` (§7 records, one JSON file
per device, mode 0600, registered in batches), ``user add`` (prints the token
once), ``devices`` (a table or ``--json``) and ``kek new``. ``--db`` takes
``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``postgresql://…``;
``DOORSTEP_CLOUD_DB`` also works, and the default is
``$XDG_DATA_HOME/doorstep/cloud.db`` (``~/.local/share/doorstep/cloud.db``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.errors import ConfigurationError
from cloud.keys import (
    ENV_KEK_FILE,
    PURPOSE_K_INIT,
    KeyEncryptionKey,
    UnwrapError,
    load_kek,
    write_new_kek,
)
from cloud.service import BindService, hash_token
from cloud.settings import ENV_DB, LOG_LEVELS, default_database_url
from cloud.store.database import first_line, split_postgres_url, sqlite_path, where_postgres
from cloud.store.registry import DeviceRecord, Registry, RegistryTransaction, open_registry
from protocol.display import printable
from protocol.encoding import b64url_encode
from protocol.factory import FactoryRecord

if TYPE_CHECKING:
    from uvicorn import Config

T = TypeVar("T")

FACTORY_BATCH = 5000


def add_parser(subparsers: Any) -> None:
    """Register ``cloud`` and its sub-commands on the top-level ``doorstep`` parser."""
    cloud = subparsers.add_parser("cloud", help="the Doorstep cloud service (§6) and its admin")
    cloud.set_defaults(func=lambda _args: _usage(cloud))
    sub = cloud.add_subparsers(dest="cloud_command", metavar="COMMAND")

    # The file used when neither --db nor $DOORSTEP_CLOUD_DB is set (XDG_DATA_HOME counts).
    data_file_url = default_database_url({k: v for k, v in os.environ.items() if k != ENV_DB})

    def db_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--db",
            default=None,
            metavar="URL",
            help=f"sqlite:///PATH (relative), sqlite:////PATH (absolute) or postgresql://… "
            f"(default: ${ENV_DB} or {data_file_url})",
        )

    def kek_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--kek-file",
            default=None,
            metavar="FILE",
            help=f"key-encryption key file (default: ${ENV_KEK_FILE}, or $DOORSTEP_KEK)",
        )

    serve = sub.add_parser("serve", help="serve the HTTP API with uvicorn")
    db_option(serve)
    kek_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (more than 1: PostgreSQL recommended; SQLite serialises them on one file)",
    )
    serve.add_argument(
        "--log-level",
        default="warning",
        choices=LOG_LEVELS,
        help="what the server logs (default warning)",
    )
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    db_option(migrate)
    migrate.set_defaults(func=cmd_migrate)

    factory = sub.add_parser("factory", help="factory records (§7)")
    factory.set_defaults(func=lambda _args: _usage(factory))
    factory_sub = factory.add_subparsers(dest="factory_command", metavar="COMMAND")
    new = factory_sub.add_parser("new", help="make and register new devices")
    db_option(new)
    kek_option(new)
    new.add_argument("--count", type=int, required=True)
    new.add_argument("--out", required=True, help="directory for the JSON files")
    new.add_argument("--model", default="Doorstep Lock D1")
    new.set_defaults(func=cmd_factory_new)

    user = sub.add_parser("user", help="user accounts")
    user.set_defaults(func=lambda _args: _usage(user))
    user_sub = user.add_subparsers(dest="user_command", metavar="COMMAND")
    user_add = user_sub.add_parser("add", help="add a user and print its bearer token once")
    db_option(user_add)
    user_add.add_argument("name")
    user_add.set_defaults(func=cmd_user_add)

    devices = sub.add_parser("devices", help="list registered devices")
    db_option(devices)
    devices.add_argument("--json", action="store_true", help="one JSON array")
    devices.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N devices (default: 1000 in the table, every one with --json)",
    )
    devices.set_defaults(func=cmd_devices)

    kek = sub.add_parser("kek", help="key-encryption key")
    kek.set_defaults(func=lambda _args: _usage(kek))
    kek_sub = kek.add_subparsers(dest="kek_command", metavar="COMMAND")
    kek_new = kek_sub.add_parser("new", help="write a new KEK file (mode 0600)")
    kek_new.add_argument("--out", type=Path, required=True)
    kek_new.set_defaults(func=cmd_kek_new)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _usage_error(message: str) -> int:
    """A bad option value: status 2, as argparse's own errors and the other roles' commands."""
    return _fail(message, status=2)


def _fail(message: str, status: int = 1) -> int:
    print(f"doorstep cloud: {message}", file=sys.stderr)
    return status


def _db(args: argparse.Namespace) -> str:
    return str(args.db or default_database_url())


def _db_label(url: str) -> str:
    """The database of ``url`` as an operator recognises it, without credentials."""
    if url.startswith("sqlite:"):
        return sqlite_path(url)
    dsn, schema = split_postgres_url(url)
    return f"{where_postgres(dsn)}" + (f" (schema {schema})" if schema else "")


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro())  # type: ignore[arg-type]


def _reader_gone() -> int:
    """stdout's reader left (``… | head``): stop quietly, as ``cat`` would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by it


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ConfigurationError as exc:
            return _fail(f"{exc} [{exc.code}]")
        except BrokenPipeError:
            return _reader_gone()
        except OSError as exc:
            return _fail(str(exc))
        except sqlite3.Error as exc:  # e.g. a file this user may only read
            return _fail(f"the database refused: {first_line(exc)} [database_unavailable]")
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):
                # The first line only: PostgreSQL's DETAIL may quote a row (a token's hash).
                return _fail(f"the database refused: {first_line(exc)} [database_unavailable]")
            raise

    wrapper.__doc__ = func.__doc__
    return wrapper


@_guarded
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud.app import ENV_LOG_LEVEL, app_from_env, settings_from_env

    if not 0 <= args.port <= 65535:
        return _usage_error("--port must be 0–65535")
    if args.workers < 1:
        return _usage_error("--workers must be at least 1")
    url = _db(args)
    if args.kek_file:
        os.environ[ENV_KEK_FILE] = args.kek_file
    kek = KeyEncryptionKey(load_kek())  # fail early and clearly (kek_missing)
    os.environ[ENV_DB] = url
    os.environ[ENV_LOG_LEVEL] = args.log_level  # for the app in this process or each worker
    settings_from_env()  # likewise for DOORSTEP_CLOUD_* numbers (bad_settings)
    # and the database (bad_database_url, …_unavailable), and that the KEK is its own
    _run(lambda: _check_database(url, kek))
    if (problem := _cannot_listen(args.host, args.port)) is not None:
        return _fail(problem)  # before "serving on …", not after it
    if args.workers > 1:
        print(
            f"serving {args.workers} workers on http://{args.host}:{args.port} …", file=sys.stderr
        )
        failure = _serve_workers(
            uvicorn.Config(
                "cloud.app:app_from_env",
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                log_level=args.log_level,
            )
        )
        return 0 if failure is None else _fail(failure)
    app = app_from_env()  # what each of several workers builds, start-up heap frozen
    print(f"serving on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_workers(config: Config) -> str | None:
    """Serve with ``config.workers`` processes, as ``uvicorn.run`` does; returns why serving
    ended on its own (a worker failed), or None when it was stopped (Ctrl-C, SIGTERM).

    uvicorn's supervisor replaces a worker that dies while serving, or that does
    not answer its ping for ``config.timeout_worker_healthcheck`` seconds (it
    kills that one with SIGKILL), and says so only at its ``info`` level: here
    each replacement is a line on stderr. A worker that fails to start (uvicorn's
    status 3: a replacement, say, once the database has become unusable) makes
    it stop every worker and return just as after SIGTERM, so under
    ``uvicorn.run`` the command ended with 0 and a supervisor (systemd, a
    container runtime) took the failure for a clean stop.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        failure: str | None = None

        def keep_subprocess_alive(self) -> None:
            if self.should_exit.is_set():
                return
            before = list(self.processes)
            super().keep_subprocess_alive()
            for process in before:
                code = process.exitcode
                if process not in self.processes:  # dead (or hung and killed) and replaced
                    print(
                        f"doorstep cloud: worker process [{process.pid}] {_how_it_ended(code)}; "
                        "started another",
                        file=sys.stderr,
                        flush=True,
                    )
                elif code == STARTUP_FAILURE and self.should_exit.is_set():
                    self.failure = (
                        f"worker process [{process.pid}] failed to start "
                        f"({_how_it_ended(code)}), so every worker was stopped"
                    )

    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    return supervisor.failure


def _how_it_ended(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (in use, not ours), else None."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


async def _check_database(url: str, kek: KeyEncryptionKey) -> None:
    """Open, migrate (as the app does when it starts) and close the database: a bad URL,
    file or schema, or a KEK that is not the database's, is a one-line error before serving.

    With several workers each would otherwise fail on its own, after
    "serving on …", with a traceback.
    """
    registry = await open_registry(url)
    try:
        await _check_kek(registry, kek)
    finally:
        await registry.close()


async def _check_kek(registry: Registry, kek: KeyEncryptionKey) -> None:
    """The KEK must open what the database holds (one registered device's K_init).

    With another KEK the cloud started, and refused every bind/start with 503
    ``storage_unavailable``; ``factory new`` registered devices under a KEK no
    server of that database could use.
    """
    device = await registry.run(lambda tx: tx.some_device())
    if device is None:
        return
    try:
        kek.unwrap(PURPOSE_K_INIT, device.dev_id, device.k_init_wrapped)
    except UnwrapError:
        raise ConfigurationError(
            "the KEK does not open the secrets this database holds: use the KEK it was "
            f"set up with ({ENV_KEK_FILE} or --kek-file)",
            code="kek_mismatch",
        ) from None


@_guarded
def cmd_migrate(args: argparse.Namespace) -> int:
    async def run() -> list[int]:
        registry = await open_registry(_db(args), migrate=False, create=True)
        try:
            return await registry.migrate()
        finally:
            await registry.close()

    applied = _run(run)
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0


async def register_factory_records(
    registry: Registry,
    kek: KeyEncryptionKey,
    records: list[FactoryRecord],
) -> None:
    """Register a batch of factory records (one transaction)."""
    await _insert_rows(registry, _wrapped_rows(kek, records))


def _wrapped_rows(
    kek: KeyEncryptionKey, records: list[FactoryRecord]
) -> list[tuple[bytes, bytes, str, bytes]]:
    wrapped = kek.wrap_many(PURPOSE_K_INIT, [(r.dev_id, r.k_init) for r in records])
    rows = [(r.dev_id, r.mac, r.model, w) for r, w in zip(records, wrapped, strict=True)]
    # Sorted by dev_id: the primary-key B-tree is then filled in one sweep. By the
    # key alone (dev_ids are unique): comparing whole tuples took three times as
    # long, and a sort holds the GIL throughout, stalling the previous batch's insert.
    rows.sort(key=itemgetter(0))
    return rows


async def _insert_rows(registry: Registry, rows: list[tuple[bytes, bytes, str, bytes]]) -> int:
    now = int(time.time())

    async def body(tx: RegistryTransaction) -> None:
        await tx.register_devices(rows, now)

    await registry.run(body, heavy=True)
    return len(rows)


async def import_factory_records(
    registry: Registry,
    kek: KeyEncryptionKey,
    records: list[FactoryRecord],
    *,
    batch: int = 250_000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Bulk registration: one transaction per ``batch`` records, pipelined.

    K_init of the next batch is wrapped while the database inserts the
    previous one (SQLite releases the GIL while it works), and large batches
    rewrite each page of the dev_id index fewer times. A batch is all or
    nothing; ``progress(n)`` is called after each committed batch. On SQLite a
    batch holds the write lock for a few seconds, so a server on the same file
    waits (up to its busy timeout) while a large import runs.
    """
    done = 0
    pending: asyncio.Task[int] | None = None

    async def settle() -> None:
        nonlocal done
        if pending is not None:
            done += await pending
            if progress is not None:
                progress(done)

    for start in range(0, len(records), batch):
        rows = _wrapped_rows(kek, records[start : start + batch])
        await settle()
        pending = asyncio.create_task(_insert_rows(registry, rows))
        await asyncio.sleep(0)  # hand the batch to the database thread before wrapping on
    await settle()


def new_factory_record(model: str, rng: Callable[[int], bytes] = os.urandom) -> FactoryRecord:
    """A fresh §7 record: random dev_id, a locally administered unicast MAC, K_init."""
    mac = bytearray(rng(6))
    mac[0] = (mac[0] | 0x02) & 0xFE
    return FactoryRecord(rng(16), bytes(mac), rng(32), model)


_RECORD_DRAW = 16 + 6 + 32


def _slicer(pool: memoryview) -> Callable[[int], bytes]:
    offset = 0

    def read(n: int) -> bytes:
        nonlocal offset
        chunk = bytes(pool[offset : offset + n])
        offset += n
        return chunk

    return read


@_guarded
def cmd_factory_new(args: argparse.Namespace) -> int:
    if args.count < 1:
        return _usage_error("--count must be at least 1")
    if not 1 <= len(args.model.encode("utf-8")) <= 32 or not args.model.isprintable():
        return _usage_error("--model must be 1–32 bytes of printable UTF-8")
    if not args.out.strip():
        return _usage_error("--out must name a directory")
    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():  # a dangling link too
        return _usage_error(f"--out {out} is not a directory")
    kek = KeyEncryptionKey(load_kek(args.kek_file))
    from cloud.app import cloud_entropy

    entropy = cloud_entropy()
    done = 0
    interrupted = signal.SIGINT  # or SIGTERM: the exit status says which (128 + signal)

    def registered(count: int) -> None:
        nonlocal done
        done += count

    async def run() -> None:
        # Every Ctrl-C (also a second one) only cancels this task, at an await: a
        # batch's commit is then waited for, never abandoned (_write_and_register).
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, `systemctl stop`, `timeout`

            def stop(signum: int = signum) -> None:
                nonlocal interrupted
                interrupted = signal.Signals(signum)
                main.cancel()

            loop.add_signal_handler(signum, stop)
        # Durable commits: a record file is published only once its device's
        # registration would survive a power loss (_write_and_register).
        registry = await open_registry(_db(args), durable=True)  # a bad --db: before --out
        try:
            await _check_kek(registry, kek)  # before any file is written
            out.mkdir(parents=True, exist_ok=True)
            with _exclusive(out):
                await _recover_staged(registry, out)
                await batches(registry)
        finally:
            await registry.close()
        print(file=sys.stderr)

    async def batches(registry: Registry) -> None:
        started = time.monotonic()
        while done < args.count:
            size = min(FACTORY_BATCH, args.count - done)
            # One draw per batch: the source is health-tested per read, so
            # many small reads are slow; slicing one large draw is equivalent.
            pool = memoryview(entropy.read(size * _RECORD_DRAW))
            batch = [
                new_factory_record(args.model, _slicer(pool[i * _RECORD_DRAW :]))
                for i in range(size)
            ]
            await _write_and_register(registry, kek, batch, out, registered)
            rate = done / max(time.monotonic() - started, 1e-6)
            print(
                f"\r{done}/{args.count} devices registered ({rate:,.0f}/s)",
                end="",
                file=sys.stderr,
                flush=True,
            )

    try:
        _run(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(file=sys.stderr)
        return _fail(
            f"interrupted after {done} of {args.count} devices: each one registered has "
            f"its record in {out}, and nothing else was kept",
            status=128 + interrupted,
        )
    print(f"wrote {args.count} factory record{'s' if args.count != 1 else ''} to {out}")
    return 0


async def _write_and_register(
    registry: Registry,
    kek: KeyEncryptionKey,
    batch: list[FactoryRecord],
    out: Path,
    registered: Callable[[int], None],
) -> None:
    """Each record's file appears in ``out`` once its device is registered, and only then.

    The files are written under temporary names and renamed after the batch
    commits. Ctrl-C (however often) waits for the commit, then publishes the
    files; if the commit fails, neither the devices nor the files are left.
    Against a power loss: the files' contents are on disk before the commit,
    the commit is on disk before the renames (a durable registry), and the
    renames before the next batch. A loss between the commit and the renames
    leaves complete staged files, which the next run sorts out
    (:func:`_recover_staged`); so does a commit whose outcome is unknown.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for record in batch:
            name = f"{record.dev_id.hex()}.json"
            partial = out / f"{_STAGED_PREFIX}{name}{_STAGED_SUFFIX}"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            staged.append((partial, out / name))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(record.dumps())
        _sync_files(out, [partial for partial, _ in staged])
    except BaseException:
        _discard(staged)
        raise
    registering = asyncio.ensure_future(register_factory_records(registry, kek, batch))
    stopped = False
    while not registering.done():
        try:
            await asyncio.wait({registering})
        except asyncio.CancelledError:
            stopped = True  # Ctrl-C: the transaction ends on its own; its outcome decides
    # (Nothing else cancels ``registering``; if something did, exception() raises
    # CancelledError and the staged files stay for the next run to sort out.)
    failure = registering.exception()
    if failure is not None:
        try:
            committed = await _committed_anyway(registry, batch)
        except Exception:  # cannot be asked: the staged files stay for the next run
            raise failure from None
        if not committed:
            _discard(staged)  # this run's files of devices that are not registered
            raise failure
    registered(len(batch))
    # No Ctrl-C can cut this short: run() turned SIGINT into a cancel, taken at an await.
    for partial, final in staged:
        partial.rename(final)
    _sync_directory(out)
    if stopped:
        raise asyncio.CancelledError


async def _committed_anyway(registry: Registry, batch: list[FactoryRecord]) -> bool:
    """After a failed registration: whether its commit happened all the same (a
    connection lost during COMMIT)."""

    dev_ids = [record.dev_id for record in batch]

    async def body(tx: RegistryTransaction) -> set[bytes]:
        return await tx.registered(dev_ids)

    return await registry.run(body) == set(dev_ids)  # one transaction: all or none


def _discard(staged: list[tuple[Path, Path]]) -> None:
    for partial, _ in staged:
        partial.unlink(missing_ok=True)


#: ``.<dev_id hex>.json.partial``: a record file not published yet.
_STAGED_PREFIX, _STAGED_SUFFIX = ".", ".partial"
#: What recovery renames a staged file to when it is no record of a device registered
#: in this database: kept (it may hold the only copy of a K_init), never published.
_SET_ASIDE_SUFFIX = ".unregistered"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """``out`` for this run alone: an advisory lock on the directory itself.

    Recovery (:func:`_recover_staged`) takes every staged file it finds for a
    cut-off run's; a second run writing there at the same time would have its
    files taken too, so it is refused instead.
    """
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another 'doorstep cloud factory new' is writing to {out}; "
                "wait for it to finish or use another --out",
                code="out_in_use",
            ) from None
        yield
    finally:
        os.close(fd)  # and with it the lock


def _sync_files(directory: Path, files: list[Path]) -> None:
    """The contents of ``files`` and their names in ``directory`` on disk, or ``OSError``."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        # One syncfs(2) for the whole batch where there is one (Linux): it reports
        # write-back errors (Linux ≥ 5.8) and flushes only this filesystem; an fsync
        # per file took ~0.3 ms each here.
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    for path in files:  # pragma: no cover - without syncfs(2)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _sync_directory(directory)  # pragma: no cover


def _syncfs(fd: int) -> bool:
    """``syncfs(fd)``: False where the C library has none, ``OSError`` if it fails."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return False
    if syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return True


def _sync_directory(directory: Path) -> None:
    """The names in ``directory`` (renames, new files) on disk, or ``OSError``."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystems that cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


async def _recover_staged(registry: Registry, out: Path) -> None:
    """Sort out the staged record files a cut-off run left in ``out``.

    Only a power loss or a killed process (between a batch's commit and its
    renames, or a commit whose outcome was unknown) leaves them. A complete
    record of a device registered in this database is published under its
    final name; any other staged file is set aside (renamed
    ``….json.unregistered``, never deleted: registered in another database,
    it may hold the only copy of that device's K_init).
    """
    staged = [
        (_staged_dev_id(path), path)
        for path in out.iterdir()
        if path.name.startswith(_STAGED_PREFIX) and path.name.endswith(".json" + _STAGED_SUFFIX)
    ]
    if not staged:
        return

    async def body(tx: RegistryTransaction) -> set[bytes]:
        return await tx.registered([dev_id for dev_id, _ in staged if dev_id])

    registered = await registry.run(body)
    published = 0
    for dev_id, path in staged:
        final = out / path.name[len(_STAGED_PREFIX) : -len(_STAGED_SUFFIX)]
        if dev_id and dev_id in registered:
            path.rename(final)
            published += 1
        else:
            path.rename(path.with_name(path.name[: -len(_STAGED_SUFFIX)] + _SET_ASIDE_SUFFIX))
    _sync_directory(out)
    aside = len(staged) - published
    print(
        f"an earlier run was cut off: published {published} record"
        f"{'s' if published != 1 else ''} of registered devices"
        + (
            f"; set aside {aside} file{'s' if aside != 1 else ''} that "
            f"{'are' if aside != 1 else 'is'} no record of a device registered in this "
            f"database (*.json{_SET_ASIDE_SUFFIX})"
            if aside
            else ""
        ),
        file=sys.stderr,
    )


def _staged_dev_id(path: Path) -> bytes:
    """The dev_id of the complete record in ``path`` if its name is that record's, else b""."""
    try:
        record = FactoryRecord.loads(path.read_text(encoding="utf-8"))
    except Exception:  # torn, not a record, unreadable: nothing to publish
        return b""
    if path.name != f"{_STAGED_PREFIX}{record.dev_id.hex()}.json{_STAGED_SUFFIX}":
        return b""
    return record.dev_id


@_guarded
def cmd_user_add(args: argparse.Namespace) -> int:
    name = args.name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        return _usage_error("the user name must be 1–64 printable characters (no tabs or newlines)")
    token = b64url_encode(os.urandom(32))

    async def run() -> int | None:
        registry = await open_registry(_db(args))
        try:

            async def body(tx: RegistryTransaction) -> int | None:
                if await tx.user_by_name(name) is not None:
                    return None
                return await tx.add_user(name, hash_token(token), int(time.time()))

            return await registry.run(body)
        finally:
            await registry.close()

    user_id = _run(run)
    if user_id is None:
        return _fail(f"a user named {name!r} already exists")
    # Which database: a `user add` without --db (or DOORSTEP_CLOUD_DB) goes to the default file.
    print(
        f"user {name!r} added to {_db_label(_db(args))} (id {user_id}); bearer token (shown once, keep it safe):"
    )
    print(token)
    return 0


@_guarded
def cmd_devices(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        return _usage_error("--limit must be at least 1")
    limit = args.limit or (None if args.json else 1000)
    url = _db(args)
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        if path != ":memory:" and not Path(path).is_file():
            # A listing creates nothing: a mistyped path is not a new, empty cloud.
            return _fail(f"no database at {path} (create it with `doorstep cloud migrate`)")
        if path != ":memory:" and (problem := _not_a_current_cloud(Path(path))):
            return _fail(problem)

    async def run() -> tuple[list[dict[str, Any]], int] | None:
        registry = await open_registry(url, migrate=False)
        try:
            if not await registry.is_current():
                return None

            async def body(
                tx: RegistryTransaction,
            ) -> tuple[list[DeviceRecord], dict[int, str], int]:
                total = await tx.count_devices()
                devices = await tx.all_devices(total if limit is None else limit)
                return devices, await tx.user_names(), total

            devices, names, total = await registry.run(body)
        finally:
            await registry.close()
        rows = []
        for device in devices:
            view = BindService.device_view(device)
            view["owner"] = names.get(device.owner_id) if device.owner_id is not None else None
            view["state"] = view["state"] if device.owner_id is not None else "unbound"
            rows.append(view)
        return rows, total

    listed = _run(run)
    if listed is None:
        return _fail("the database's schema is not this version's: run `doorstep cloud migrate`")
    rows, total = listed
    if args.json:
        print(json.dumps(rows, indent=2))
        if total > len(rows):
            print(f"{total - len(rows)} more devices not listed (--limit)", file=sys.stderr)
        return 0
    columns = ("dev_id", "model", "owner", "state", "epoch", "identifier", "last_checkin")
    table = [[_cell(column, row[column]) for column in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if total > len(rows):
        print(f"… {total - len(rows)} more (use --limit)")
    return 0


def _not_a_current_cloud(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is no cloud database of this version, read-only."""
    import sqlite3

    from cloud.store.schema import LATEST_VERSION

    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone():
                return f"{path} is not a Doorstep cloud database (no schema_version table)"
            (version,) = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        return f"cannot use {path} as the cloud's SQLite database: {exc} [database_unavailable]"
    if version is None or version < LATEST_VERSION:
        return f"{path} has schema version {version or 0}: run `doorstep cloud migrate` first"
    if version > LATEST_VERSION:
        return (
            f"{path} has schema version {version}, newer than this doorstep's "
            f"({LATEST_VERSION}): use a newer doorstep"
        )
    return None


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "last_checkin":  # Unix seconds in --json; a readable UTC time here
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    return printable(str(value))  # a model name registered elsewhere may hold controls


@_guarded
def cmd_kek_new(args: argparse.Namespace) -> int:
    try:
        write_new_kek(args.out)
    except FileExistsError:
        return _fail(f"{args.out} exists; refusing to overwrite a key")
    print(f"wrote a new KEK to {args.out} (mode 0600); set {ENV_KEK_FILE}={args.out}")
    return 0
