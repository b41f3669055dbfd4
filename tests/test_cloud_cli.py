"""``doorstep cloud …`` as an administrator uses it: clear one-line errors, nothing half-made."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloud.keys import KEK_SIZE, KeyEncryptionKey, load_kek
from cloud.store.registry import open_registry
from cloud_helpers import (
    PG_DSN,
    PG_SKIP_REASON,
    TEST_KEK,
    drop_pg_schema,
    free_port,
    new_factory_record,
    pg_url,
    register,
    server_env,
)
from doorstep_cli import main
from protocol.encoding import b64url_encode
from protocol.factory import FactoryRecord

DOORSTEP = [sys.executable, "-m", "doorstep_cli"]


@pytest.fixture(autouse=True)
def _kek(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOORSTEP_KEK", b64url_encode(TEST_KEK))
    monkeypatch.delenv("DOORSTEP_KEK_FILE", raising=False)
    monkeypatch.delenv("DOORSTEP_CLOUD_DB", raising=False)
    monkeypatch.setenv("DOORSTEP_CLOUD_LOG_LEVEL", "warning")  # serve sets it: restore it after


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [*DOORSTEP, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _one_line_error(text: str, *parts: str) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("doorstep cloud: "), text
    for part in parts:
        assert part in lines[0], text


def _sqlite_threads() -> int:
    return sum(1 for t in threading.enumerate() if "_connection_worker_thread" in t.name)


def _no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    for name in ("run", "Config"):  # one process; several workers
        monkeypatch.setattr(uvicorn, name, lambda *a, **k: pytest.fail("served anyway"))


def test_a_file_that_is_no_database_is_one_line_and_the_command_ends(tmp_path: Path) -> None:
    """It used to print a traceback and then hang for good (a connection's thread stayed)."""
    not_db = tmp_path / "notes.txt"
    not_db.write_text("my notes\n")
    for command in (["migrate"], ["devices"], ["user", "add", "ann"]):
        done = _run("cloud", *command, "--db", f"sqlite:///{not_db}", timeout=30)
        assert done.returncode == 1
        _one_line_error(done.stderr, "file is not a database", "[database_unavailable]")
    assert not_db.read_text() == "my notes\n"


def test_a_sqlite_file_of_another_application_is_left_as_it_was(tmp_path: Path) -> None:
    """Its tables clash with ours: one line and the command ends (it hung after a traceback);
    a listing does not even open it for writing."""
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    listed = _run("cloud", "devices", "--db", f"sqlite:///{other}", timeout=30)
    assert listed.returncode == 1
    _one_line_error(listed.stderr, "is not a Doorstep cloud database")
    with contextlib.closing(sqlite3.connect(other)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
    for command in (["user", "add", "ann"], ["migrate"]):
        done = _run("cloud", *command, "--db", f"sqlite:///{other}", timeout=30)
        assert done.returncode == 1
        _one_line_error(
            done.stderr, "cannot bring the database's schema up to date", "[database_unavailable]"
        )


def test_a_database_that_cannot_be_made_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = _sqlite_threads()
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["cloud", "migrate", "--db", f"sqlite:///{blocked}/sub/cloud.db"]) == 1
    _one_line_error(capsys.readouterr().err, "[database_unavailable]")
    assert _sqlite_threads() == before  # nothing left open


@pytest.mark.parametrize(
    ("args", "message", "status"),
    [
        (["--db", "mysql://db.example/cloud"], "[bad_database_url]", 1),
        (["--port", "99999"], "--port must be 0–65535", 2),  # usage errors: 2, as argparse's
        (["--workers", "0"], "--workers must be at least 1", 2),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_bad_database_or_port_before_serving(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    message: str,
    status: int,
    workers: str,
) -> None:
    _no_serving(monkeypatch)
    monkeypatch.setenv("DOORSTEP_CLOUD_DB", f"sqlite:///{tmp_path}/cloud.db")
    argv = ["cloud", "serve", "--workers", workers, *args]
    assert main(argv) == status
    err = capsys.readouterr().err
    _one_line_error(err, message)
    assert "serving" not in err


def test_serve_refuses_a_file_that_is_no_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _no_serving(monkeypatch)
    (tmp_path / "x.db").write_text("not sqlite")
    assert main(["cloud", "serve", "--db", f"sqlite:///{tmp_path}/x.db", "--workers", "2"]) == 1
    _one_line_error(capsys.readouterr().err, "[database_unavailable]")


@pytest.mark.parametrize(
    ("stop", "presses", "status"),
    [(signal.SIGINT, 3, 130), (signal.SIGTERM, 1, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_factory_new_stopped_keeps_files_and_devices_alike(
    tmp_path: Path, stop: signal.Signals, presses: int, status: int
) -> None:
    """Every registered device has its record file, and no file is for an unknown device,
    also when Ctrl-C comes again while a batch commits. SIGTERM (`systemctl stop`,
    `timeout`) stops it the same way: it used to end it as a crash would, with staged
    files left for the next run to sort out and no word said."""
    db, out = tmp_path / "cloud.db", tmp_path / "records"
    assert _run("cloud", "migrate", "--db", f"sqlite:///{db}").returncode == 0
    command = ["cloud", "factory", "new", "--count", "200000", "--out", str(out)]
    proc = subprocess.Popen(
        [*DOORSTEP, *command, "--db", f"sqlite:///{db}"],
        stderr=subprocess.PIPE,
        # Ctrl-C reaches it even if this test runs where SIGINT is ignored (`cmd &`).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 60
    while b"devices registered" not in seen:  # the first batch is in: Ctrl-C now
        assert time.monotonic() < deadline and proc.poll() is None, seen
        seen += proc.stderr.read1(4096)
    for _ in range(presses):  # an impatient user: more Ctrl-C while the batch commits
        proc.send_signal(stop)
        time.sleep(0.05)
    rest = proc.communicate(timeout=60)[1]
    err = (seen + rest).decode()
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("doorstep cloud: interrupted after ") and "nothing else" in last
    assert "Traceback" not in err
    files = {p.name for p in out.iterdir()}
    assert files and all(name.endswith(".json") and not name.startswith(".") for name in files)
    with sqlite3.connect(db) as conn:
        registered = {row[0].hex() + ".json" for row in conn.execute("SELECT dev_id FROM devices")}
    assert files == registered
    assert f"after {len(files)} of 200000 devices" in last


def test_factory_new_sorts_out_what_a_cut_off_run_staged(tmp_path: Path) -> None:
    """A power loss between a batch's commit and its renames leaves staged record files:
    the next run publishes those of registered devices and sets the others aside (kept:
    such a file may hold the only copy of a device's K_init), a torn one included."""
    db, out = tmp_path / "cloud.db", tmp_path / "records"
    out.mkdir()
    kept, lost, torn = new_factory_record(), new_factory_record(), new_factory_record()
    asyncio.run(_register_records(db, [kept, torn]))
    for record in (kept, lost):
        (out / f".{record.dev_id.hex()}.json.partial").write_text(record.dumps())
    (out / f".{torn.dev_id.hex()}.json.partial").write_text(torn.dumps()[:40])
    (out / ".notes.txt.partial").write_text("mine")  # not a record's name: left alone
    done = _run(
        "cloud", "factory", "new", "--count", "1", "--out", str(out), "--db", f"sqlite:///{db}"
    )
    assert done.returncode == 0, done.stderr
    assert (
        "an earlier run was cut off: published 1 record of registered devices; set aside "
        "2 files that are no record of a device registered in this database "
        "(*.json.unregistered)"
    ) in done.stderr
    assert (out / f"{kept.dev_id.hex()}.json").read_text() == kept.dumps()
    assert (out / f".{lost.dev_id.hex()}.json.unregistered").read_text() == lost.dumps()
    assert (out / f".{torn.dev_id.hex()}.json.unregistered").read_text() == torn.dumps()[:40]
    assert (out / ".notes.txt.partial").read_text() == "mine"
    names = {p.name for p in out.iterdir()}
    assert not any(name.endswith(".json.partial") for name in names)
    published = {name for name in names if not name.startswith(".")}
    with sqlite3.connect(db) as conn:
        registered = {row[0].hex() + ".json" for row in conn.execute("SELECT dev_id FROM devices")}
    # The torn record's device is registered but has no file to publish (it was never
    # handed out: its file was still staged); the new device has its file.
    assert published == registered - {f"{torn.dev_id.hex()}.json"}
    assert len(published) == 2


def test_factory_new_refuses_an_out_directory_another_run_is_writing(tmp_path: Path) -> None:
    """Two runs on one --out: the second would take the first's staged files for a cut-off
    run's (and had, deleting 517 record files of registered devices in a review)."""
    db, out = tmp_path / "cloud.db", tmp_path / "records"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running factory new holds
        done = _run(
            "cloud", "factory", "new", "--count", "1", "--out", str(out), "--db", f"sqlite:///{db}"
        )
    finally:
        os.close(fd)
    assert done.returncode == 1
    _one_line_error(
        done.stderr, "another 'doorstep cloud factory new' is writing to", "[out_in_use]"
    )
    assert list(out.iterdir()) == []


async def _register_records(db: Path, records: list[FactoryRecord]) -> None:
    registry = await open_registry(f"sqlite:///{db}")
    try:
        await register(registry, KeyEncryptionKey(TEST_KEK), records)
    finally:
        await registry.close()


def test_factory_new_with_a_bad_database_makes_no_output_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "records"
    argv = ["cloud", "factory", "new", "--count", "3", "--out", str(out), "--db", "mysql://x"]
    assert main(argv) == 1
    _one_line_error(capsys.readouterr().err, "[bad_database_url]")
    assert not out.exists()


async def _registered(db: Path, count: int) -> None:
    await _register_records(db, [new_factory_record() for _ in range(count)])


def test_devices_lists_create_nothing_and_json_lists_every_device(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "typo.db"
    assert main(["cloud", "devices", "--db", f"sqlite:///{missing}"]) == 1
    _one_line_error(capsys.readouterr().err, f"no database at {missing}", "cloud migrate")
    assert not missing.exists()

    db = tmp_path / "cloud.db"
    asyncio.run(_registered(db, 1002))
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE devices SET last_checkin = 1700000000 WHERE dev_id = "
            "(SELECT dev_id FROM devices ORDER BY registered_at, dev_id LIMIT 1)"
        )
    import json

    assert main(["cloud", "devices", "--db", f"sqlite:///{db}", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 1002 and out.err == ""  # not cut at the table's 1000
    assert main(["cloud", "devices", "--db", f"sqlite:///{db}", "--json", "--limit", "2"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 2
    assert out.err.strip() == "1000 more devices not listed (--limit)"
    assert main(["cloud", "devices", "--db", f"sqlite:///{db}"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + 1000 + 1 and table[-1] == "… 2 more (use --limit)"
    assert "2023-11-14 22:13:20Z" in table[1]  # a check-in time people can read
    assert main(["cloud", "devices", "--db", f"sqlite:///{db}", "--limit", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "--limit must be at least 1")


def test_devices_into_a_pipe_that_closes_early_stops_quietly(tmp_path: Path) -> None:
    """``doorstep cloud devices | head``: no "Broken pipe" error."""
    db = tmp_path / "cloud.db"
    asyncio.run(_registered(db, 1000))
    proc = subprocess.Popen(
        [*DOORSTEP, "cloud", "devices", "--db", f"sqlite:///{db}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"DEV_ID")
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=30) == 141
    assert err == b""


@pytest.mark.parametrize("name", ["ann\tbeth", "ann\nbeth", "\x1b[31mred"])
def test_user_names_with_control_characters_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    assert main(["cloud", "user", "add", name, "--db", f"sqlite:///{tmp_path}/c.db"]) == 2
    _one_line_error(capsys.readouterr().err, "printable characters")


def test_a_padded_kek_is_accepted_and_a_binary_kek_file_is_invalid(tmp_path: Path) -> None:
    from cloud.errors import ConfigurationError

    padded = tmp_path / "padded.kek"
    padded.write_text(b64url_encode(TEST_KEK) + "=\n")
    assert load_kek(str(padded)) == TEST_KEK and len(TEST_KEK) == KEK_SIZE
    binary = tmp_path / "binary.kek"
    binary.write_bytes(bytes(range(200, 240)))
    with pytest.raises(ConfigurationError) as info:
        load_kek(str(binary))
    assert info.value.code == "kek_invalid"


def test_serve_on_a_port_in_use_says_so_before_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import socket

    _no_serving(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["cloud", "serve", "--db", f"sqlite:///{tmp_path}/c.db", "--port", str(port)]
        assert main(argv) == 1
    err = capsys.readouterr().err
    _one_line_error(err, f"cannot listen on 127.0.0.1:{port}: Address already in use")


def _workers_of(parent: int) -> list[int]:
    """The worker processes (uvicorn's spawned children) of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return sorted(found)


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/v1/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def _serving_workers(url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``cloud serve --workers 2`` on ``url`` (its output in ``log``) once both workers
    answer; killed, with its workers, and the schema dropped after."""
    port = free_port()
    argv = ["cloud", "serve", "--db", url, "--workers", "2", "--port", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen([*DOORSTEP, *argv], env=server_env(url), stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while len(_workers_of(server.pid)) < 2 or not _answers(f"http://127.0.0.1:{port}"):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield server
    finally:
        if server.poll() is None:  # a test failed: its workers too, not just the parent
            for pid in _workers_of(server.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.kill()
        server.wait(10)
        asyncio.run(drop_pg_schema(url))


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP_REASON)
def test_serve_workers_replace_a_killed_worker_and_say_so(tmp_path: Path) -> None:
    """uvicorn starts a new worker in place of one that dies but said so only at its info
    level: now it is a line on stderr. SIGTERM still ends the command with 0."""
    log = tmp_path / "serve.log"
    with _serving_workers(pg_url(), log) as server:
        first, second = _workers_of(server.pid)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(set(_workers_of(server.pid)) - {first, second}) < 1:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    text = log.read_text()
    replaced = f"doorstep cloud: worker process [{first}] was killed by SIGKILL; started another"
    assert replaced in text.splitlines() and "Traceback" not in text, text


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP_REASON)
def test_serve_workers_exit_1_when_a_worker_fails_after_start_up(tmp_path: Path) -> None:
    """A worker dies while serving and the one started in its place fails to start:
    uvicorn then stops every worker and returns as after SIGTERM, so ``serve`` ended
    with 0 and a supervisor (systemd, a container runtime) took it for a clean stop."""
    import asyncpg

    from cloud.store.database import split_postgres_url

    url = pg_url()
    log = tmp_path / "serve.log"
    with _serving_workers(url, log) as server:

        async def forget_the_migrations() -> None:  # a new worker's then clash with the tables
            dsn, schema = split_postgres_url(url)
            conn = await asyncpg.connect(dsn, server_settings={"search_path": str(schema)})
            try:
                await conn.execute("DELETE FROM schema_version")
            finally:
                await conn.close()

        asyncio.run(forget_the_migrations())
        killed = _workers_of(server.pid)[0]
        os.kill(killed, signal.SIGKILL)
        assert server.wait(60) == 1, log.read_text()
    lines = log.read_text().splitlines()
    replaced = f"doorstep cloud: worker process [{killed}] was killed by SIGKILL; started another"
    assert replaced in lines, lines
    assert lines[-1].startswith("doorstep cloud: worker process ["), lines
    assert lines[-1].endswith("failed to start (exited with status 3), so every worker was stopped")


async def test_a_batch_whose_registration_fails_leaves_no_file(tmp_path: Path) -> None:
    """One device of the batch is registered already: the batch's one transaction fails,
    the registry says none of the others is registered, and their staged files go."""
    from cloud.cli import _write_and_register

    db, out = tmp_path / "cloud.db", tmp_path / "records"
    out.mkdir()
    taken, fresh = new_factory_record(), new_factory_record()
    await _register_records(db, [taken])
    registry = await open_registry(f"sqlite:///{db}", durable=True)
    counted: list[int] = []
    try:
        with pytest.raises(sqlite3.IntegrityError):
            await _write_and_register(
                registry, KeyEncryptionKey(TEST_KEK), [fresh, taken], out, counted.append
            )
    finally:
        await registry.close()
    assert list(out.iterdir()) == [] and counted == []


# ---- databases this user may only read, PostgreSQL that is not there ------------------------


def _without_file_override() -> None:
    """In the child: as root, lose the power to override file modes (as an operator who
    is not the service's user has none), so that mode 0444 means read-only."""
    if os.getuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_database_this_user_may_only_read_is_listed_and_refuses_writes(tmp_path: Path) -> None:
    """Listing it printed the table, then a traceback from the closing checkpoint, and
    then never ended; a write was a traceback too."""
    db = tmp_path / "cloud.db"
    record = new_factory_record()
    asyncio.run(_register_records(db, [record]))
    db.chmod(0o444)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DOORSTEP, *args, "--db", f"sqlite:///{db}"],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_without_file_override,
        )

    listed = run("cloud", "devices")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert record.dev_id.hex()[:8] in listed.stdout
    added = run("cloud", "user", "add", "bob")
    assert added.returncode == 1 and added.stdout == ""
    assert added.stderr == (
        "doorstep cloud: the database refused: attempt to write a readonly database "
        "[database_unavailable]\n"
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://postgres:pw@127.0.0.1:1/test", "127.0.0.1:1/test: [Errno 111] Connect"),
        ("postgresql://postgres@127.0.0.1/test?sslmode=bogus", "127.0.0.1/test: `sslmode`"),
    ],
    ids=["nothing listens", "bad option"],
)
def test_a_postgresql_database_that_cannot_be_used_is_one_line(
    capsys: pytest.CaptureFixture[str], url: str, reason: str
) -> None:
    """These were tracebacks, or the bare errno text with no code."""
    for command in (["devices"], ["migrate"], ["user", "add", "bob"]):
        assert main(["cloud", *command, "--db", url]) == 1
        err = capsys.readouterr().err
        _one_line_error(
            err, f"cannot use the PostgreSQL database {reason}", "[database_unavailable]"
        )
        assert "pw" not in err.replace("postgresql", "")


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP_REASON)
def test_listing_a_postgresql_schema_that_does_not_exist_creates_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = pg_url()  # a fresh schema name, not created yet
    schema = url.rsplit("schema=", 1)[1]
    assert main(["cloud", "devices", "--db", url]) == 1
    _one_line_error(
        capsys.readouterr().err,
        f"no schema {schema} in ",
        "(create it with `doorstep cloud migrate`) [database_unavailable]",
    )

    async def exists() -> bool:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            found = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
            return bool(found)
        finally:
            await conn.close()

    assert not asyncio.run(exists())
    missing_db = PG_DSN.rsplit("/", 1)[0] + "/doorstep_no_such_database"
    assert main(["cloud", "devices", "--db", missing_db]) == 1
    _one_line_error(capsys.readouterr().err, 'database "doorstep_no_such_database" does not exist')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", ""], "--out must name a directory"),
        (["--out", "{file}"], "--out {file} is not a directory"),
        (["--out", "{link}"], "--out {link} is not a directory"),
        (["--model", "Lamp\x1b[2J"], "--model must be 1–32 bytes of printable UTF-8"),
    ],
    ids=["empty out", "out is a file", "out is a dangling link", "model with a control character"],
)
def test_factory_new_refuses_what_it_cannot_write_well(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    """An empty --out wrote into the current directory; a file gave "[Errno 17] File
    exists"; a model name with control characters reached every listing of it."""
    afile, link = tmp_path / "afile", tmp_path / "link"
    afile.write_text("mine")
    link.symlink_to(tmp_path / "nowhere")
    argv = ["cloud", "factory", "new", "--count", "1", "--db", f"sqlite:///{tmp_path}/c.db"]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "records")]
    argv += [arg.format(file=afile, link=link) for arg in args]
    assert main(argv) == 2  # usage errors, as in the other roles' commands
    _one_line_error(capsys.readouterr().err, message.format(file=afile, link=link))
    assert afile.read_text() == "mine" and not (tmp_path / "c.db").exists()


def test_the_devices_table_shows_control_characters_as_question_marks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A model name registered by other means reached the operator's terminal raw."""
    db = tmp_path / "cloud.db"
    asyncio.run(_register_records(db, [new_factory_record(model="Lamp\x1b]0;x\x07\n")]))
    assert main(["cloud", "devices", "--db", f"sqlite:///{db}"]) == 0
    table = capsys.readouterr().out
    assert "Lamp?]0;x??" in table and "\x1b" not in table and len(table.splitlines()) == 2
    assert main(["cloud", "devices", "--json", "--db", f"sqlite:///{db}"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == "Lamp\x1b]0;x\x07\n"


def test_a_database_file_that_cannot_be_opened_is_one_line_and_no_thread_traceback() -> None:
    """The one line came, then (most runs) two "Event loop is closed" tracebacks from the
    thread of the connection that failed to open."""
    for _ in range(3):
        done = _run("cloud", "migrate", "--db", "sqlite:////proc/doorstep-x.db")
        assert done.returncode == 1
        _one_line_error(done.stderr, "cannot use /proc/doorstep-x.db", "[database_unavailable]")


def test_a_kek_that_does_not_open_the_database_is_refused_before_serving_or_writing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The server started and answered every bind/start with 503; factory new registered
    devices that no server of that database could use."""
    db = tmp_path / "cloud.db"
    asyncio.run(_register_records(db, [new_factory_record()]))  # under TEST_KEK
    monkeypatch.setenv("DOORSTEP_KEK", b64url_encode(bytes(KEK_SIZE)))  # another KEK
    _no_serving(monkeypatch)
    expected = "the KEK does not open the secrets this database holds"
    assert main(["cloud", "serve", "--db", f"sqlite:///{db}", "--port", "0"]) == 1
    _one_line_error(capsys.readouterr().err, expected, "[kek_mismatch]")
    out = tmp_path / "records"
    argv = ["cloud", "factory", "new", "--count", "2", "--out", str(out), "--db", f"sqlite:///{db}"]
    assert main(argv) == 1
    _one_line_error(capsys.readouterr().err, expected, "[kek_mismatch]")
    assert not out.exists()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone() == (1,)
    monkeypatch.setenv("DOORSTEP_KEK", b64url_encode(TEST_KEK))  # the right one: it works
    assert main(argv) == 0
