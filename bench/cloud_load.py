"""Cloud load benchmark: a real server (one worker), driven from a separate process.

For SQLite (and PostgreSQL beside it when DOORSTEP_TEST_PG_DSN is set) this
registers devices, precomputes each device's M1/M2 with the protocol core,
starts ``doorstep cloud serve`` and runs a load-generator process against it
(a raw keep-alive HTTP/1.1 client on uvloop, so that the client is not what is
measured). Phases, each with fresh devices:

1. the floor: ``GET /v1/health``, a bare endpoint of the same app;
2. ``POST /v1/bind/start`` as fast as it goes (closed loop);
3. valid bind/start + bind/complete pairs: the client opens W with the
   device's K_init and sends the device's Ack, exactly as a device would;
4. bind/start paced at half the rate of phase 2 (open loop: latency counts
   from the scheduled send time, so queueing is not hidden).

It prints requests/s, p50 and p99 for each, the ratio to the floor, the
server's CPU time per request and its peak RSS. Figures only, no assertions.

Usage: ``python bench/cloud_load.py [--seconds 5] [--concurrency 16] [--backend sqlite]
[--server-log FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

GOAL_RATE = 4000
LIMITS = {f"DOORSTEP_CLOUD_RATE_{k}": "100000000" for k in ("USER", "DEVICE", "ADDRESS")}


# --- the load generator (runs in its own process) ------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request in flight at a time."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        length = 0 if at < 0 else int(head[at + 15 :].split(b"\r\n", 1)[0])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def _http(method: str, path: str, body: bytes = b"", token: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class _Job:
    port: int
    token: str
    seconds: float
    concurrency: int
    #: per device: the bind/start body, and what the device needs for its Ack
    devices: list[tuple[bytes, ...]]
    server_pid: int


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class _Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.errors: dict[int, int] = {}
        self.elapsed = 0.0
        self.cpu_ticks = 0
        self.starved = False  # the phase ran out of prepared devices before its time was up

    def note(self, status: int, expected: int, latency: float) -> None:
        self.latencies.append(latency)
        if status != expected:
            self.errors[status] = self.errors.get(status, 0) + 1

    def summary(self, count: int | None = None) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = count if count is not None else len(lat)
        pick = (lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3) if lat else (lambda q: 0.0)
        return {
            "name": self.name,
            "rate": n / self.elapsed if self.elapsed else 0.0,
            "p50_ms": pick(0.50),
            "p99_ms": pick(0.99),
            "errors": self.errors,
            "count": n,
            "cpu_us": self.cpu_ticks * 1e6 / os.sysconf("SC_CLK_TCK") / max(1, n),
            "starved": self.starved,
        }


async def _client(job: _Job) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(job.concurrency):
        _, proto = await loop.create_connection(_Connection, "127.0.0.1", job.port)
        conns.append(proto)
    devices = iter(job.devices)
    results = []

    async def closed_loop(phase: _Phase, step: Any) -> None:
        deadline = time.perf_counter() + job.seconds

        async def worker(conn: _Connection) -> None:
            while time.perf_counter() < deadline:
                if not await step(conn):
                    phase.starved = True
                    return

        ticks = _cpu_ticks(job.server_pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        phase.elapsed = time.perf_counter() - started
        phase.cpu_ticks = _cpu_ticks(job.server_pid) - ticks

    # 1. the floor
    floor = _Phase("floor GET /v1/health")
    health = _http("GET", "/v1/health")

    async def health_step(conn: _Connection) -> bool:
        sent = time.perf_counter()
        status, _ = await conn.request(health)
        floor.note(status, 200, time.perf_counter() - sent)
        return True

    await closed_loop(floor, health_step)
    results.append(floor.summary())

    # 2. bind/start alone
    start = _Phase("POST /v1/bind/start")

    async def start_step(conn: _Connection) -> bool:
        device = next(devices, None)
        if device is None:
            return False
        sent = time.perf_counter()
        status, _ = await conn.request(_http("POST", "/v1/bind/start", device[0], job.token))
        start.note(status, 201, time.perf_counter() - sent)
        return True

    await closed_loop(start, start_step)
    results.append(start.summary())

    # 3. pairs: bind/start, then bind/complete with the device's Ack
    from protocol.cloudside import open_wrapped_identity
    from protocol.crypto import LABEL_KEY_WRAP, hkdf
    from protocol.encoding import b64url_decode, b64url_encode
    from protocol.schedule import bind_ack, transcript_hash

    pairs = _Phase("bind/start + bind/complete")
    completes = _Phase("  of which bind/complete")

    async def pair_step(conn: _Connection) -> bool:
        device = next(devices, None)
        if device is None:
            return False
        body, m1, m2, pub, nonce, k_init, dev_id = device
        sent = time.perf_counter()
        status, answer_bytes = await conn.request(_http("POST", "/v1/bind/start", body, job.token))
        if status != 201:
            pairs.note(status, 201, time.perf_counter() - sent)
            return True
        answer = json.loads(answer_bytes)
        th = transcript_hash(m1, m2, pub, nonce, b64url_decode(answer["ticket"]))
        k_wrap = hkdf(k_init, LABEL_KEY_WRAP, 32)
        identity = open_wrapped_identity(k_wrap, th, b64url_decode(answer["wrapped_identity"]), 0)
        ack = bind_ack(identity.k_dev, dev_id, identity.identifier, identity.epoch, th)
        complete = json.dumps({"attempt": answer["attempt"], "ack": b64url_encode(ack)}).encode()
        mid = time.perf_counter()
        status, _ = await conn.request(_http("POST", "/v1/bind/complete", complete, job.token))
        done = time.perf_counter()
        completes.note(status, 200, done - mid)
        pairs.note(status, 200, done - sent)
        return True

    await closed_loop(pairs, pair_step)
    completes.elapsed, completes.cpu_ticks = pairs.elapsed, 0
    summary = pairs.summary()
    summary["requests_per_s"] = 2 * summary["rate"]
    summary["cpu_us"] = summary["cpu_us"] / 2  # per request, not per pair
    results += [summary, completes.summary()]

    # 4. bind/start at half the closed-loop rate, open loop
    rate = results[1]["rate"] / 2
    half = _Phase(f"bind/start paced at {rate:,.0f}/s")
    interval = len(conns) / rate
    t0 = time.perf_counter()

    async def paced(conn: _Connection, offset: float) -> None:
        k = 0
        while True:
            scheduled = t0 + offset + k * interval
            if scheduled > t0 + job.seconds:
                return
            k += 1
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            device = next(devices, None)
            if device is None:
                half.starved = True
                return
            status, _ = await conn.request(_http("POST", "/v1/bind/start", device[0], job.token))
            half.note(status, 201, time.perf_counter() - scheduled)

    ticks = _cpu_ticks(job.server_pid)
    await asyncio.gather(*(paced(c, i * interval / len(conns)) for i, c in enumerate(conns)))
    half.elapsed = time.perf_counter() - t0
    half.cpu_ticks = _cpu_ticks(job.server_pid) - ticks
    results.append(half.summary())
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return results


def client_main(job_path: str) -> None:
    job: _Job = pickle.loads(Path(job_path).read_bytes())  # noqa: S301 - our own temp file
    # The precomputed requests are hundreds of thousands of objects: a full
    # collection over them stalls this process for tens of ms, which the paced
    # phase would count as server latency. Keep them out of the collector.
    gc.collect()
    gc.freeze()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass
    print(json.dumps(asyncio.run(_client(job))))


# --- the driver --------------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _prepare(url: str, count: int) -> tuple[list[tuple[bytes, ...]], str]:
    from cloud_helpers import start_session
    from protocol.encoding import b64url_decode
    from test_cloud_process import _prepare as register_and_add_user

    sims, (token,) = await register_and_add_user(url, count)
    devices = []
    for sim in sims:
        request = start_session(sim).request
        devices.append(
            (
                json.dumps(request, separators=(",", ":")).encode(),
                b64url_decode(request["m1"]),
                b64url_decode(request["m2"]),
                b64url_decode(request["commissioner_pub"]),
                b64url_decode(request["commissioner_nonce"]),
                sim.record.k_init,
                sim.record.dev_id,
            )
        )
    return devices, token


def run(
    url: str, label: str, seconds: float, concurrency: int, count: int, server_log: Path | None
) -> None:
    from cloud_helpers import ServerProcess

    print(f"[{label}] registering {count:,} devices and precomputing their M1/M2 …", flush=True)
    devices, token = asyncio.run(_prepare(url, count))
    server = ServerProcess(url, log_path=server_log, **LIMITS)
    server.start()
    assert server.process is not None
    try:
        with tempfile.NamedTemporaryFile(suffix=".job") as job_file:
            job = _Job(server.port, token, seconds, concurrency, devices, server.process.pid)
            job_file.write(pickle.dumps(job))
            job_file.flush()
            print(f"[{label}] driving for {4 * seconds:.0f} s from a separate process …", flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--client", job_file.name],
                capture_output=True,
                text=True,
            )
        if out.returncode != 0:
            raise SystemExit(f"the load generator failed:\n{out.stderr}")
        results = json.loads(out.stdout)
        floor = results[0]["rate"]
        for r in results:
            errors = f"  errors {r['errors']}" if r["errors"] else ""
            if r["starved"]:
                errors += "  RAN OUT OF DEVICES (use more --devices)"
            extra = f" ({r['requests_per_s']:,.0f} requests/s)" if "requests_per_s" in r else ""
            cpu = f"  server CPU {r['cpu_us']:.0f} µs/req" if r["cpu_us"] else ""
            print(
                f"[{label}] {r['name']:34s} {r['rate']:7,.0f}/s{extra:22s} p50 {r['p50_ms']:6.2f} ms"
                f"  p99 {r['p99_ms']:6.2f} ms{cpu}{errors}"
            )
        start, half = results[1], results[-1]
        ratio = start["rate"] / floor

        def verdict(ok: bool, *phases: dict[str, Any]) -> str:
            # A phase cut short by a lack of devices measured nothing it can be judged on.
            if any(phase["starved"] or not phase["count"] for phase in phases):
                return "not measured"
            return "met" if ok else "NOT met"

        print(
            f"[{label}] bind/start {start['rate']:,.0f}/s (goal ≥ {GOAL_RATE:,}: "
            f"{verdict(start['rate'] >= GOAL_RATE, start)}); ratio to the floor "
            f"{ratio:.2f} (goal ≥ 0.4: {verdict(ratio >= 0.4, start)}); p99 at half rate "
            f"{half['p99_ms']:.1f} ms (goal ≤ 10: {verdict(half['p99_ms'] <= 10, half)})"
        )
        rss = _peak_rss_mb(server.process.pid)
        print(f"[{label}] server peak RSS {rss:.0f} MB (goal ≤ 150: {'met' if rss <= 150 else 'NOT met'})")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="connections")
    parser.add_argument(
        "--devices",
        type=int,
        help="registered for the run (default: 12,000 per second of --seconds, at least 60,000)",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--server-log", type=Path, help="append the server's output to this file (default: dropped)"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client)
        return
    if args.devices is None:
        # Each device serves one bind/start; at a closed-loop rate R the three phases that
        # use them take ~2R per second (R, R/2 in pairs, R/2 paced): enough for R ≈ 6,000/s.
        args.devices = max(60_000, int(12_000 * args.seconds))
    from cloud_helpers import PG_DSN, drop_pg_schema, pg_url

    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            run(url, "sqlite", args.seconds, args.concurrency, args.devices, args.server_log)
    if args.backend in ("postgresql", "both"):
        if PG_DSN:
            url = pg_url()
            try:
                run(url, "postgresql", args.seconds, args.concurrency, args.devices, args.server_log)
            finally:  # the run's own schema: leave the database as it was
                asyncio.run(drop_pg_schema(url))
        else:
            print("[postgresql] skipped: set DOORSTEP_TEST_PG_DSN to a server to measure it")


if __name__ == "__main__":
    main()
